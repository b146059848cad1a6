"""The query-aggregates id cache against a rollback followed by another process's entry at the same seq.

The cache is checked by (n_examples, assigned_seq); a rolled-back append that met k new ids, followed by another
writer's entry at the same seq meeting k other new ids, restores both numbers. The leaf hash at assigned_seq
differs, and that is what must send the cache back to ``qa_examples``.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audit import aggregates
from ledger import indexers
from ledger.store import Ledger

LAYERS = ["a", "b"]


def step(run_seq: int, k: int, ids: list[str]) -> tuple[str, dict[str, Any], dict[str, np.ndarray]]:
    body = {
        "run": "r", "run_seq": run_seq, "step": k, "epoch": 0, "example_ids": ids, "layers": LAYERS,
        "micro_batches": [len(ids)], "lr": [0.1, 0.1], "weight_rows": [[1.0, 1.0]],
    }  # fmt: skip
    return "step", body, {"grad_norms": np.full((len(ids), 2), 0.5, np.float32)}


class Boom:
    name, kinds, tables, float_rtol = "boom", frozenset({"boom"}), (), 0.0

    def apply(self, conn: Any, entries: Any) -> None:
        raise RuntimeError("boom")


def test_stale_cache_with_equal_counts_is_reloaded(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "c.db", create=True)
    run_seq = led.append("run", {"run": "r", "architecture": {"layers": [{"name": n} for n in LAYERS]}})
    led.append_many([step(run_seq, 0, ["x0", "x1"])])
    key = led.entry(run_seq).leaf_hash
    indexers.register(Boom())
    try:  # this process numbers y0, y1 as 2, 3, then the transaction rolls back
        with pytest.raises(RuntimeError, match="boom"):
            led.append_many([step(run_seq, 1, ["y0", "y1"]), ("boom", {})])
    finally:
        indexers.unregister("boom")
    stale = copy.deepcopy(aggregates._ID_CACHE[key])
    assert stale.ids == {"x0": 0, "x1": 1, "y0": 2, "y1": 3}
    # "another process" writes the same seq with two other new ids; then this process's cache is the stale one
    led.append_many([step(run_seq, 1, ["z0", "z1"])])
    aggregates._ID_CACHE[key] = stale
    led.append_many([step(run_seq, 2, ["y0", "z1"])])
    with led.engine.connect() as conn:
        assert aggregates.load_ids(conn, run_seq) == ["x0", "x1", "z0", "z1", "y0"]
        idx = conn.exec_driver_sql("SELECT idx FROM qa_steps ORDER BY seq DESC LIMIT 1").scalar_one()
    assert np.frombuffer(idx, "<i4").tolist() == [4, 3]
    res = led.verify(deep=True)
    assert res.ok, res.reason
    led.close()
