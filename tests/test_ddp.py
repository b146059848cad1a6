"""DDP into one ledger: examples/ddp_digits.py in one process vs two gloo ranks under torchrun, and a rank killed.

The three runs start together (module fixture) so the file costs one torchrun start-up in wall time.
Routing (a consensus-depth policy) and DP (noise 1.0, clip 1.0) are on in every run: a second noise draw per
rank, or a gradient averaged wrongly, moves the parameters by ~1e-3 relative after one step, so the per-sample
norms of later steps would miss the 1e-5 tolerance.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from ledger import Ledger
from ledger.records import StepRecord

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_digits.py"
ARGS = ["--epochs", "2", "--limit", "256", "--batch", "64", "--seed", "3", "--dp"]
STEPS = 2 * 256 // 64
KILL_AFTER = 3
TIMEOUT = 240


@dataclass
class Runs:
    one: Path
    two: Path
    killed: Path
    outputs: dict[str, tuple[int, str]]


def _start(cmd: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group: killed as a whole on timeout
    )  # fmt: skip


def _torchrun(ledger: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--max-restarts", "0",
        "--standalone", str(EXAMPLE), "--ledger", str(ledger), *ARGS, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runs]:
    d = tmp_path_factory.mktemp("ddp")
    r = Runs(d / "one.db", d / "two.db", d / "killed.db", {})
    (d / "ranks").mkdir()
    spawn = f"import sys; sys.path.insert(0, {str(ROOT / 'tests')!r}); import test_ddp; test_ddp.spawn_ranks({str(d / 'ranks')!r})"
    procs = {
        "ranks": _start([sys.executable, "-c", spawn]),
        "one": _start([sys.executable, str(EXAMPLE), "--ledger", str(r.one), *ARGS]),
        "two": _start(_torchrun(r.two)),
        "killed": _start(
            _torchrun(r.killed, "--timeout", "30", "--kill-rank", "1", "--kill-after", str(KILL_AFTER))
        ),
    }
    for name, p in procs.items():
        try:
            out, _ = p.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:  # a hung rank: kill the whole group, then fail below
            os.killpg(p.pid, signal.SIGKILL)
            out, _ = p.communicate()
            out = f"TIMEOUT after {TIMEOUT}s\n{out}"
        r.outputs[name] = (p.returncode, out)
    yield r


def _steps(path: Path) -> list[StepRecord]:
    with Ledger.open(path) as led:
        return list(led.steps("ddp-digits"))


def _assert_same_step(a: StepRecord, b: StepRecord) -> None:
    assert a.step == b.step and a.epoch == b.epoch
    assert a.example_ids == b.example_ids, f"step {a.step}: example ids differ"
    assert a.micro_batches == b.micro_batches == [64]
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.rule_ids, b.rule_ids)
    np.testing.assert_allclose(b.grad_norms, a.grad_norms, rtol=1e-5, atol=0, err_msg=f"step {a.step}")
    assert a.losses is not None and b.losses is not None
    np.testing.assert_allclose(b.losses, a.losses, rtol=1e-5, atol=1e-7)
    assert a.clip_factors is not None and b.clip_factors is not None
    np.testing.assert_allclose(b.clip_factors, a.clip_factors, rtol=1e-5)
    assert a.update_norms is not None and b.update_norms is not None
    np.testing.assert_allclose(b.update_norms, a.update_norms, rtol=1e-5)
    assert a.eps == b.eps


def test_two_ranks_record_the_same_steps_as_one_process(runs: Runs) -> None:
    for name in ("one", "two"):
        rc, out = runs.outputs[name]
        assert rc == 0, f"{name} run failed:\n{out[-3000:]}"
    one, two = _steps(runs.one), _steps(runs.two)
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two, strict=True):
        _assert_same_step(a, b)
    # the rows are real: 64 distinct examples per step, some routed away from the head, DP clipping active
    assert all(len(set(s.example_ids)) == 64 for s in two)
    assert any((s.weights == 0).any() for s in two)
    assert any((s.clip_factors < 1).any() for s in two if s.clip_factors is not None)
    with Ledger.open(runs.two) as led:
        assert led.verify().ok
        run = next(e for e in led.entries(kind="run", payloads=False))
        assert run.body["distributed"] == {"world_size": 2, "backend": "gloo", "writer_rank": 0}
        ck = [e.body for e in led.entries(kind="checkpoint", payloads=False)]
        assert [c["tag"] for c in ck] == ["final"] and ck[0]["step"] == STEPS


def test_a_killed_rank_leaves_a_verifying_ledger_with_complete_steps(runs: Runs) -> None:
    rc, out = runs.outputs["killed"]
    assert "TIMEOUT" not in out, out[-3000:]
    assert rc != 0, "torchrun should report the killed rank"
    assert "SIGKILL" in out or "-9" in out, out[-3000:]
    with Ledger.open(runs.killed) as led:
        res = led.verify()
        assert res.ok, res.reason
        assert not any(
            e.body.get("run") == "ddp-digits" for e in led.entries(kind="checkpoint", payloads=False)
        )
    killed = _steps(runs.killed)
    # rank 1 died right after its KILL_AFTER-th step: rank 0 had gathered every step up to it, and nothing later
    assert [s.step for s in killed] == list(range(KILL_AFTER))
    one = _steps(runs.one)
    for a, b in zip(one, killed, strict=False):
        _assert_same_step(a, b)  # complete: all 64 rows of each step, equal to the one-process run


def _rank_main(rank: int, world: int, port: int, tmp: str) -> None:
    """Two gloo ranks, no torchrun: "sum" trains as one process (summing comm hook); uneven "mean" is refused."""
    import gc

    import torch
    import torch.distributed as dist
    from torch import nn

    import instrument
    from instrument.distributed import DistributedError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    ref = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    net.load_state_dict(ref.state_dict())
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    led = Ledger.open(Path(tmp) / "sum.db", create=True) if rank == 0 else None
    tr = instrument.attach(ddp, opt, ledger=led, run="sum", loss_reduction="sum", max_pending=0)
    rows = slice(4 * rank, 4 * rank + 4)
    with tr.batch([f"e{i}" for i in range(8)][rows]):
        nn.functional.cross_entropy(ddp(x[rows]), y[rows], reduction="sum").backward()
        opt.step()
    tr.close()
    nn.functional.cross_entropy(ref(x), y, reduction="sum").backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= 0.1 * p.grad
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    net2 = nn.Sequential(nn.Linear(5, 3))
    ddp2 = nn.parallel.DistributedDataParallel(net2)
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1)
    tr2 = instrument.attach(ddp2, opt2, ledger=led, run="uneven", max_pending=0)
    rows = (
        slice(0, 3) if rank == 0 else slice(3, 8)
    )  # 3 vs 5 rows under "mean": DDP's average is not the mean
    ids = [f"e{i}" for i in range(8)][rows]
    with pytest.raises(DistributedError, match=r"micro-batch 0 has \[3, 5\] rows"), tr2.batch(ids):
        nn.functional.cross_entropy(ddp2(x[rows]), y[rows]).backward()
        opt2.step()
    if led is not None:
        steps = list(led.steps("sum"))
        assert len(steps) == 1 and steps[0].example_ids == [f"e{i}" for i in range(8)]
        assert not list(led.steps("uneven"))
        led.close()
    # Drop every holder of the process group (DDP reducers, trackers, the refused step's traceback) before
    # destroying it: a gloo group torn down later, at interpreter exit, can abort the rank.
    del tr, tr2, ddp, ddp2, opt, opt2
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(tmp: str) -> None:
    """Entry point of the fixture's fourth process: two spawned ranks running :func:`_rank_main`."""
    import socket

    import torch.multiprocessing as tmp_mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp_mp.spawn(_rank_main, args=(2, port, tmp), nprocs=2, join=True)


def test_sum_reduction_trains_as_one_process_and_uneven_mean_batches_are_refused(runs: Runs) -> None:
    rc, out = runs.outputs["ranks"]
    assert rc == 0, out[-4000:]
