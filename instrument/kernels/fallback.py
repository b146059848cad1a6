"""Exact fallback for any other parametrised module: ``torch.func`` per-sample VJPs on that module alone.

For each call, ``vmap`` over samples of ``vjp(functional_call(module, params, x_i), g_i)`` gives the
per-sample gradients of the module's (whole subtree's) trainable parameters from the captured inputs and
backprops: B × P memory for this one module only. A module whose samples interact (its per-sample
gradients do not add up to the batch gradient), or whose inputs are not batch-first, is caught by a
check against one full-batch VJP and raises instead of recording wrong numbers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .base import Call, LayerGrads, Request, sq_norms, weighted_sum


def _batch_dim(module: nn.Module) -> int:
    return 1 if getattr(module, "batch_first", True) is False else 0


def _in_dims(tree: Any, b: int, bd: int) -> Any:
    def dim(t: Any) -> int | None:
        if isinstance(t, Tensor) and t.dim() > bd and t.shape[bd] == b:
            return bd
        return None

    return tree_map(dim, tree)


def _per_sample(module: nn.Module, params: dict[str, Tensor], call: Call, b: int) -> dict[str, Tensor]:
    bd = _batch_dim(module)
    grads = [call.grad(j) for j in range(len(call.tapped))]

    def outputs(p: dict[str, Tensor], args: Any, kwargs: Any) -> tuple[Tensor, ...]:
        out = functional_call(module, p, tuple(args), kwargs)
        leaves, _ = tree_flatten(out)
        return tuple(leaves[i] for i in call.tapped)

    # batch dim of each output: probe one sample (no grad) and compare with the full output shapes
    def take0(t: Any, d: int | None) -> Any:
        return t.narrow(d, 0, 1) if d is not None else t

    arg_dims = _in_dims(list(call.args), b, bd)
    kw_dims = _in_dims(call.kwargs, b, bd)
    a_leaves, a_spec = tree_flatten(list(call.args))
    ad_leaves, _ = tree_flatten(arg_dims)
    k_leaves, k_spec = tree_flatten(call.kwargs)
    kd_leaves, _ = tree_flatten(kw_dims)
    if b == 1:
        out_dims: list[int] = [0] * len(grads)
    else:
        with torch.no_grad():
            probe = outputs(
                params,
                tree_unflatten([take0(t, d) for t, d in zip(a_leaves, ad_leaves, strict=True)], a_spec),
                tree_unflatten([take0(t, d) for t, d in zip(k_leaves, kd_leaves, strict=True)], k_spec),
            )
        out_dims = []
        for j, (o, meta) in enumerate(zip(probe, call.out_meta, strict=True)):
            shape = meta[0]
            cand = [d for d in range(len(shape)) if shape[d] == b and o.shape[d] == 1]
            if not cand:
                raise RuntimeError(f"cannot find the batch dimension of output {j} (shape {tuple(shape)})")
            out_dims.append(cand[0])

    def one(p: dict[str, Tensor], args: Any, kwargs: Any, gs: tuple[Tensor, ...]) -> dict[str, Tensor]:
        def unsq(t: Any, d: int | None) -> Any:
            return t.unsqueeze(d) if d is not None else t

        a = tree_unflatten(
            [unsq(t, d) for t, d in zip(tree_flatten(args)[0], ad_leaves, strict=True)], a_spec
        )
        k = tree_unflatten(
            [unsq(t, d) for t, d in zip(tree_flatten(kwargs)[0], kd_leaves, strict=True)], k_spec
        )
        pull = vjp(lambda q: outputs(q, a, k), p)[1]
        (gp,) = pull(tuple(g.unsqueeze(d) for g, d in zip(gs, out_dims, strict=True)))
        return gp

    if b == 1:
        pull = vjp(lambda q: outputs(q, list(call.args), call.kwargs), params)[1]
        (gp,) = pull(tuple(grads))
        return {n: g.unsqueeze(0) for n, g in gp.items()}
    per = vmap(one, in_dims=(None, arg_dims, kw_dims, tuple(out_dims)))(
        params, list(call.args), call.kwargs, tuple(grads)
    )
    # safety net: per-sample gradients must add up to the batch gradient of this call
    pull = vjp(lambda q: outputs(q, list(call.args), call.kwargs), params)[1]
    (full,) = pull(tuple(grads))
    for n, g in full.items():
        tol = 1e-4 if g.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
        scale = float(g.abs().max()) if g.numel() else 0.0
        if not torch.allclose(per[n].sum(0), g, rtol=tol, atol=tol * max(scale, 1e-30)):
            raise RuntimeError(
                f"per-sample gradients of parameter {n!r} do not add up to the batch gradient: the module mixes "
                "samples or its inputs are not batch-first"
            )
    return per


def fallback_kernel(module: nn.Module, calls: list[Call], req: Request) -> LayerGrads:
    """Per-sample gradients of the module's whole subtree via torch.func; B × P for this module only."""
    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    b = _rows(module, calls[0])
    total: dict[str, Tensor] | None = None
    for call in calls:
        try:
            per = _per_sample(module, params, call, b)
        except Exception as exc:  # name the layer in whatever went wrong
            raise RuntimeError(f"exact per-sample fallback (torch.func) failed: {exc}") from exc
        total = per if total is None else {n: total[n] + per[n] for n in total}
    assert total is not None
    norm_sq = sum(sq_norms(g) for g in total.values())
    assert isinstance(norm_sq, Tensor)
    per_sample = total

    def grads(scale: Tensor | None) -> dict[str, Tensor]:
        return {n: weighted_sum(g, scale) for n, g in per_sample.items()}

    return LayerGrads(norm_sq, grads)


def _rows(module: nn.Module, call: Call) -> int:
    bd = _batch_dim(module)
    for t in (*call.args, *call.kwargs.values()):
        if isinstance(t, Tensor) and t.dim() > bd:
            return int(t.shape[bd])
    raise RuntimeError("no batched tensor input")
