"""4 processes x 500 appends into one ledger (SQLite and PostgreSQL): 2000 entries, no fork, no gap."""

from __future__ import annotations

import multiprocessing as mp
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from ledger import Ledger

WRITERS, APPENDS = 4, 500


def writer(url: str, tag: int, start: Any) -> None:
    led = Ledger.open(url)
    start.wait()
    for i in range(APPENDS):
        led.append("tick", {"writer": tag, "i": i})
    led.close()


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


@pytest.mark.slow
def test_parallel_appends_never_fork_or_gap(url: str) -> None:
    Ledger.open(url, create=True).close()
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=writer, args=(url, w, start)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"
    with Ledger.open(url) as led:
        res = led.verify()
        assert res.ok, res.reason
        assert led.size == 1 + WRITERS * APPENDS
        seqs = [e.seq for e in led.entries(kind="tick", payloads=False)]
        assert seqs == list(range(1, 1 + WRITERS * APPENDS))  # contiguous: no gap, no duplicate
        per_writer: dict[int, list[int]] = defaultdict(list)
        for e in led.entries(kind="tick", payloads=False):
            per_writer[e.body["writer"]].append(e.body["i"])
        # every append landed exactly once, in each writer's own order
        assert {w: v for w, v in per_writer.items()} == {w: list(range(APPENDS)) for w in range(WRITERS)}
        # the writers really interleaved (the sequencer arbitrated between them)
        order = [e.body["writer"] for e in led.entries(kind="tick", payloads=False)]
        switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
        assert switches > WRITERS, switches
