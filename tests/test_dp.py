"""DP: configuration checks, ε against Opacus's own accountants / PrivacyEngine, seeded noise on every parameter.

The end-to-end comparisons (clipped gradient vs Opacus, ε recorded in step entries vs PrivacyEngine) are in
the second half and go through ``instrument.attach`` with a real SQLite ledger.
"""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant

from instrument.dp import DPConfig, GaussianMechanism, PrivacyAccountant


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier: must be >= 0"),
        ({"max_grad_norm": 0.0}, "max_grad_norm: must be a finite number > 0"),
        ({"delta": 1.0}, r"delta: must be in \(0, 1\)"),
        ({"accountant": "gdp"}, "accountant: must be one of prv, rdp"),
        ({"sample_rate": 1.5}, r"sample_rate: must be in \(0, 1\]"),
        ({"eps_every": 0}, "eps_every: must be an int >= 1"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, fragment: str) -> None:
    base = {"noise_multiplier": 1.0, "max_grad_norm": 1.0, "delta": 1e-5}
    with pytest.raises(ValueError, match=fragment):
        DPConfig(**{**base, **kwargs})


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant_over_a_changing_schedule(kind: str) -> None:
    ours = PrivacyAccountant(kind, delta=1e-5)
    ref = RDPAccountant() if kind == "rdp" else PRVAccountant()
    schedule = [(1.1, 0.01)] * 30 + [(0.9, 0.02)] * 20
    assert ours.epsilon() == 0.0
    for i, (sigma, q) in enumerate(schedule, 1):
        ours.step(sigma, q)
        ref.step(noise_multiplier=sigma, sample_rate=q)
        if i in (1, 30, 50) and (kind == "rdp" or i == 50):
            assert ours.epsilon() == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    assert ours.steps == 50
    assert math.isfinite(ours.epsilon()) and ours.epsilon() > 0


def _params(device: str = "cpu") -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [
        torch.nn.Parameter(torch.zeros(200, 50, device=device)),
        torch.nn.Parameter(torch.zeros(300, device=device)),
    ]


def test_noise_is_seeded_scaled_and_covers_every_parameter() -> None:
    cfg = DPConfig(noise_multiplier=2.0, max_grad_norm=0.5, delta=1e-5, seed=1234)

    def noise(reduction: str, batch: int) -> list[torch.Tensor]:
        params = _params()
        params[1].grad = None  # a parameter no example reached (fully masked): it still gets noise
        mech = GaussianMechanism(cfg, params, reduction)
        params[0].grad = torch.zeros_like(params[0])
        mech.add_noise(batch)
        return [p.grad.clone() for p in params]  # type: ignore[union-attr]

    a, b = noise("sum", 8), noise("sum", 8)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # same seed, same noise
    allnoise = torch.cat([g.flatten() for g in a])
    assert allnoise.numel() == 10_300 and bool((allnoise != 0).all())
    assert float(allnoise.std()) == pytest.approx(2.0 * 0.5, rel=0.05)  # σC
    assert float(allnoise.mean()) == pytest.approx(0.0, abs=0.05)
    mean_red = noise("mean", 8)
    assert all(torch.allclose(m * 8, s) for m, s in zip(mean_red, a, strict=True))  # /B under mean
    other = GaussianMechanism(DPConfig(2.0, 0.5, 1e-5, seed=99), _params(), "sum")
    other.params[0].grad = torch.zeros(200, 50)
    other.add_noise(8)
    assert not torch.equal(other.params[0].grad, a[0])


def test_zero_noise_leaves_gradients_and_unseeded_runs_record_their_seed() -> None:
    params = _params()
    params[0].grad = torch.ones(200, 50)
    mech = GaussianMechanism(DPConfig(0.0, 1.0, 1e-5), params, "mean")
    mech.add_noise(4)
    assert torch.equal(params[0].grad, torch.ones(200, 50))
    assert params[1].grad is not None and torch.equal(params[1].grad, torch.zeros(300))
    assert isinstance(mech.seed, int) and mech.describe()["noise_seed"] == mech.seed


def test_sample_rate_derivation_errors() -> None:
    mech = GaussianMechanism(DPConfig(1.0, 1.0, 1e-5), _params(), "mean")
    with pytest.raises(ValueError, match="cannot be derived: pass labels=<manifest>"):
        mech.resolve_sample_rate(8, None)
    assert mech.resolve_sample_rate(8, 64) == 8 / 64
    assert mech.resolve_sample_rate(16, 64) == 8 / 64  # fixed at the first step
