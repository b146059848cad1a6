"""One-call per-sample, per-layer gradient norms, built on ``GradNormEngine``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .engine import GradNormEngine


def per_sample_grad_norms(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], Tensor],
    inputs: Any,
    targets: Any,
    loss_reduction: str = "mean",
) -> dict[str, Tensor]:
    """Norm of each sample's own loss gradient, per layer: ``{layer name: tensor [B]}``.

    ``loss_fn(model(inputs), targets)`` must return the batch loss reduced with ``loss_reduction``
    ("mean" or "sum"); per-sample norms follow the Opacus convention (the gradient of the sample's own
    loss whatever the reduction). The model's existing ``.grad`` values are left untouched.
    """
    engine = GradNormEngine(model, loss_reduction=loss_reduction)
    batch = inputs.shape[0] if isinstance(inputs, Tensor) else len(inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        engine.begin(int(batch))
        try:
            with torch.enable_grad():
                loss = loss_fn(model(inputs), targets)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar tensor (the reduced batch loss)")
                loss.backward()
        finally:
            result = engine.end()
    finally:
        engine.remove()
        for p, g in zip(params, saved, strict=True):
            p.grad = g
    return {name: result.norms[:, i].detach() for i, name in enumerate(engine.layer_names)}
