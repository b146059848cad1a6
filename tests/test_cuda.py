"""The same exactness checks on a CUDA device (skipped without one; run with the `device` tool when a GPU is
lent). Everything stays on the model's device: the engine's norms, routed and clipped gradients on CUDA equal
the CPU float64 computation, which tests/test_norms_oracle.py and tests/test_routing.py check against
torch.func; the tracker records the same step on CUDA as on the CPU."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from tests.support_engine import assert_rel_close, oracle_grads, oracle_norms, run_engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _models() -> dict[str, Callable[[], tuple[nn.Module, Tensor]]]:
    return {
        "mlp": lambda: (nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)), torch.randn(5, 6)),
        "sequence": lambda: (
            nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)),
            torch.randn(5, 4, 6),
        ),
        "conv2d": lambda: (
            nn.Sequential(
                nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(100, 3)
            ),
            torch.randn(4, 2, 5, 5),
        ),
        "conv1d": lambda: (
            nn.Sequential(nn.Conv1d(2, 3, 3, stride=2, dilation=1), nn.Flatten(), nn.Linear(9, 2)),
            torch.randn(4, 2, 7),
        ),
        "embedding": lambda: (
            nn.Sequential(nn.Embedding(10, 6, padding_idx=0), nn.RMSNorm(6), nn.Linear(6, 3)),
            torch.randint(0, 10, (4, 5)),
        ),
    }


@pytest.mark.parametrize("name", list(_models()))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_engine_on_cuda_equals_the_float64_oracle(name: str, reduction: str) -> None:
    torch.manual_seed(0)
    cpu, x = _models()[name]()
    cpu = cpu.double()
    if x.is_floating_point():
        x = x.double()
    gpu = copy.deepcopy(cpu).cuda()
    with torch.no_grad():
        target = torch.randn_like(cpu(x))
    engine, norms, _, _ = run_engine(gpu, x.cuda(), target.cuda(), reduction)
    assert norms.device.type == "cuda"
    ref = oracle_norms(oracle_grads(cpu, x, target), engine.layer_names)
    assert_rel_close(norms.cpu(), ref, 1e-6, f"{name} norms")

    # routing and flat clipping: CUDA equals the CPU engine (itself checked against torch.func elsewhere)
    weights = torch.rand(x.shape[0], len(engine.layer_names), dtype=torch.float64)
    weights[0] = 0.0
    for clip in (None, 0.5):
        _, _, c_cpu, g_cpu = run_engine(cpu, x, target, reduction, weights=weights, max_grad_norm=clip)
        _, _, c_gpu, g_gpu = run_engine(
            gpu, x.cuda(), target.cuda(), reduction, weights=weights.cuda(), max_grad_norm=clip
        )
        assert g_cpu.keys() == g_gpu.keys()
        for k in g_cpu:
            assert g_gpu[k].device.type == "cuda"
            assert_rel_close(g_gpu[k].cpu(), g_cpu[k], 1e-6, f"{name} routed .grad of {k} (clip={clip})")
        if clip is not None:
            assert c_cpu is not None and c_gpu is not None
            assert_rel_close(c_gpu.cpu(), c_cpu, 1e-6, f"{name} clip factors")


def test_tracker_records_the_same_step_on_cuda(tmp_path: Path) -> None:
    import instrument
    from instrument.dp import DPConfig
    from instrument.sketch import Sketcher
    from ledger.records import checkpoints
    from ledger.store import Ledger

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    ids = [f"e{i}" for i in range(8)]
    steps = {}
    for dev in ("cpu", "cuda"):
        model = copy.deepcopy(base).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        crit = nn.CrossEntropyLoss()
        led = Ledger.open(tmp_path / f"{dev}.db", create=True)
        sk = Sketcher(model, ["2"], k=16, seed=1, methods={"2": "rank1"})
        tr = instrument.attach(
            model, opt, ledger=led, run="r", criterion=crit, sketch=sk,
            dp=DPConfig(0.0, 1.0, 1e-5, "rdp", sample_rate=0.1),
        )  # fmt: skip
        for _ in range(2):
            with tr.batch(ids):
                crit(model(x.to(dev)), y.to(dev)).backward()
                opt.step()
                opt.zero_grad()
        tr.close()
        steps[dev] = list(led.steps("r"))
        assert checkpoints(led, "r")[-1].state_dict_sha256
    for a, b in zip(steps["cpu"], steps["cuda"], strict=True):
        assert a.example_ids == b.example_ids
        for field in ("grad_norms", "losses", "margins", "clip_factors", "update_norms"):
            assert_rel_close(
                torch.as_tensor(getattr(b, field)), torch.as_tensor(getattr(a, field)), 1e-4, field
            )
