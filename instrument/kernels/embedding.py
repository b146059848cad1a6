"""nn.Embedding: exact per-sample norms from unique (sample, token) sums.

Sample i's weight gradient has one non-zero row per distinct token it uses: the sum of the backprops at
the positions holding that token. So the squared norm is ``Σ_v ‖Σ_{t: idx_it = v} G_it‖²``: group the
positions by (sample, token) with ``torch.unique``, ``index_add`` the backprops, square, and add up per
sample. O(B·T·d) work, never a B × V × d tensor. ``padding_idx`` positions get no gradient (as in
PyTorch); ``scale_grad_by_freq`` (batch-wide counts) and ``sparse`` are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel, scaled_rows, sq_norms


def _validate(name: str, module: nn.Module) -> None:
    assert isinstance(module, nn.Embedding)
    label = f"layer {name or '<root>'!r} (Embedding)"
    if module.scale_grad_by_freq:
        from ..engine import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"{label} has scale_grad_by_freq=True: its gradient is scaled by token counts over the whole "
            "batch, so a sample's gradient depends on the other samples; set scale_grad_by_freq=False"
        )
    if module.sparse:
        from ..engine import UnsupportedLayerError

        raise UnsupportedLayerError(
            f"{label} has sparse=True: sparse gradients are not supported; use sparse=False"
        )


@register_kernel(nn.Embedding, validate=_validate)
def embedding_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.Embedding)
    num, dim = module.num_embeddings, module.embedding_dim
    idx = torch.cat([c.input.reshape(c.input.shape[0], -1) for c in calls], 1)  # [b, T]
    g = torch.cat([c.grad_output.reshape(idx.shape[0], -1, dim) for c in calls], 1)  # [b, T, d]
    b = idx.shape[0]
    keep = None
    if module.padding_idx is not None:
        keep = idx != module.padding_idx
    sample = torch.arange(b, device=idx.device).unsqueeze(1).expand_as(idx)
    key = sample * num + idx
    flat_key = key.reshape(-1)
    flat_g = g.reshape(-1, dim)
    if keep is not None:
        flat_key = flat_key[keep.reshape(-1)]
        flat_g = flat_g[keep.reshape(-1)]
    uniq, inverse = torch.unique(flat_key, return_inverse=True)
    sums = torch.zeros(uniq.shape[0], dim, dtype=g.dtype, device=g.device).index_add_(0, inverse, flat_g)
    norm_sq = torch.zeros(b, dtype=g.dtype, device=g.device).index_add_(0, uniq // num, sq_norms(sums))
    del sums
    flat_idx = idx.reshape(-1) if keep is None else idx.reshape(-1)[keep.reshape(-1)]

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        gs = scaled_rows(g, scale).reshape(-1, dim)
        if keep is not None:
            gs = gs[keep.reshape(-1)]
        dw = torch.zeros(num, dim, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, gs)
        return {"weight": dw}

    return LayerGrads(norm_sq, grads)
