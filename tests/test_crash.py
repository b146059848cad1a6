"""A writer SIGKILLed at random points mid-append leaves a ledger that verifies and accepts new appends."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ledger import Ledger

KILLS = 15


def writer(path: str, tag: str, seed: int, ready: Any) -> None:
    """Append forever: single entries and batches of 1..40 entries with payloads, each tagged with its batch
    id and size so the test can check that every batch is all-or-nothing."""
    led = Ledger.open(path)
    rng = np.random.default_rng(seed)
    ready.set()
    b = 0
    while True:
        m = int(rng.integers(1, 41))
        items = [
            (
                "step",
                {"writer": tag, "batch": b, "k": k, "of": m},
                {"grad_norms": rng.random((64, 16), dtype=np.float32)},
            )
            for k in range(m)
        ]
        if m == 1:
            led.append(*items[0])
        else:
            led.append_many(items)
        b += 1


def _spawn(path: Path, tag: str, seed: int) -> Any:
    # fork: the child starts instantly with everything imported, then opens its own connections
    ctx = mp.get_context("fork")
    ready = ctx.Event()
    proc = ctx.Process(target=writer, args=(str(path), tag, seed, ready), daemon=True)
    proc.start()
    assert ready.wait(30), "writer did not start"
    return proc


@pytest.mark.slow
def test_sigkill_mid_append_leaves_a_valid_ledger(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    Ledger.open(path, create=True).close()
    rng = random.Random(2024)
    sizes = []
    for i in range(KILLS):
        proc = _spawn(path, f"w{i}", i)
        time.sleep(rng.uniform(0.02, 0.4))
        assert proc.pid is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        with Ledger.open(path) as led:
            res = led.verify()
            assert res.ok, f"after kill {i}: {res.reason}"
            sizes.append(led.size)
    assert sizes == sorted(sizes) and sizes[-1] > 1, sizes
    with Ledger.open(path) as led:
        # appends resume on the same chain
        before = led.size
        seq = led.append("step", {"writer": "final", "batch": 0, "k": 0, "of": 1})
        assert seq == before
        assert led.entry(seq).prev == led.entry(seq - 1).leaf_hash
        res = led.verify()
        assert res.ok and res.size == before + 1
        # every batch is all-or-nothing
        seen: dict[tuple[str, int], list[int]] = defaultdict(list)
        for e in led.entries(kind="step", payloads=False):
            seen[(e.body["writer"], e.body["batch"])].append(e.body["k"])
            of = e.body["of"]
            assert e.body["k"] < of
        for (_w, _b), ks in seen.items():
            assert ks == list(range(len(ks)))
        for e in led.entries(kind="step", payloads=False):
            assert len(seen[(e.body["writer"], e.body["batch"])]) == e.body["of"]
