"""The tracker's background step writer: group commit, its bounds, and what a crash can lose.

Unit tests use a fake ledger that records each ``append_many`` call (one call = one transaction); the crash test
SIGKILLs a real training process that uses the default writer and checks the SQLite ledger it leaves.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from instrument.tracker import StepWriter, attach
from ledger.store import Ledger


class FakeLedger:
    """Records every transaction; ``gate`` (when set) blocks each append until it is released."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[list[Any]] = []
        self.gate = gate
        self.in_append = threading.Event()

    def append_many(self, entries: list[Any]) -> list[int]:
        self.in_append.set()
        if self.gate is not None:
            assert self.gate.wait(10)
        self.calls.append(list(entries))
        return list(range(len(entries)))

    def append(self, kind: str, body: Any, payloads: Any = None, *, v: int = 1) -> int:
        self.calls.append([(kind, body, payloads, v)])
        return 0


def entry(i: int) -> tuple[str, dict[str, Any], dict[str, np.ndarray], int]:
    return ("step", {"step": i}, {}, 2)


def steps_of(calls: list[list[Any]]) -> list[int]:
    return [e[1]["step"] for call in calls for e in call]


def test_waiting_steps_are_committed_in_groups_in_order() -> None:
    led = FakeLedger()
    w = StepWriter(led, max_pending=8, linger=30)  # no time trigger: only full groups and flush commit
    for i in range(4):  # a full group (max_pending / 2): committed at once, in one transaction
        w.submit_lazy(entry(i))
    deadline = time.monotonic() + 10
    while not led.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert [len(c) for c in led.calls] == [4]
    for i in range(4, 7):  # a partial group waits for the linger ...
        w.submit_lazy(entry(i))
    time.sleep(0.2)
    assert len(led.calls) == 1
    w.flush()  # ... or a flush
    assert [len(c) for c in led.calls] == [4, 3] and steps_of(led.calls) == list(range(7))
    w.close()


def test_a_lone_step_is_committed_after_the_linger_without_a_flush() -> None:
    led = FakeLedger()
    w = StepWriter(led, max_pending=8, linger=0.05)
    w.submit_lazy(entry(0))
    deadline = time.monotonic() + 10
    while not led.calls and time.monotonic() < deadline:
        time.sleep(0.005)
    assert steps_of(led.calls) == [0]
    w.close()


def test_submit_blocks_while_max_pending_steps_are_uncommitted() -> None:
    """In-flight steps count too: a crash can never lose more than max_pending submitted steps."""
    gate = threading.Event()
    led = FakeLedger(gate)
    w = StepWriter(led, max_pending=4, linger=30)
    for i in range(4):
        w.submit_lazy(entry(i))
    assert led.in_append.wait(10)  # the first group (0, 1) is being appended and blocks there
    done = threading.Event()

    def fifth() -> None:
        w.submit_lazy(entry(4))
        done.set()

    t = threading.Thread(target=fifth)
    t.start()
    assert not done.wait(0.2), "submit returned with max_pending steps uncommitted"
    gate.set()
    assert done.wait(10)
    t.join()
    w.close()
    assert steps_of(led.calls) == list(range(5))


def test_entries_are_built_on_the_writer_thread_and_build_errors_are_sticky() -> None:
    led = FakeLedger()
    w = StepWriter(led, max_pending=4, linger=0.01)
    threads: list[str] = []

    def build() -> tuple[str, dict[str, Any], dict[str, np.ndarray], int]:
        threads.append(threading.current_thread().name)
        return entry(0)

    w.submit_lazy(build)
    w.flush()
    assert threads == ["gradledger-step-writer"] and steps_of(led.calls) == [0]

    def broken() -> Any:
        raise ValueError("bad step")

    w.submit_lazy(broken)
    w.submit_lazy(entry(2))  # queued behind the failure: never appended
    with pytest.raises(RuntimeError, match="appending a step entry failed: bad step"):
        w.flush()
    with pytest.raises(RuntimeError, match="bad step"):
        w.submit_lazy(entry(3))
    with pytest.raises(RuntimeError, match="bad step"):
        w.close()
    assert steps_of(led.calls) == [0]


def test_synchronous_writer_appends_inside_submit() -> None:
    led = FakeLedger()
    w = StepWriter(led, max_pending=0)
    w.submit_lazy(lambda: entry(7))
    assert steps_of(led.calls) == [7]
    w.close()


def test_synchronous_writer_failures_are_sticky_too() -> None:
    """A caller that catches a failed synchronous append and trains on must not leave a silent gap."""
    led = FakeLedger()
    w = StepWriter(led, max_pending=0)
    w.submit_lazy(entry(0))

    def broken() -> Any:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        w.submit_lazy(broken)
    with pytest.raises(RuntimeError, match="appending a step entry failed: disk full"):
        w.submit_lazy(entry(2))
    with pytest.raises(RuntimeError, match="disk full"):
        w.flush()
    with pytest.raises(RuntimeError, match="disk full"):
        w.close()
    assert steps_of(led.calls) == [0]


# ----- a training process killed at a random moment ----------------------------------------------------

B, MAX_PENDING = 4, 4


def _train_forever(path: str, done: Any, ready: Any) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    led = Ledger.open(path)
    tr = attach(model, opt, ledger=led, run="k", criterion=crit, max_pending=MAX_PENDING)
    g = torch.Generator().manual_seed(1)
    ready.set()
    s = 0
    while True:
        x, y = torch.randn(B, 6, generator=g), torch.randint(0, 3, (B,), generator=g)
        with tr.batch([f"s{s}-{i}" for i in range(B)]):
            crit(model(x), y).backward()
            opt.step()
            opt.zero_grad()
        s += 1
        done.value = s  # optimizer.step() returned: this step was handed to the writer


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_loses_at_most_max_pending_steps_and_never_half_a_step(tmp_path: Path, seed: int) -> None:
    path = str(tmp_path / "k.db")
    Ledger.open(path, create=True).close()
    ctx = mp.get_context("spawn")
    done, ready = ctx.Value("i", 0), ctx.Event()
    p = ctx.Process(target=_train_forever, args=(path, done, ready))
    p.start()
    try:
        assert ready.wait(120)
        time.sleep(0.3 + random.Random(seed).random())
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
    finally:
        if p.is_alive():
            p.kill()
    submitted = int(done.value)
    with Ledger.open(path) as led:
        assert led.verify().ok
        recs = list(led.steps("k"))
    got = [r.step for r in recs]
    assert got == list(range(len(got)))  # a prefix: in order, no gap
    assert all(r.example_ids == [f"s{r.step}-{i}" for i in range(B)] for r in recs)
    assert all(r.grad_norms.shape == (B, 2) and r.losses is not None for r in recs)
    # the step being run when the kill came may already be queued (submitted + 1)
    assert submitted - MAX_PENDING <= len(got) <= submitted + 1, (submitted, len(got))
