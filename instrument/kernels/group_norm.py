"""nn.GroupNorm: materialised per-sample gradients (B × 2C), from the recomputed normalised input."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel
from .normalization import materialised


@register_kernel(nn.GroupNorm)
def group_norm_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.GroupNorm)

    def per_sample(call: Call) -> dict[str, Tensor]:
        x, g = call.input, call.grad_output
        b, c = x.shape[0], x.shape[1]
        # x̂ from ATen's own group norm without affine (one fused pass instead of var_mean + arithmetic)
        xhat = F.group_norm(x, module.num_groups, None, None, module.eps).reshape(b, c, -1)
        g3 = g.reshape(b, c, -1)
        return {"weight": (g3 * xhat).sum(2), "bias": g3.sum(2)}

    return materialised(module, calls, per_sample)
