"""Shared helper for the affine normalisation layers (LayerNorm, GroupNorm, RMSNorm).

Their parameters are small (2·C or 2·d), so per-sample gradients are materialised ([B, P]): the weight
gradient of sample i is ``Σ_positions G_i ⊙ x̂_i`` and the bias gradient ``Σ_positions G_i``, with ``x̂``
the normalised input recomputed from the captured input. Norms and (routed) layer gradients both come
from these [B, P] tensors.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import Call, LayerGrads, sq_norms, trainable, weighted_sum

PerSample = Callable[[Call], dict[str, Tensor]]


def materialised(module: nn.Module, calls: list[Call], per_sample: PerSample) -> LayerGrads:
    """Sum per-call per-sample gradients (weight reuse), then norms and weighted sums over dim 0."""
    params = trainable(module)
    total: dict[str, Tensor] = {}
    for call in calls:
        for name, g in per_sample(call).items():
            if name in params:
                total[name] = g if name not in total else total[name] + g
    b = next(iter(total.values())).shape[0]
    norm_sq = torch.zeros(b, dtype=calls[0].grad_output.dtype, device=calls[0].grad_output.device)
    for g in total.values():
        norm_sq += sq_norms(g)

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        return {n: weighted_sum(g, scale) for n, g in total.items()}

    return LayerGrads(norm_sq, grads)


def reduce_to(t: Tensor, keep_trailing: int) -> Tensor:
    """Sum ``t`` [b, ..., *tail] over every dim between the batch dim and the last ``keep_trailing`` dims."""
    lead = t.dim() - 1 - keep_trailing
    if lead <= 0:
        return t
    return t.sum(tuple(range(1, 1 + lead)))
