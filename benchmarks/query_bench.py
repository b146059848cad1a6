"""Query aggregates benchmark: aggregate write cost per step and ``query layer`` latency at scale.

Builds a synthetic ledger through the real append path (``Ledger.append`` per step, one transaction each, as
the tracker does): one ``run`` entry, then ``epochs`` passes over ``examples`` ids in a fresh random order, in
steps of ``batch`` with ``layers`` per-sample norms (random float32), routing weights drawn from 4 rule rows
and per-sample losses. Payload bytes are generated before the timer starts.

Write cost: the first ``--paired`` steps are appended one transaction each, alternately to this ledger
(indexer on) and to a baseline ledger without the indexer (identical entries); the report gives the median
per-step append time of each and their difference. The rest of the run is appended ``--chunk`` steps per
transaction (fewer fsyncs, same entries in the same order); the time spent inside the indexer over the whole
build (folds included) is reported per step, and each fold's duration. Query latency: medians of ``--repeats`` runs of ``audit.query.layer`` (top-K by
label, whole run, both metrics, an early and a late layer), one-epoch and all-epoch ``--epochs`` ranges,
``--by`` groupings are not timed (the synthetic run has no manifest).

    python benchmarks/query_bench.py            # full: 1M examples x 10 epochs, B=256, 16 layers
    python benchmarks/query_bench.py --quick    # seconds
    python benchmarks/query_bench.py --db postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit import aggregates, query  # noqa: E402
from ledger import indexers  # noqa: E402
from ledger.store import Ledger  # noqa: E402


def _run_body(name: str, layers: list[str]) -> dict[str, Any]:
    return {
        "run": name,
        "architecture": {"layers": [{"name": n, "type": "torch.nn.Linear", "params": {}} for n in layers]},
        "optimizer": {"class": "torch.optim.SGD", "param_groups": []},
        "seed": 0,
        "loss_reduction": "mean",
        "policy_seq": None,
        "manifest_seq": None,
    }


def _steps(n_ex: int, epochs: int, b: int, layers: list[str], run_seq: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    wtab = np.array(
        [
            [1.0] * len(layers),
            [0.5] * len(layers),
            [1.0] * 8 + [0.0] * (len(layers) - 8),
            [0.0] * len(layers),
        ],
        np.float32,
    )[:, : len(layers)]
    k = 0
    for epoch in range(epochs):
        order = rng.permutation(n_ex)
        for s in range(0, n_ex - b + 1, b):
            ids = [f"ex-{i:07d}" for i in order[s : s + b]]
            norms = rng.gamma(2.0, 0.5, size=(b, len(layers))).astype(np.float32)
            weights = wtab[rng.integers(0, 4, size=b)]
            body = {
                "run": "scale",
                "run_seq": run_seq,
                "step": k,
                "epoch": epoch,
                "example_ids": ids,
                "layers": layers,
                "micro_batches": [b],
                "lr": [0.1] * len(layers),
                "update_norms": None,
                "policy_seq": None,
                "flags": {},
            }
            yield body, {"grad_norms": norms, "weights": weights, "losses": rng.random(b).astype(np.float32)}
            k += 1


def _median_ms(xs: list[float]) -> float:
    return 1000 * statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--paired", type=int, default=2000, help="steps timed against a no-indexer baseline")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=64, help="steps per transaction after the paired phase")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--db", default=None, help="database URL (default: a SQLite file in a temp dir)")
    ap.add_argument("--dir", default=None, help="where the SQLite files go")
    ap.add_argument(
        "--baseline-db",
        default=None,
        help="database URL for the no-indexer baseline (default: a SQLite file; with --db, give one on the "
        "same server or the paired phase is skipped: a SQLite baseline would not compare like with like)",
    )
    ap.add_argument("--quick", action="store_true", help="4k examples x 2 epochs, B=64, 16 layers")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.examples, a.epochs, a.batch, a.paired, a.repeats = 4096, 2, 64, 40, 3
        aggregates.FOLD_MIN_SAMPLES = 1024  # so the quick run folds too
    layers = [f"blocks.{i}.fc" for i in range(a.layers)]
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="gl-qbench-"))
    target = a.db or str(tmp / "query.db")
    base_target = a.baseline_db or str(tmp / "baseline.db")
    if a.db and not a.baseline_db:
        a.paired = 0

    indexers.unregister(aggregates.NAME)
    baseline = Ledger.open(base_target, create=True)
    indexers.register(aggregates.INDEXER)
    led = Ledger.open(target, create=True)
    run_seq = led.append("run", _run_body("scale", layers))
    indexers.unregister(aggregates.NAME)
    base_run = baseline.append("run", _run_body("scale", layers))
    indexers.register(aggregates.INDEXER)
    assert base_run == run_seq

    apply_s = [0.0]
    folds: list[float] = []
    orig_apply, orig_fold = aggregates.INDEXER.apply, aggregates.INDEXER._fold

    def apply(conn: Any, entries: Any) -> None:
        t0 = time.perf_counter()
        orig_apply(conn, entries)
        apply_s[0] += time.perf_counter() - t0

    def fold(conn: Any, r: Any, through: int) -> None:
        t0 = time.perf_counter()
        orig_fold(conn, r, through)
        folds.append(time.perf_counter() - t0)

    aggregates.INDEXER.apply = apply  # type: ignore[method-assign]
    aggregates.INDEXER._fold = fold  # type: ignore[method-assign]

    t_on: list[float] = []
    t_off: list[float] = []
    n_steps = 0
    chunk: list[Any] = []
    t_build = time.perf_counter()
    for body, payloads in _steps(a.examples, a.epochs, a.batch, layers, run_seq, seed=1):
        if n_steps < a.paired:  # one transaction per step, as the tracker appends, alternating ledgers
            indexers.unregister(aggregates.NAME)
            t0 = time.perf_counter()
            baseline.append("step", body, payloads)
            t_off.append(time.perf_counter() - t0)
            indexers.register(aggregates.INDEXER)
            t0 = time.perf_counter()
            led.append("step", body, payloads)
            t_on.append(time.perf_counter() - t0)
        else:  # the rest in batches of steps (fewer fsyncs; the indexer sees the same entries in order)
            chunk.append(("step", body, payloads))
            if len(chunk) == a.chunk:
                led.append_many(chunk)
                chunk = []
        n_steps += 1
        if n_steps % 2000 == 0 and not a.json:
            print(f"  {n_steps} steps appended ({time.perf_counter() - t_build:.0f} s)", file=sys.stderr)
    if chunk:
        led.append_many(chunk)
    build_s = time.perf_counter() - t_build
    baseline.close()

    res: dict[str, Any] = {
        "db": led.dialect,
        "examples": a.examples,
        "epochs": a.epochs,
        "batch": a.batch,
        "layers": a.layers,
        "steps": n_steps,
        "sample_steps": n_steps * a.batch,
        "build_seconds": round(build_s, 1),
        "append_ms_with_aggregates": round(_median_ms(t_on), 3) if t_on else None,
        "append_ms_without": round(_median_ms(t_off), 3) if t_off else None,
        "aggregate_ms_per_step_paired_median": round(_median_ms(t_on) - _median_ms(t_off), 3)
        if t_on
        else None,
        "paired_steps": len(t_on),
        "indexer_apply_ms_per_step_mean_incl_folds": round(1000 * apply_s[0] / n_steps, 3),
        "folds": len(folds),
        "fold_seconds": [round(x, 2) for x in folds],
    }

    def timed(**kw: Any) -> float:
        xs = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            r = query.layer(led, "scale", top=a.top, **kw)
            xs.append(time.perf_counter() - t0)
            assert len(r.rows) == min(a.top, a.examples)
        return round(_median_ms(xs), 1)

    q: dict[str, float] = {}
    for lname in (layers[0], layers[-1]):
        for metric in ("update", "self-influence"):
            q[f"{lname} {metric} whole run"] = timed(layer=lname, metric=metric)
    q[f"{layers[0]} update epochs 0:0"] = timed(layer=layers[0], epochs=(0, 0))
    last = a.epochs - 1
    q[f"{layers[0]} update epochs 0:{last} (explicit)"] = timed(layer=layers[0], epochs=(0, last))
    res["query_ms"] = q
    led.close()
    if a.db is None:
        res["ledger_bytes"] = sum(os.path.getsize(p) for p in Path(target).parent.glob("query.db*"))
    if a.json:
        print(json.dumps(res, indent=2))
    else:
        for k, v in res.items():
            if k != "query_ms":
                print(f"{k}: {v}")
        for k, v in q.items():
            print(f"query layer {k}: {v} ms (median of {a.repeats})")


if __name__ == "__main__":
    main()
