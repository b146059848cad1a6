"""nn.Conv1d / nn.Conv2d: unfold, then the Linear maths per group.

Per sample, a convolution is a Linear over the L output positions: activations ``U_i`` = unfolded input
patches [L, C_in/g·k], backprops ``G_i`` [L, C_out/g], per group. Norms use the Gram form when
L²(d_in+d_out) is cheaper than materialising (small feature maps) and otherwise materialise per-sample
weight gradients chunk by chunk (L2-sized chunks, which bounds memory): either with ATen's conv weight
backward with the batch folded into groups, or as unfolded patches times backprops in one batched GEMM,
whichever was measured faster for the layer's shape (``_grouped_backward_is_faster``); the materialised
gradients then also give the layer gradient as a weighted sum. On the Gram path the layer
gradient comes from ATen's own ``convolution_backward`` with scaled backprops, i.e. the same kernel as a
normal backward. Stride, padding (ints, 'same', 'valid', non-zero padding modes), dilation and groups
are handled by padding explicitly where needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
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


def _as_2d(module: nn.Conv1d | nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    if isinstance(module, nn.Conv1d):
        return (1, module.kernel_size[0]), (1, module.stride[0]), (1, module.dilation[0])
    k, s, d = module.kernel_size, module.stride, module.dilation
    return (k[0], k[1]), (s[0], s[1]), (d[0], d[1])


def _padded(module: nn.Conv1d | nn.Conv2d, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """Input and the padding to pass to unfold/convolution_backward, mirroring the module's forward."""
    if module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return x, tuple(module.padding)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    pad = module._reversed_padding_repeated_twice
    if any(pad):
        x = F.pad(x, pad, mode=mode)
    return x, (0,) * (x.dim() - 2)


def _unfold(
    x: Tensor,
    is_1d: bool,
    k: tuple[int, int],
    s: tuple[int, int],
    d: tuple[int, int],
    pad: tuple[int, ...],
    out: Tensor | None = None,
) -> Tensor:
    """Patches [n, C_in·kh·kw, L] exactly as ``F.unfold``, built from kh·kw strided slices of the padded input.

    ATen's CPU ``im2col`` behind ``F.unfold`` runs one sample and channel at a time and was 1-3x slower than
    these kh·kw vectorised slice copies (one ``stack``); the (channel, kh, kw) order matches the weight's.
    ``out``: a flat buffer of at least n·C_in·kh·kw·L elements to write the patches into (reused by chunks).
    """
    if is_1d:
        x = x.unsqueeze(2)
        p2 = (0, pad[0])
    else:
        p2 = (pad[0], pad[1])
    if p2[0] or p2[1]:
        x = F.pad(x, (p2[1], p2[1], p2[0], p2[0]))
    n, c, h, w = x.shape
    ho = (h - d[0] * (k[0] - 1) - 1) // s[0] + 1
    wo = (w - d[1] * (k[1] - 1) - 1) // s[1] + 1
    cols = [
        x[
            :,
            :,
            i * d[0] : i * d[0] + s[0] * (ho - 1) + 1 : s[0],
            j * d[1] : j * d[1] + s[1] * (wo - 1) + 1 : s[1],
        ]
        for i in range(k[0])
        for j in range(k[1])
    ]
    if out is None:
        return torch.stack(cols, 2).reshape(n, c * k[0] * k[1], ho * wo)
    dst = out[: n * c * k[0] * k[1] * ho * wo].view(n, c, k[0] * k[1], ho, wo)
    return torch.stack(cols, 2, out=dst).view(n, c * k[0] * k[1], ho * wo)


def _per_sample(
    module: nn.Conv1d | nn.Conv2d, x: Tensor, pad: tuple[int, ...], g: Tensor, weights: Tensor
) -> Tensor:
    """Per-sample weight gradients [n, weight numel]: the conv's weight backward with the batch folded into
    the channel dim and ``groups × n`` groups (one fused ATen call, no unfold buffer). ``weights``: the
    weight repeated for at least n samples (only its shape matters to a weight-only backward)."""
    n = x.shape[0]
    c_out = module.out_channels
    _, dw, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * g.shape[1], *g.shape[2:]), x.reshape(1, n * x.shape[1], *x.shape[2:]),
        weights[: n * c_out], None, list(module.stride), list(pad),
        list(module.dilation), False, [0] * len(pad), module.groups * n, [False, True, False],
    )  # fmt: skip
    return dw.reshape(n, -1)


PER_SAMPLE_MODE = "auto"  # "auto" | "groups" | "unfold": forces one way (experiments only)
# Elements per chunk of unfolded patches + per-sample gradients: 1 MiB in float32, so a chunk stays in L2 while
# its norms and weighted sum read it back, and the layer's extra memory stays ~1 MiB. Measured on the CNN of
# benchmarks/step_overhead.py: 2^21 (the Linear budget) cost 1.3-1.9x plain's peak memory and was slower;
# 2^17 and 2^16 were slower again (more, smaller GEMMs).
MATERIALISE_BUDGET = 1 << 18  # conv's own (smaller) value of base.MATERIALISE_BUDGET


def _grouped_backward_is_faster(module: nn.Conv1d | nn.Conv2d, t: int) -> bool:
    """Which way to materialise per-sample conv weight gradients (both exact; speed only).

    ATen's conv weight backward with the batch folded into groups needs no unfold buffer, and with 16-32
    input channels per group it matched or beat unfold + one batched GEMM; with an RGB input layer (3
    channels) it was 1.5x slower (CNN of BENCHMARKS.md, CPU, one thread: 6.5 vs 4.3 ms at B=64).
    """
    if PER_SAMPLE_MODE != "auto":
        return PER_SAMPLE_MODE == "groups"
    return module.in_channels // module.groups >= 8


@register_kernel(nn.Conv1d, nn.Conv2d)
def conv_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    assert isinstance(module, nn.Conv1d | nn.Conv2d)
    params = trainable(module)
    want_w, want_b = "weight" in params, "bias" in params
    is_1d = isinstance(module, nn.Conv1d)
    k, s, d = _as_2d(module)
    groups = module.groups
    c_out = module.out_channels
    d_out = c_out // groups
    d_in = module.in_channels // groups * k[0] * k[1]
    inputs = [_padded(module, c.input) for c in calls]
    gs = [c.grad_output for c in calls]
    b = gs[0].shape[0]
    t = sum(int(g[0, 0].numel()) for g in gs)  # output positions over all calls
    dev, dt = gs[0].device, gs[0].dtype
    norm_sq = torch.zeros(b, dtype=dt, device=dev)
    gb: Tensor | None = None  # per-sample bias gradients [b, c_out]: their norms and (a GEMV) the bias grad
    if want_b:
        for g in gs:
            part = g.reshape(b, c_out, -1).sum(2)
            gb = part if gb is None else gb + part
        assert gb is not None
        norm_sq += sq_norms(gb)
    gram = t * (d_in + d_out) <= d_in * d_out  # flops: L²(d_in+d_out) vs L·d_in·d_out per sample
    eager_scale = None if req.deferred else req.scale
    dw_acc: Tensor | None = None
    weight = module.weight.detach()
    budget = budget_for(MATERIALISE_BUDGET, dev)
    if want_w:
        if gram:  # small feature maps: ⟨U Uᵀ, G Gᵀ⟩ over output positions, per group
            chunk = max(1, budget // (groups * (d_in * t + 2 * t * t)))
            for lo in range(0, b, chunk):
                hi = min(b, lo + chunk)
                us = [_unfold(x[lo:hi], is_1d, k, s, d, pad) for x, pad in inputs]
                u = (us[0] if len(us) == 1 else torch.cat(us, 2)).reshape((hi - lo) * groups, d_in, t)
                g = torch.cat([gg[lo:hi].reshape(hi - lo, c_out, -1) for gg in gs], 2)
                g = g.reshape((hi - lo) * groups, d_out, t)
                gu = torch.bmm(u.transpose(1, 2), u)
                gg2 = torch.bmm(g.transpose(1, 2), g)
                norm_sq[lo:hi] += gu.mul_(gg2).reshape(hi - lo, -1).sum(1)
                del gu, gg2, u, g, us
        else:  # materialise per-sample weight gradients, a bounded chunk of samples at a time
            dw_acc = _materialise(module, inputs, gs, t, budget, norm_sq, eager_scale, not req.deferred)

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if want_w:
            if dw_acc is not None and scale is eager_scale:
                out["weight"] = dw_acc
            else:
                dw = None
                for (x, pad), g in zip(inputs, gs, strict=True):
                    _, part, _ = torch.ops.aten.convolution_backward(
                        scaled_rows(g, scale), x, weight, None, list(module.stride), list(pad),
                        list(module.dilation), False, [0] * len(pad), groups, [False, True, False],
                    )  # fmt: skip
                    dw = part if dw is None else dw + part
                assert dw is not None
                out["weight"] = dw
        if gb is not None:
            out["bias"] = weighted_sum(gb, scale)
        return out

    return LayerGrads(norm_sq, grads)


def _materialise(
    module: nn.Conv1d | nn.Conv2d,
    inputs: list[tuple[Tensor, tuple[int, ...]]],
    gs: list[Tensor],
    t: int,
    budget: int,
    norm_sq: Tensor,
    scale: Tensor | None,
    keep_sum: bool,
) -> Tensor | None:
    """Per-sample weight-gradient norms into ``norm_sq`` and (``keep_sum``) ``Σ_i scale_i·∇W_i`` shaped like
    the weight, via ``reduce_per_sample`` (one reused chunk buffer, a norm and a GEMV per chunk)."""
    weight = module.weight.detach()
    b, numel = gs[0].shape[0], weight.numel()
    groups, c_out = module.groups, module.out_channels
    d_out = c_out // groups
    d_in = weight[0].numel()
    if _grouped_backward_is_faster(module, t):
        chunk = min(b, max(1, budget // numel))
        weights = weight.repeat(chunk, *[1] * (weight.dim() - 1))  # once per layer, not per chunk

        def by_groups(lo: int, hi: int, out: Tensor) -> Tensor:
            ps = None
            for (x, pad), g in zip(inputs, gs, strict=True):
                part = _per_sample(module, x[lo:hi], pad, g[lo:hi], weights)
                ps = part if ps is None else ps + part
            assert ps is not None
            return ps

        acc = reduce_per_sample(b, numel, chunk, by_groups, norm_sq, scale, keep_sum, buffered=False)
        return None if acc is None else acc.view_as(weight)

    # unfolded patches Uᵢ [groups, d_in, L] times backprops Gᵢᵀ [groups, L, d_out]: per-sample gradients in
    # (group, d_in, d_out) order (measured 1.5x faster than Gᵢ Uᵢᵀ for an RGB layer); the norm does not care
    # about the order and the summed gradient is transposed back once
    is_1d = isinstance(module, nn.Conv1d)
    k, s, d = _as_2d(module)
    chunk = min(b, max(1, budget // (numel + groups * d_in * t)))
    ubuf = torch.empty(chunk * groups * d_in * t, dtype=weight.dtype, device=weight.device)

    def by_unfold(lo: int, hi: int, out: Tensor) -> Tensor:
        n = hi - lo
        if len(inputs) == 1:
            x, pad = inputs[0]
            u = _unfold(x[lo:hi], is_1d, k, s, d, pad, out=ubuf)
            g = gs[0][lo:hi].reshape(n, c_out, -1)
        else:  # weight reuse: positions of all calls side by side
            u = torch.cat([_unfold(x[lo:hi], is_1d, k, s, d, pad) for x, pad in inputs], 2)
            g = torch.cat([gg[lo:hi].reshape(n, c_out, -1) for gg in gs], 2)
        ps = out.view(n * groups, d_in, d_out)
        torch.bmm(u.reshape(n * groups, d_in, t), g.reshape(n * groups, d_out, t).transpose(1, 2), out=ps)
        return ps.view(n, numel)

    acc = reduce_per_sample(b, numel, chunk, by_unfold, norm_sq, scale, keep_sum)
    if acc is None:
        return None
    return acc.view(groups, d_in, d_out).transpose(1, 2).reshape(weight.shape)
