"""Oracle helpers for the engine tests: per-sample gradients from torch.func (vmap(grad(functional_call))).

The oracle shares no code with the engine: it differentiates each sample's own loss through the whole
model, then groups parameters into layers by the longest layer-name prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from instrument import GradNormEngine


def per_sample_loss(out: Tensor, target: Tensor) -> Tensor:
    """A sample-separable loss with non-trivial gradients for any output shape: [B]."""
    return (out * target + 0.1 * out.square()).reshape(out.shape[0], -1).sum(1)


def reduce(per: Tensor, reduction: str) -> Tensor:
    return per.mean() if reduction == "mean" else per.sum()


def oracle_grads(model: nn.Module, x: Any, target: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of each sample's own loss, every trainable parameter: {name: [B, *shape]}."""
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def loss_one(p: dict[str, Tensor], xi: Any, ti: Tensor) -> Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return per_sample_loss(out, ti.unsqueeze(0)).sum()

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, target)


def layer_of(param: str, layers: list[str]) -> str:
    best = None
    for name in layers:
        if (name == "" or param.startswith(name + ".")) and (best is None or len(name) > len(best)):
            best = name
    assert best is not None, f"parameter {param} belongs to no layer"
    return best


def oracle_norms(per_sample: dict[str, Tensor], layers: list[str]) -> Tensor:
    """[B, L] norms of the per-sample gradients grouped by layer."""
    b = next(iter(per_sample.values())).shape[0]
    sq = torch.zeros(b, len(layers), dtype=torch.float64)
    for name, g in per_sample.items():
        sq[:, layers.index(layer_of(name, layers))] += g.reshape(b, -1).double().square().sum(1)
    return sq.sqrt()


def assert_rel_close(got: Tensor, ref: Tensor, tol: float, what: str = "") -> None:
    got, ref = got.double(), ref.double()
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    err = float((got - ref).abs().max()) / max(scale, 1e-300)
    assert err < tol, f"{what}: relative error {err:.3e} >= {tol:.0e}"


def run_engine(
    model: nn.Module,
    x: Any,
    target: Tensor,
    reduction: str,
    weights: Tensor | None = None,
    max_grad_norm: float | None = None,
    forward: Callable[[nn.Module, Any], Tensor] | None = None,
) -> tuple[GradNormEngine, Tensor, Tensor | None, dict[str, Tensor]]:
    """One armed step; returns (engine, norms [B, L], clip factors, {param: .grad})."""
    model.zero_grad(set_to_none=True)
    engine = GradNormEngine(model, loss_reduction=reduction)
    b = x.shape[0]
    engine.begin(b, weights=weights, max_grad_norm=max_grad_norm)
    out = forward(model, x) if forward else model(x)
    reduce(per_sample_loss(out, target), reduction).backward()
    res = engine.end()
    engine.remove()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return engine, res.norms, res.clip_factors, grads


def plain_grads(model: nn.Module, x: Any, target: Tensor, reduction: str) -> dict[str, Tensor]:
    model.zero_grad(set_to_none=True)
    reduce(per_sample_loss(model(x), target), reduction).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def check_model(model: nn.Module, x: Any, reduction: str, tol: float = 1e-6, seed: int = 0) -> GradNormEngine:
    """Engine norms vs the torch.func oracle, and engine .grad vs plain autograd."""
    torch.manual_seed(seed)
    with torch.no_grad():
        target = torch.randn_like(model(x))
    engine, norms, _, grads = run_engine(model, x, target, reduction)
    per = oracle_grads(model, x, target)
    ref = oracle_norms(per, engine.layer_names)
    for i, name in enumerate(engine.layer_names):
        assert_rel_close(norms[:, i], ref[:, i], tol, f"norm of layer {name!r}")
    plain = plain_grads(model, x, target, reduction)
    assert grads.keys() == plain.keys()
    for n in plain:
        assert_rel_close(grads[n], plain[n], tol, f".grad of {n}")
    # the oracle's batch gradient agrees too (sum of per-sample grads, / B for mean)
    b = x.shape[0]
    for n, g in per.items():
        assert_rel_close(grads[n], g.sum(0) / (b if reduction == "mean" else 1), tol, f"oracle .grad of {n}")
    return engine
