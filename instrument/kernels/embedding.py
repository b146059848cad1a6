"""nn.Embedding: exact per-sample norms from unique (sample, token) sums.

Sample i's weight gradient has one non-zero row per distinct token it uses: the sum of the backprops at
the positions holding that token. So the squared norm is ``Σ_v ‖Σ_{t: idx_it = v} G_it‖²``: group the
positions by (sample, token) with a per-row sort, ``index_add`` the backprops, square, and add up per
sample. O(B·T·d) work, never a B × V × d tensor. ``padding_idx`` positions get no gradient (as in
PyTorch); ``scale_grad_by_freq`` (batch-wide counts) and ``sparse`` are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel, scaled_rows


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


def _segment_norm_sq(idx: Tensor, g: Tensor) -> Tensor:
    """``Σ_v ‖Σ_{t: idx_it = v} G_it‖²`` per sample i, for idx [b, T] and g [b, T, d].

    Sorting each row of ``idx`` (b small sorts, not one global ``torch.unique`` over b·T keys, which was
    the slow part) marks where a new token starts; a cumulative sum of those marks numbers the (sample,
    token) groups, scattered back to the original positions so the backprops are summed per group by one
    ``index_add`` without being permuted. Rows whose tokens are all distinct (positions) need no grouping.
    """
    b, t = idx.shape
    d = g.shape[-1]
    srt, perm = idx.sort(dim=1)
    starts = torch.ones_like(srt, dtype=torch.bool)
    torch.ne(srt[:, 1:], srt[:, :-1], out=starts[:, 1:])
    if bool(starts.all()):  # no token twice in a sample: each position is its own row of the gradient
        return torch.linalg.vector_norm(g, dim=(1, 2)).square_()
    group_sorted = starts.reshape(-1).cumsum(0).sub_(1)
    n_groups = int(group_sorted[-1]) + 1
    group = torch.empty_like(group_sorted).view(b, t).scatter_(1, perm, group_sorted.view(b, t))
    sums = torch.zeros(n_groups, d, dtype=g.dtype, device=g.device)
    sums.index_add_(0, group.reshape(-1), g.reshape(-1, d))
    sample = torch.arange(b, device=idx.device).repeat_interleave(starts.sum(1))
    sq = torch.linalg.vector_norm(sums, dim=1).square_()
    return torch.zeros(b, dtype=g.dtype, device=g.device).index_add_(0, sample, sq)


@register_kernel(nn.Embedding, validate=_validate)
def embedding_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.Embedding)
    num, dim = module.num_embeddings, module.embedding_dim
    idxs = [c.input.reshape(c.input.shape[0], -1) for c in calls]
    idx = idxs[0] if len(idxs) == 1 else torch.cat(idxs, 1)  # [b, T] (no copy for a single call)
    gs = [c.grad_output.reshape(idx.shape[0], -1, dim) for c in calls]
    g = gs[0] if len(gs) == 1 else torch.cat(gs, 1)  # [b, T, d]
    if module.padding_idx is not None:  # padding positions get no gradient (as in PyTorch): zero them
        g = g.masked_fill((idx == module.padding_idx).unsqueeze(2), 0.0)
    norm_sq = _segment_norm_sq(idx, g)
    flat_idx = idx.reshape(-1)

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        gs = scaled_rows(g, scale).reshape(-1, dim)
        dw = torch.zeros(num, dim, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, gs)
        return {"weight": dw}

    return LayerGrads(norm_sq, grads)
