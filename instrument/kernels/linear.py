"""nn.Linear: per-sample norms from activations and backprops, never B×P unless that is cheaper.

For one sample with activations ``X_i`` [T, d_in] and backprops ``G_i`` [T, d_out] the weight gradient is
``G_iᵀ X_i``. Its squared norm is either

* the Gram ("ghost") form ``⟨X_i X_iᵀ, G_i G_iᵀ⟩``: ~T²(d_in+d_out) flops, T² memory per sample; for
  T = 1 (2-D inputs) this is ``‖g_i‖²‖a_i‖²``, or
* the materialised form ``‖G_iᵀ X_i‖²``: ~T·d_in·d_out flops, computed in bounded chunks of samples, whose
  per-sample gradients then also give the (routed) layer gradient as a weighted sum, saving the GEMM.

``linear_parts`` picks the cheaper per layer and per call shape. Several calls of one module in a
forward (weight reuse) are concatenated along T, which makes the cross terms exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .base import (
    MATERIALISE_BUDGET,
    Call,
    LayerGrads,
    Request,
    budget_for,
    reduce_per_sample,
    register_kernel,
    scaled_rows,
    sq_norms,
    trainable,
    weighted_sum,
)

PartGrads = Callable[[Tensor | None], tuple[Tensor | None, Tensor | None]]


def use_gram(t: int, d_in: int, d_out: int, deferred: bool = False) -> bool:
    """Per layer, the cheaper exact way, by a cost model in units of the layer's weight-gradient GEMM.

    Gram: two batched T×T products, T²(d_in+d_out) flops per sample, i.e. r = T(d_in+d_out)/(d_in·d_out)
    GEMMs, measured at ~1.1·r extra. Materialising replaces the GEMM by the batched per-sample product
    (the same flops, a short inner dim T) plus a norm and a GEMV pass over each chunk while it is in cache:
    measured ≈ 12/T GEMMs extra (0.2-0.5 at T=32, 0.1-0.15 at T=128, ~1 at T=16). With per-sample
    clipping (``deferred``) the per-sample gradients are not kept, so the GEMM runs as well: +1. CPU, one
    thread, B=64, d in 32..512, T in 2..128 (BENCHMARKS.md); e.g. T=32: Gram for 512x512, materialise for
    64x64 .. 64x512.
    """
    if t == 1:
        return True
    return 1.1 * t * (d_in + d_out) / (d_in * d_out) <= 12.0 / t + (1.0 if deferred else 0.0)


def _weight_gemm(x: Tensor, g: Tensor, scale: Tensor | None) -> Tensor:
    """``Σ_i scale_i G_iᵀ X_i`` as the one GEMM a plain backward runs, over flattened rows [b·T, d].

    The rows of whichever side is smaller are scaled (the same product, a smaller copy).
    """
    d_in, d_out = x.shape[-1], g.shape[-1]
    if scale is not None and d_in < d_out:
        x = scaled_rows(x, scale)
    else:
        g = scaled_rows(g, scale)
    return g.reshape(-1, d_out).t().mm(x.reshape(-1, d_in))


def linear_parts(
    x: Tensor, g: Tensor, want_weight: bool, want_bias: bool, req: Request
) -> tuple[Tensor, PartGrads]:
    """Squared per-sample norms and a gradient maker for ``y = x Wᵀ + b`` with x [b,T,d_in], g [b,T,d_out].

    The maker returns ``(dW [d_out, d_in], db [d_out])`` (None for parts not wanted).
    """
    b, t, d_in = x.shape
    d_out = g.shape[2]
    if t == 1 and want_weight:  # 2-D inputs: ‖g_i‖²(‖a_i‖² + [bias]) in four vector ops
        g_sq = sq_norms(g)
        x_sq = sq_norms(x)
        norm_sq = g_sq * (x_sq + 1.0) if want_bias else g_sq * x_sq

        def gemm_2d(scale: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            g2 = scaled_rows(g, scale).reshape(b, d_out)
            return g2.t().mm(x.reshape(b, d_in)), (g2.sum(0) if want_bias else None)

        return norm_sq, gemm_2d
    # per-sample bias gradients Σ_t G_it: their norms (a fresh tensor, which the weight norms are added to),
    # and (a GEMV) the layer's bias gradient
    gb = (g[:, 0, :] if t == 1 else g.sum(1)) if want_bias else None
    norm_sq = torch.zeros(b, dtype=g.dtype, device=g.device) if gb is None else sq_norms(gb)

    def bias(scale: Tensor | None) -> Tensor | None:
        return None if gb is None else weighted_sum(gb, scale)

    if not want_weight:
        return norm_sq, lambda scale: (None, bias(scale))

    if use_gram(t, d_in, d_out, req.deferred):
        gram_x = torch.bmm(x, x.transpose(1, 2))
        gram_g = torch.bmm(g, g.transpose(1, 2))
        norm_sq += gram_x.mul_(gram_g).sum((1, 2))
        del gram_x, gram_g
        return norm_sq, lambda scale: (_weight_gemm(x, g, scale), bias(scale))

    # materialise per-sample weight gradients G_iᵀ X_i, chunk by chunk, to bound memory
    def make(lo: int, hi: int, out: Tensor) -> Tensor:
        ps = torch.bmm(g[lo:hi].transpose(1, 2), x[lo:hi], out=out.view(hi - lo, d_out, d_in))
        return ps.view(hi - lo, d_out * d_in)

    chunk = budget_for(MATERIALISE_BUDGET, g.device) // (d_in * d_out)
    eager_scale = None if req.deferred else req.scale
    dw = reduce_per_sample(b, d_in * d_out, chunk, make, norm_sq, eager_scale, keep_sum=not req.deferred)

    def from_parts(scale: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if dw is not None and scale is eager_scale:
            return dw.view(d_out, d_in), bias(scale)
        return _weight_gemm(x, g, scale), bias(scale)

    return norm_sq, from_parts


def _as_seq(t: Tensor) -> Tensor:
    """[b, *, d] → [b, T, d] (a view when possible)."""
    if t.dim() < 2:
        raise ValueError(
            f"expected a batched input of shape [batch, ..., features], got shape {tuple(t.shape)}"
        )
    return t.reshape(t.shape[0], -1, t.shape[-1])


def _linear_2d(x: Tensor, g: Tensor, want_bias: bool) -> LayerGrads:
    """One call with 2-D input [b, d_in]: ‖g_i‖²‖a_i‖² (+ ‖g_i‖² for the bias) in five small vector ops, and
    the weight gradient as the one GEMM a plain backward runs (the hot path of an MLP: nothing else)."""
    g_sq = torch.linalg.vector_norm(g, dim=1).square_()
    x_sq = torch.linalg.vector_norm(x, dim=1).square_()
    norm_sq = torch.addcmul(g_sq, g_sq, x_sq) if want_bias else g_sq.mul_(x_sq)

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        gs = g if scale is None else g * scale.to(g.dtype).unsqueeze(1)
        if want_bias:
            return {"weight": gs.t().mm(x), "bias": gs.sum(0)}
        return {"weight": gs.t().mm(x)}

    return LayerGrads(norm_sq, grads)


@register_kernel(nn.Linear)
def linear_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    params = trainable(module)
    if len(calls) == 1 and "weight" in params:
        x = calls[0].input
        if x.dim() == 2:
            return _linear_2d(x, calls[0].grad_output, "bias" in params)
    xs = [_as_seq(c.input) for c in calls]
    gs = [_as_seq(c.grad_output) for c in calls]
    x = xs[0] if len(xs) == 1 else torch.cat(xs, 1)
    g = gs[0] if len(gs) == 1 else torch.cat(gs, 1)
    norm_sq, parts = linear_parts(x, g, "weight" in params, "bias" in params, req)

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        dw, db = parts(scale)
        out: dict[str, Tensor] = {}
        if dw is not None:
            out["weight"] = dw
        if db is not None:
            out["bias"] = db
        return out

    return LayerGrads(norm_sq, grads)
