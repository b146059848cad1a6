"""nn.LayerNorm: materialised per-sample gradients (B × 2d), from the recomputed normalised input."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel
from .normalization import materialised, reduce_to


@register_kernel(nn.LayerNorm)
def layer_norm_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.LayerNorm)
    n = len(module.normalized_shape)

    def per_sample(call: Call) -> dict[str, Tensor]:
        x, g = call.input, call.grad_output
        dims = tuple(range(x.dim() - n, x.dim()))
        var, mean = torch.var_mean(x, dim=dims, keepdim=True, correction=0)
        xhat = (x - mean) * torch.rsqrt(var + module.eps)
        return {"weight": reduce_to(g * xhat, n), "bias": reduce_to(g, n)}

    return materialised(module, calls, per_sample)
