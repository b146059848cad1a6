"""nn.Conv1d / nn.Conv2d: unfold, then the Linear maths per group.

Per sample, a convolution is a Linear over the L output positions: activations ``U_i`` = unfolded input
patches [L, C_in/g·k], backprops ``G_i`` [L, C_out/g], per group. Norms use the Gram form when
L²(d_in+d_out) is cheaper than materialising (small feature maps) and otherwise materialise per-sample
weight gradients chunk by chunk (unfolding only a chunk of samples at a time, to bound memory); the
materialised gradients then also give the layer gradient as a weighted sum. On the Gram path the layer
gradient comes from ATen's own ``convolution_backward`` with scaled backprops, i.e. the same kernel as a
normal backward. Stride, padding (ints, 'same', 'valid', non-zero padding modes), dilation and groups
are handled by padding explicitly where needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    MATERIALISE_BUDGET,
    Call,
    LayerGrads,
    Request,
    register_kernel,
    scaled_rows,
    sq_norms,
    trainable,
    weighted_sum,
)
from .linear import use_gram


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
    x: Tensor, is_1d: bool, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int], pad: tuple[int, ...]
) -> Tensor:
    if is_1d:
        x = x.unsqueeze(2)
        p2 = (0, pad[0])
    else:
        p2 = (pad[0], pad[1])
    return F.unfold(x, k, dilation=d, padding=p2, stride=s)  # [c, C_in·kh·kw, L]


def _per_sample(
    module: nn.Conv1d | nn.Conv2d, x: Tensor, pad: tuple[int, ...], g: Tensor, weight: Tensor
) -> Tensor:
    """Per-sample weight gradients [n, *weight.shape]: the conv's weight backward with the batch folded into
    the channel dim and ``groups × n`` groups (one fused ATen call, no unfold buffer)."""
    n = x.shape[0]
    _, dw, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * g.shape[1], *g.shape[2:]), x.reshape(1, n * x.shape[1], *x.shape[2:]),
        weight.repeat(n, *[1] * (weight.dim() - 1)), None, list(module.stride), list(pad),
        list(module.dilation), False, [0] * len(pad), module.groups * n, [False, True, False],
    )  # fmt: skip
    return dw.reshape(n, *weight.shape)


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
    if want_b:
        gb = sum(g.reshape(b, c_out, -1).sum(2) for g in gs)
        assert isinstance(gb, Tensor)
        norm_sq += sq_norms(gb)
    gram = use_gram(t, d_in, d_out)
    eager_scale = None if req.deferred else req.scale
    dw_acc: Tensor | None = None
    weight = module.weight.detach()
    if want_w:
        if gram:  # small feature maps: ⟨U Uᵀ, G Gᵀ⟩ over output positions, per group
            chunk = max(1, MATERIALISE_BUDGET // (groups * (d_in * t + 2 * t * t)))
            for lo in range(0, b, chunk):
                hi = min(b, lo + chunk)
                us = [_unfold(x[lo:hi], is_1d, k, s, d, pad) for x, pad in inputs]
                u = (us[0] if len(us) == 1 else torch.cat(us, 2)).reshape(hi - lo, groups, d_in, t)
                g = torch.cat([gg[lo:hi].reshape(hi - lo, c_out, -1) for gg in gs], 2)
                g = g.reshape(hi - lo, groups, d_out, t)
                gu = torch.einsum("cgit,cgis->cgts", u, u)
                gg2 = torch.einsum("cgot,cgos->cgts", g, g)
                norm_sq[lo:hi] += gu.mul_(gg2).sum((1, 2, 3))
                del gu, gg2, u, g, us
        else:  # materialise per-sample weight gradients with ATen's own conv backward, batch as groups
            chunk = max(1, MATERIALISE_BUDGET // weight.numel())
            if not req.deferred:
                dw_acc = torch.zeros_like(weight)
            for lo in range(0, b, chunk):
                hi = min(b, lo + chunk)
                ps = sum(
                    _per_sample(module, x[lo:hi], pad, g[lo:hi], weight)
                    for (x, pad), g in zip(inputs, gs, strict=True)
                )
                assert isinstance(ps, Tensor)
                norm_sq[lo:hi] += sq_norms(ps)
                if dw_acc is not None:
                    dw_acc += weighted_sum(ps, None if eager_scale is None else eager_scale[lo:hi])
                del ps

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
        if want_b:
            gb2 = sum(scaled_rows(g, scale).reshape(b, c_out, -1).sum((0, 2)) for g in gs)
            assert isinstance(gb2, Tensor)
            out["bias"] = gb2
        return out

    return LayerGrads(norm_sq, grads)
