"""nn.LayerNorm: materialised per-sample gradients (B × 2d) from the normalised input x̂.

x̂ = (x - mean)·rstd with the mean and rstd that the layer's own autograd node saved in the forward pass
(``capture``): no second normalisation pass. When the call left no such node (its input did not require
grad, a functorch transform, another backend's node), x̂ is recomputed with ATen's layer norm.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel
from .normalization import materialised, reduce_to


def _saved_stats(output: Any) -> tuple[Tensor, Tensor] | None:
    """(mean, rstd) from the output's ``NativeLayerNormBackward0`` node ([*, 1, ...], broadcastable to x)."""
    fn = getattr(output, "grad_fn", None)
    if fn is None or type(fn).__name__ != "NativeLayerNormBackward0":
        return None
    mean, rstd = fn._saved_result1, fn._saved_result2
    if not isinstance(mean, Tensor) or not isinstance(rstd, Tensor) or mean.dim() != output.dim():
        return None
    return mean, rstd


@register_kernel(nn.LayerNorm, capture=_saved_stats)
def layer_norm_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.LayerNorm)
    n = len(module.normalized_shape)

    def per_sample(call: Call) -> dict[str, Tensor]:
        x, g = call.input, call.grad_output
        if call.saved is not None:
            mean, rstd = call.saved
            xhat = (x - mean).mul_(rstd)
        else:  # ATen's own layer norm without affine (one fused pass; var_mean + arithmetic was ~5x slower)
            xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
        # a fresh tensor in g's dtype (under autocast the input can be narrower than the output), so in place
        return {"weight": reduce_to(xhat.to(g.dtype).mul_(g), n), "bias": reduce_to(g, n)}

    return materialised(module, calls, per_sample)
