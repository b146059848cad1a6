"""Differential privacy for instrumented training: configuration, seeded Gaussian noise, Opacus accounting.

DP-SGD here is the Opacus recipe applied to the *routed* gradient:

1. flat per-sample clipping over all layers of the routed gradient, ``c_i = min(1, C / ||w_i ⊙ g_i||)``
   (done inside the backward by ``GradNormEngine.begin(..., max_grad_norm=C)``: the clipping must see every
   layer's norm first, so it is the engine's job);
2. Gaussian noise ``N(0, (σC)²)`` added to the summed gradient of EVERY trainable parameter, masked by the
   routing policy or not (the masks depend on private labels, so they must not decide where noise goes),
   divided by the batch size under a mean-reduced loss, exactly as Opacus's ``DPOptimizer`` does;
3. privacy accounting with Opacus's own accountants (``prv`` or ``rdp``), one accountant step per optimizer
   step with the configured (or derived) sample rate.

The noise comes from a ``torch.Generator`` on the model's device, seeded from ``DPConfig.seed`` (or a fresh
random seed that is recorded in the ``run`` entry), so a run can be replayed bit for bit on the same device.

Limits (stated, not hidden): the accountant assumes Poisson sampling at rate ``q`` as Opacus does; fixed-size
batches from an ordinary loader are the usual approximation. One micro-batch per optimizer step (gradient
accumulation under DP raises a clear error in the tracker).
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass
from typing import Any

import torch

# Opacus is imported where it is used: importing it costs seconds, and `import instrument` should not.

ACCOUNTANTS = ("prv", "rdp")


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings.

    ``sample_rate``: the probability that an example is in a given batch. ``None`` derives it at the first
    step as ``batch size / len(manifest)`` (the manifest passed to ``attach`` as ``labels=``).
    ``eps_every``: compute ε every this many steps (and on the last step before ``close``); steps in between
    record the latest ε with the step it was computed at. The PRV accountant costs ~0.1 s per evaluation on
    a small CPU, RDP is cheap here (its per-step RDP curve is cached).
    """

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    accountant: str = "prv"
    sample_rate: float | None = None
    seed: int | None = None
    eps_every: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, reason: str) -> ValueError:
            return ValueError(f"DPConfig.{name}: {reason}")

        if not (self.noise_multiplier >= 0.0):
            raise bad("noise_multiplier", f"must be >= 0, got {self.noise_multiplier!r}")
        if not (self.max_grad_norm > 0.0) or self.max_grad_norm == float("inf"):
            raise bad("max_grad_norm", f"must be a finite number > 0, got {self.max_grad_norm!r}")
        if not (0.0 < self.delta < 1.0):
            raise bad("delta", f"must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise bad("accountant", f"must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.sample_rate is not None and not (0.0 < self.sample_rate <= 1.0):
            raise bad("sample_rate", f"must be in (0, 1], got {self.sample_rate!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not 0 <= self.seed < 2**53):
            raise bad(
                "seed", f"must be an int in [0, 2**53) (it is recorded as a JSON number), got {self.seed!r}"
            )
        if isinstance(self.eps_every, bool) or not isinstance(self.eps_every, int) or self.eps_every < 1:
            raise bad("eps_every", f"must be an int >= 1, got {self.eps_every!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PrivacyAccountant:
    """ε so far for a DP-SGD schedule, using Opacus's accountants (history format and maths are theirs)."""

    def __init__(self, kind: str, delta: float) -> None:
        if kind not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {kind!r} (one of: {', '.join(ACCOUNTANTS)})")
        from opacus.accountants import PRVAccountant, RDPAccountant

        self.kind, self.delta = kind, delta
        self.accountant: Any = PRVAccountant() if kind == "prv" else RDPAccountant()
        self._rdp_cache: dict[tuple[float, float], Any] = {}

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.accountant.history)

    def step(self, noise_multiplier: float, sample_rate: float) -> None:
        self.accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self) -> float:
        """ε spent so far at ``delta`` (0.0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        if self.kind == "prv":
            return float(self.accountant.get_epsilon(self.delta))
        # Same sum as RDPAccountant.get_privacy_spent, but the per-step RDP curve of each (σ, q) is computed
        # once: compute_rdp(steps=n) is compute_rdp(steps=1) * n, so ε stays cheap to report at every step.
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis import rdp as rdp_analysis

        orders = RDPAccountant.DEFAULT_ALPHAS
        total = 0.0
        for sigma, q, n in self.accountant.history:
            key = (float(sigma), float(q))
            if key not in self._rdp_cache:
                self._rdp_cache[key] = rdp_analysis.compute_rdp(
                    q=q, noise_multiplier=sigma, steps=1, orders=orders
                )
            total = total + self._rdp_cache[key] * n
        eps, _ = rdp_analysis.get_privacy_spent(orders=orders, rdp=total, delta=self.delta)
        return float(eps)


class GaussianMechanism:
    """Seeded Gaussian noise on every trainable parameter's gradient, plus the accountant."""

    def __init__(self, config: DPConfig, params: list[torch.nn.Parameter], loss_reduction: str) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if not params:
            raise ValueError("DP needs at least one trainable parameter")
        self.config = config
        self.params = params
        self.loss_reduction = loss_reduction
        self.seed = (
            config.seed if config.seed is not None else secrets.randbits(53)
        )  # JSON-safe integer, recorded in the run entry
        self.generator = torch.Generator(device=params[0].device)
        self.generator.manual_seed(self.seed)
        self.accountant = PrivacyAccountant(config.accountant, config.delta)
        self.sample_rate: float | None = config.sample_rate
        self.eps: float = 0.0
        self.eps_step: int | None = None

    def resolve_sample_rate(self, batch_size: int, dataset_size: int | None) -> float:
        """The configured rate, or ``batch_size / dataset_size`` fixed at the first step."""
        if self.sample_rate is None:
            if not dataset_size:
                raise ValueError(
                    "DPConfig.sample_rate is None and cannot be derived: pass labels=<manifest> to attach "
                    "(rate = batch size / manifest size) or set DPConfig.sample_rate"
                )
            if batch_size > dataset_size:
                raise ValueError(
                    f"batch of {batch_size} examples is larger than the manifest ({dataset_size})"
                )
            self.sample_rate = batch_size / dataset_size
        return self.sample_rate

    @torch.no_grad()
    def add_noise(self, batch_size: int) -> None:
        """``p.grad += N(0, (σC)²) [/ B for mean]`` for every trainable parameter (a missing grad counts as 0)."""
        std = self.config.noise_multiplier * self.config.max_grad_norm
        scale = 1.0 / batch_size if self.loss_reduction == "mean" else 1.0
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if std > 0.0:
                noise = torch.normal(
                    0.0, std, p.shape, generator=self.generator, device=p.device, dtype=p.dtype
                )
                p.grad.add_(noise, alpha=scale)

    def account(self, step_index: int, last: bool = False) -> float:
        """One accountant step; returns ε so far (recomputed every ``eps_every`` steps)."""
        assert self.sample_rate is not None, "resolve_sample_rate first"
        self.accountant.step(self.config.noise_multiplier, self.sample_rate)
        if last or self.eps_step is None or (self.accountant.steps % self.config.eps_every == 0):
            self.eps = self.accountant.epsilon()
            self.eps_step = step_index
        return self.eps

    def refresh(self, step_index: int) -> float:
        """Recompute ε now (used by ``close`` when the last step skipped it)."""
        self.eps = self.accountant.epsilon()
        self.eps_step = step_index
        return self.eps

    def describe(self) -> dict[str, Any]:
        """What the ``run`` entry records about DP (noise seed included, so noise can be replayed)."""
        return {
            **self.config.to_dict(),
            "noise_seed": self.seed,
            "opacus_accountant": type(self.accountant.accountant).__name__,
        }
