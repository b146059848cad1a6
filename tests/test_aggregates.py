"""The query-aggregates indexer on synthetic step entries written through the real append path.

Covers what the tiny training run cannot: sum-reduced losses, DP clip factors, non-finite norms, a layer with
no learning rate, several folds, malformed step entries, two writers on one run, a rolled-back append, a
back-fill of an existing ledger, PostgreSQL, and ``verify --deep`` (bit-exact rebuild, edits detected).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from audit import aggregates, query
from ledger import indexers
from ledger.store import Ledger
from tests.query_support import aggregate_tables, brute_force

LAYERS = ["enc.0", "enc.1", "head"]


def run_body(name: str, reduction: str) -> dict[str, Any]:
    return {
        "run": name,
        "architecture": {"layers": [{"name": n, "type": "torch.nn.Linear", "params": {}} for n in LAYERS]},
        "loss_reduction": reduction,
        "policy_seq": None,
        "manifest_seq": None,
    }


def synthetic_steps(run: str, run_seq: int, seed: int, n_ex: int = 30, epochs: int = 3) -> Iterator[Any]:
    rng = np.random.default_rng(seed)
    k = 0
    for epoch in range(epochs):
        order = rng.permutation(n_ex)
        for s in range(0, n_ex, 7):
            ids = [f"x{i}" for i in order[s : s + 7]]
            if k == 2:
                ids[-1] = ids[0]  # a duplicate within one step
            b = len(ids)
            norms = rng.gamma(2.0, 0.5, size=(b, len(LAYERS))).astype(np.float32)
            if k == 4:
                norms[1, 2] = np.nan
            if k == 5:
                norms[0, 0] = np.inf
            weights = np.array([[1, 1, 1], [1, 1, 0], [0.5, 0.5, 0.5]], np.float32)[rng.integers(0, 3, b)]
            lr: list[float | None] = [0.1 / (1 + epoch), 0.1 / (1 + epoch), 0.05]
            if k == 6:
                lr[2] = None  # the head was not in the optimizer at this step
            payloads = {
                "grad_norms": norms,
                "weights": weights,
                "clip": rng.uniform(0.2, 1, b).astype(np.float32),
            }
            mb = [b] if k % 3 else [b - 3, 3] if b > 3 else [b]
            yield (
                "step",
                {
                    "run": run, "run_seq": run_seq, "step": k, "epoch": epoch, "example_ids": ids, "layers": LAYERS,
                    "micro_batches": mb, "lr": lr, "update_norms": None, "policy_seq": None, "flags": {},
                },
                payloads,
            )  # fmt: skip
            k += 1


@pytest.fixture
def small_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregates, "FOLD_MIN_SAMPLES", 0)
    monkeypatch.setattr(aggregates, "FOLD_EPOCHS", 1)


def build(target: str | Path, reduction: str = "sum", chunk: int = 1) -> tuple[Ledger, int]:
    led = Ledger.open(target, create=True)
    run_seq = led.append("run", run_body("syn", reduction))
    items = list(synthetic_steps("syn", run_seq, seed=3))
    for i in range(0, len(items), chunk):
        led.append_many(items[i : i + chunk])
    return led, run_seq


def check_against_oracle(led: Ledger, reduction: str) -> None:
    records = list(led.steps("syn"))
    for epochs in (None, (0, 0), (1, 2)):
        oracle = brute_force(records, reduction, epochs)
        for metric, key in (("update", "update"), ("self-influence", "self_influence")):
            for j, layer in enumerate(LAYERS):
                res = query.layer(led, "syn", layer, top=1000, metric=metric, epochs=epochs)
                got = {r.example_id: r for r in res.rows}
                want = oracle.metric(key)
                assert set(got) == set(want)
                assert res.excluded_nonfinite == oracle.excluded[j]
                assert res.total == pytest.approx(sum(v[j] for v in want.values()), rel=1e-12)
                for ex, r in got.items():
                    assert r.score == pytest.approx(want[ex][j], rel=1e-12, abs=1e-300)
                    assert r.weight == pytest.approx(oracle.weight[ex][j] / oracle.count[ex], rel=1e-12)
                    assert r.sample_steps == oracle.count[ex]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_synthetic_run_equals_brute_force(tmp_path: Path, small_folds: None, reduction: str) -> None:
    led, _ = build(tmp_path / "s.db", reduction)
    oracle = brute_force(led.steps("syn"), reduction)
    assert oracle.excluded == [1, 0, 1 + 7]  # inf in enc.0; NaN, and a 7-sample step with no lr, in head
    with led.engine.connect() as conn:
        ft = conn.execute(select(aggregates.runs.c.folded_through)).scalar_one()
    assert ft > 0  # some steps folded, some not
    check_against_oracle(led, reduction)
    res = led.verify(deep=True)
    assert res.ok and "query_aggregates" in res.indexers_checked, res.reason
    led.close()


def test_chunked_appends_and_backfill_give_identical_tables(tmp_path: Path, small_folds: None) -> None:
    one, _ = build(tmp_path / "one.db")
    many, _ = build(tmp_path / "many.db", chunk=5)
    indexers.unregister(aggregates.NAME)
    try:
        late, _ = build(tmp_path / "late.db")
    finally:
        indexers.register(aggregates.INDEXER)
    assert late.ensure_indexers().count(aggregates.NAME) == 1  # back-filled from the existing entries

    ref = aggregate_tables(one)
    assert ref["qa_base"] and aggregate_tables(many) == ref and aggregate_tables(late) == ref
    for led in (one, many, late):
        led.close()


def test_malformed_and_foreign_steps_are_skipped(tmp_path: Path, small_folds: None) -> None:
    led, run_seq = build(tmp_path / "m.db")
    before = query.layer(led, "syn", "head", top=1000)
    led.append("step", {"run": "junk", "run_seq": run_seq, "step": 0, "epoch": 0})  # no payloads
    led.append("step", {"run": "other", "run_seq": 999, "step": 0, "epoch": 0, "example_ids": ["a"],
                        "layers": LAYERS, "lr": [1, 1, 1]},
               {"grad_norms": np.ones((1, 3), np.float32), "weights": np.ones((1, 3), np.float32)})  # fmt: skip
    led.append("step", {"run": "syn", "run_seq": run_seq, "step": 0, "epoch": 0, "example_ids": ["a"],
                        "layers": ["other"], "lr": [1]},
               {"grad_norms": np.ones((1, 1), np.float32), "weights": np.ones((1, 1), np.float32)})  # fmt: skip
    after = query.layer(led, "syn", "head", top=1000)
    assert [(r.example_id, r.score) for r in after.rows] == [(r.example_id, r.score) for r in before.rows]
    assert led.verify(deep=True).ok
    led.close()


def test_two_writers_and_a_rolled_back_append(tmp_path: Path, small_folds: None) -> None:
    """The in-process id cache must never outlive a rollback or miss another writer's new examples."""

    class Boom:
        name, kinds, tables, float_rtol = "boom", frozenset({"boom"}), (), 0.0

        def apply(self, conn: Any, entries: Any) -> None:
            raise RuntimeError("boom")

    path = tmp_path / "w.db"
    a = Ledger.open(path, create=True)
    run_seq = a.append("run", run_body("syn", "sum"))
    b = Ledger.open(path)
    items = list(synthetic_steps("syn", run_seq, seed=4))
    indexers.register(Boom())
    try:
        for i, item in enumerate(items):
            if i == 3:  # this step's new examples get indices, then the transaction rolls back
                with pytest.raises(RuntimeError, match="boom"):
                    a.append_many([item, ("boom", {})])
            (a if i % 2 else b).append_many([item])
    finally:
        indexers.unregister("boom")
    check_against_oracle(a, "sum")
    a.close()
    b.close()


def test_deep_verify_names_edited_tables(tmp_path: Path, small_folds: None) -> None:
    led, _ = build(tmp_path / "t.db")
    led.close()
    edits = [
        ("qa_steps", "UPDATE qa_steps SET lr = ? WHERE seq = (SELECT max(seq) FROM qa_steps)",
         (np.array([1.0, 2.0, 3.0]).tobytes(),)),
        ("qa_examples", "DELETE FROM qa_examples WHERE first_idx = (SELECT max(first_idx) FROM qa_examples)", ()),
        ("qa_runs", "UPDATE qa_runs SET n_samples = n_samples + 1", ()),
    ]  # fmt: skip
    for table, sql, params in edits:
        copy = tmp_path / f"{table}.db"
        copy.write_bytes((tmp_path / "t.db").read_bytes())
        con = sqlite3.connect(copy)
        con.execute(sql, params)
        con.commit()
        con.close()
        led = Ledger.open(copy)
        assert led.verify().ok
        res = led.verify(deep=True)
        assert not res.ok and table in (res.reason or ""), res.reason
        led.close()


def test_postgresql_run_equals_brute_force(pg_url: str, small_folds: None) -> None:
    led, _ = build(pg_url, "mean", chunk=4)
    check_against_oracle(led, "mean")
    res = led.verify(deep=True)
    assert res.ok and "query_aggregates" in res.indexers_checked, res.reason
    led.close()


def test_query_bench_quick_runs(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "query_bench.py"), "--quick", "--json", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True, cwd=repo,
    )  # fmt: skip
    res = json.loads(out.stdout)
    assert res["steps"] == 2 * (4096 // 64) and res["folds"] >= 1
    assert res["append_ms_with_aggregates"] > 0 and res["append_ms_without"] > 0
    assert len(res["query_ms"]) == 6 and all(v > 0 for v in res["query_ms"].values())
