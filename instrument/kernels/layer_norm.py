"""nn.LayerNorm: materialised per-sample gradients (B × 2d) from the normalised input x̂.

x̂ = (x - mean)·rstd with the mean and rstd that the layer's own autograd node saved in the forward pass
(``capture``): no second normalisation pass. When the call left no such node (its input did not require
grad, a functorch transform, another backend's node), x̂ is recomputed with ATen's layer norm.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, LayerGrads, Request, register_kernel, trainable, weighted_sum
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

    def xhat_of(call: Call) -> Tensor:
        x = call.input
        if call.saved is not None:
            mean, rstd = call.saved
            return (x - mean).mul_(rstd)
        # ATen's own layer norm without affine (one fused pass; var_mean + arithmetic was ~5x slower)
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)

    params = trainable(module)
    if len(calls) != 1 or set(params) != {"weight", "bias"}:

        def per_sample(call: Call) -> dict[str, Tensor]:
            g = call.grad_output
            # a fresh tensor in g's dtype (under autocast the input can be narrower than the output), so in place
            return {"weight": reduce_to(xhat_of(call).to(g.dtype).mul_(g), n), "bias": reduce_to(g, n)}

        return materialised(module, calls, per_sample)

    # the common case (one call, weight and bias): both per-sample gradients side by side in one [b, 2, P]
    # tensor, so one norm and, per parameter, one GEMV (instead of a norm, square and add per parameter and
    # a tensordot each: a dozen small ops per layer, ~10 µs each inside a training step)
    call = calls[0]
    g = call.grad_output
    b, dt, dev = g.shape[0], g.dtype, g.device
    ps = torch.empty((b, 2, *module.normalized_shape), dtype=dt, device=dev)
    dims = tuple(range(1, g.dim() - n))
    prod = xhat_of(call).to(g.dtype).mul_(g)
    if dims:
        torch.sum(prod, dims, out=ps[:, 0])
        torch.sum(g, dims, out=ps[:, 1])
    else:
        ps[:, 0] = prod
        ps[:, 1] = g
    del prod, g  # the gradient maker keeps only ps (B x 2P), as the generic path does
    flat = ps.view(b, 2, -1)
    norm_sq = torch.linalg.vector_norm(flat, dim=(1, 2)).square_()

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        shape = module.normalized_shape
        return {
            "weight": weighted_sum(flat[:, 0], scale).view(shape),
            "bias": weighted_sum(flat[:, 1], scale).view(shape),
        }

    return LayerGrads(norm_sq, grads)
