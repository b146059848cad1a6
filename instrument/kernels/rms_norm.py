"""nn.RMSNorm: materialised per-sample weight gradients (B × d), from the recomputed normalised input."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel
from .normalization import materialised, reduce_to


@register_kernel(nn.RMSNorm)
def rms_norm_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.RMSNorm)
    n = len(module.normalized_shape)

    def per_sample(call: Call) -> dict[str, Tensor]:
        x, g = call.input, call.grad_output
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        dims = tuple(range(x.dim() - n, x.dim()))
        xhat = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + eps)
        return {"weight": reduce_to(g * xhat, n)}

    return materialised(module, calls, per_sample)
