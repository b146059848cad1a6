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
        ({"seed": 2**60}, r"seed: must be an int in \[0, 2\*\*53\)"),
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


# ----- end to end through instrument.attach, against Opacus itself ------------------------------------
import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from torch import nn  # noqa: E402

from instrument.tracker import attach  # noqa: E402
from ledger.records import checkpoints, run_record  # noqa: E402
from ledger.store import Ledger  # noqa: E402


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 3 * torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_clipped_gradient_and_clip_factors_equal_opacus_with_zero_noise(tmp_path: Path) -> None:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    C, B = 2.0, 8
    model = _mlp()
    ref = GradSampleModule(copy.deepcopy(model))
    ref_opt = DPOptimizer(
        torch.optim.SGD(ref.parameters(), lr=1.0),
        noise_multiplier=0.0,
        max_grad_norm=C,
        expected_batch_size=B,
    )
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    crit = nn.CrossEntropyLoss()
    with Ledger.open(tmp_path / "dp.db", create=True) as led:
        tr = attach(
            model,
            opt,
            ledger=led,
            run="dp",
            criterion=crit,
            dp=DPConfig(0.0, C, 1e-5, "rdp", sample_rate=0.1),
        )
        seen: dict[str, torch.Tensor] = {}
        opt.register_step_pre_hook(
            lambda o, a, k: seen.update({n: p.grad.clone() for n, p in model.named_parameters()})
        )
        x, y = _data(B)
        with tr.batch([f"e{i}" for i in range(B)]):
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        crit(ref(x), y).backward()
        per_sample = torch.stack(
            [p.grad_sample.flatten(1).norm(dim=1) for p in ref.parameters()], dim=1
        ).norm(dim=1)
        ref_opt.step()
        tr.close()
        (rec,) = led.steps("dp")
    clip = (C / (per_sample + 1e-6)).clamp(max=1.0)
    assert bool((clip < 1).any()) and bool((clip == 1).any())  # the batch exercises both cases
    np.testing.assert_allclose(rec.clip_factors, clip.numpy(), rtol=1e-6)
    for n, p in ref._module.named_parameters():
        torch.testing.assert_close(seen[n], p.grad, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), ref._module.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_recorded_epsilon_equals_opacus_privacy_engine(tmp_path: Path, kind: str) -> None:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    x, y = _data(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    engine = PrivacyEngine(accountant=kind)
    ref = _mlp()
    ref_model, ref_opt, ref_loader = engine.make_private(
        module=ref, optimizer=torch.optim.SGD(ref.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.1, max_grad_norm=1.0, poisson_sampling=False,
    )  # fmt: skip
    crit = nn.CrossEntropyLoss()
    for xb, yb in ref_loader:
        crit(ref_model(xb), yb).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cfg = DPConfig(1.1, 1.0, 1e-5, kind, sample_rate=1 / len(loader), seed=5)
    with Ledger.open(tmp_path / "eps.db", create=True) as led:
        tr = attach(model, opt, ledger=led, run="eps", criterion=crit, dp=cfg)
        for i in range(0, 32, 8):
            with tr.batch([f"e{j}" for j in range(i, i + 8)]):
                crit(model(x[i : i + 8]), y[i : i + 8]).backward()
                opt.step()
                opt.zero_grad()
        tr.close()
        recs = list(led.steps("eps"))
        final = checkpoints(led, "eps")[-1]
        run = run_record(led, "eps")
    assert len(recs) == 4
    assert recs[-1].eps == pytest.approx(engine.get_epsilon(1e-5), rel=1e-9)
    assert final.eps == recs[-1].eps
    eps = [r.eps for r in recs]
    assert eps == sorted(eps) and eps[0] > 0  # ε so far, growing
    assert run.dp is not None and run.dp["noise_seed"] == 5 and run.dp["accountant"] == kind


def test_dp_noise_is_reproducible_from_the_recorded_seed(tmp_path: Path) -> None:
    def train(seed: int | None, attach_seed: int | None, name: str) -> tuple[list[torch.Tensor], int]:
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        crit = nn.CrossEntropyLoss()
        x, y = _data(8)
        with Ledger.open(tmp_path / f"{name}.db", create=True) as led:
            tr = attach(
                model, opt, ledger=led, run=name, criterion=crit, seed=attach_seed,
                dp=DPConfig(1.0, 1.0, 1e-5, "rdp", sample_rate=0.25, seed=seed),
            )  # fmt: skip
            for _ in range(2):
                with tr.batch([f"e{i}" for i in range(8)]):
                    crit(model(x), y).backward()
                    opt.step()
                    opt.zero_grad()
            tr.close()
            noise_seed = run_record(led, name).dp["noise_seed"]  # type: ignore[index]
        return [p.detach().clone() for p in model.parameters()], noise_seed

    a, sa = train(11, None, "a")
    b, sb = train(None, 11, "b")  # attach's seed seeds the noise when DPConfig.seed is unset
    c, sc = train(None, None, "c")  # a fresh seed, recorded
    d, _ = train(sc, None, "d")  # ... which replays run c exactly
    assert sa == sb == 11
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(c, d, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_dp_refuses_gradient_accumulation(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(8)
    with Ledger.open(tmp_path / "acc.db", create=True) as led:
        tr = attach(model, opt, ledger=led, run="acc", dp=DPConfig(1.0, 1.0, 1e-5, "rdp", sample_rate=0.1))
        with tr.batch([f"e{i}" for i in range(4)]):
            nn.functional.cross_entropy(model(x[:4]), y[:4]).backward()
        msg = "DP with gradient accumulation is not supported"
        with pytest.raises(NotImplementedError, match=msg), tr.batch([f"e{i}" for i in range(4, 8)]):
            pass


def test_eps_every_records_the_latest_epsilon_and_close_brings_it_up_to_date(tmp_path: Path) -> None:
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data(8)
    cfg = DPConfig(1.0, 1.0, 1e-5, "rdp", sample_rate=0.05, seed=0, eps_every=3)
    with Ledger.open(tmp_path / "every.db", create=True) as led:
        tr = attach(model, opt, ledger=led, run="every", dp=cfg)
        for _ in range(4):
            with tr.batch([f"e{i}" for i in range(8)]):
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        tr.close()
        bodies = [led.entry(r.seq).body["dp"] for r in led.steps("every")]
        final = checkpoints(led, "every")[-1]
    ref = RDPAccountant()
    eps_after = []
    for _ in range(4):
        ref.step(noise_multiplier=1.0, sample_rate=0.05)
        eps_after.append(ref.get_epsilon(1e-5))
    # computed at the first step and every 3rd accountant step; in between the latest value and its step
    assert [b["eps_step"] for b in bodies] == [0, 0, 2, 2]
    assert [b["eps"] for b in bodies] == pytest.approx(
        [eps_after[0], eps_after[0], eps_after[2], eps_after[2]]
    )
    assert final.eps == pytest.approx(eps_after[3])  # the final checkpoint is never stale
