"""Scale run: a simulated 1M-example x 10-epoch training run (B=256, 16 layers: ~39k steps, 10M sample-steps)
appended to SQLite and to PostgreSQL through the real path, then verified, queried and proved.

Each step is what ``instrument.tracker`` writes (step v 3, ``ledger.records.StepEncoder``): ``grad_norms`` <f4
[B, L] and ``losses`` <f4 [B]; the example ids through the run's example table (each id once, in the first-epoch
step that meets it: ``new_ids``; then an ``example_index`` payload of 3 bytes per row for 1M examples); each
example's policy rule once (``rules`` <i1 in first-epoch steps only) and the weights by rule from the run entry's
``weight_table``; a body with the step, epoch, one learning rate (cosine schedule, shared by the layers) and 16
full-precision update norms. ``--step-format 2`` writes the previous format (ids, layer names, weight rows and
rules in every step) from the same generator. Steps are appended ``--chunk`` per transaction (what the tracker's
background writer does when steps wait) with the query-aggregates indexer on, as a real run has it. Payloads
are generated before each chunk's timer starts.

Reported per backend: append time (wall and process CPU) as a ratio to raw ``hashlib.sha256`` over the same
payload bytes (measured on the same bytes in the same run); ledger size in bytes per sample-layer-step (core
tables: entries, payloads, tree nodes; the query-aggregates tables separately; database files in total) and the
per-step constant beyond the 4-byte norms; full ``verify`` time (wall and CPU) and MB/s; ``query layer`` latency
(median of 3, whole run, top 20); inclusion-proof generation and verification time (medians over 200 random
entries); the load average before and after.

``--steps N`` appends only the first N steps of the schedule and extrapolates append and verify time linearly to
the full run (their per-step costs are flat: O(log n) tree work per append, a linear scan for verify); the output
says which figures are measured and which extrapolated. Sizes from a prefix are not the run's: first-epoch steps
carry their examples' ids, later ones 3 bytes per row; shrink ``--examples`` instead for a smaller whole run.

    python benchmarks/scale.py                         # full: SQLite and PostgreSQL
    python benchmarks/scale.py --db sqlite --examples 100000
    python benchmarks/scale.py --quick                 # seconds (SQLite only)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit import aggregates, query  # noqa: E402
from ledger import merkle  # noqa: E402
from ledger.records import STEP_VERSION, StepEncoder, encode_weights  # noqa: E402
from ledger.store import Ledger  # noqa: E402

PG_URL = os.environ.get("GRADLEDGER_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
RUN = "scale"


def _run_body(layers: list[str]) -> dict[str, Any]:
    return {
        "run": RUN,
        "architecture": {"layers": [{"name": n, "type": "torch.nn.Linear", "params": {}} for n in layers]},
        "optimizer": {"class": "torch.optim.SGD", "param_groups": []},
        "seed": 0,
        "loss_reduction": "mean",
        "policy_seq": None,
        "manifest_seq": None,
        **StepEncoder(layers, _weight_table(len(layers))).run_fields(),
    }


def _schedule(n_ex: int, epochs: int, b: int) -> int:
    return epochs * (n_ex // b)


def _weight_table(n_l: int) -> np.ndarray:
    """The run's policy bound to the layers: rule 0 all layers, rule 1 the first half, default (-1) none."""
    half = [1.0] * (n_l // 2) + [0.0] * (n_l - n_l // 2)
    return np.array([[1.0] * n_l, half, [0.0] * n_l], np.float32)


def _steps(
    n_ex: int, epochs: int, b: int, layers: list[str], run_seq: int, limit: int, fmt: int = STEP_VERSION
) -> Iterator[Any]:
    """Tracker-shaped step entries (kind, body, payloads, v) in schedule order, at most ``limit``.

    Built as ``instrument.tracker`` builds them: the full (v 2 shaped) body and payloads, then, for step v 3,
    ``StepEncoder.encode`` (``fmt=2`` keeps the v 2 form, for a same-run before/after). A shuffled pass over the
    examples per epoch; one policy rule per example (the tracker routes each id once), weights from the run's
    table by rule; a cosine learning-rate schedule shared by all layers; random float64 update norms (as
    measured values are: full-precision JSON numbers); gamma-distributed norms and uniform losses."""
    rng = np.random.default_rng(1)
    n_l = len(layers)
    wtab = _weight_table(n_l)
    rule_of = rng.choice([-1, 0, 1], size=n_ex, p=[0.8, 0.15, 0.05]).astype("<i1")  # -1 = the default
    total = _schedule(n_ex, epochs, b)
    enc = StepEncoder(layers, wtab)
    k = 0
    for epoch in range(epochs):
        order = rng.permutation(n_ex)
        for s in range(0, n_ex - b + 1, b):
            if k >= limit:
                return
            rows_at = order[s : s + b]
            rules = rule_of[rows_at]
            weights = wtab[np.where(rules < 0, len(wtab) - 1, rules)]
            rows, index = encode_weights(weights)
            lr = 0.05 * (1 + math.cos(math.pi * k / total))
            body: dict[str, Any] = {
                "run": RUN, "run_seq": run_seq, "step": k, "epoch": epoch,
                "example_ids": [f"ex-{i:07d}" for i in rows_at], "layers": layers, "micro_batches": [b],
                "lr": [lr] * n_l, "update_norms": (rng.random(n_l) * 0.01).tolist(), "policy_seq": None,
                "flags": {}, "weight_rows": rows,
            }  # fmt: skip
            payloads = {
                "grad_norms": rng.gamma(2.0, 0.5, size=(b, n_l)).astype(np.float32),
                "rules": rules,
                "losses": rng.random(b, dtype=np.float32),
            }
            if index is not None:
                payloads["weight_index"] = index
            if fmt == 2:
                yield ("step", body, payloads, 2)
            else:
                yield ("step", *enc.encode(body, payloads, weights), STEP_VERSION)
            k += 1


def _median_ms(xs: list[float]) -> float:
    return round(1000 * statistics.median(xs), 3)


def _sizes(led: Ledger, sqlite_path: Path | None) -> dict[str, int]:
    """Stored bytes per table group (SQLite: dbstat pages of each table and its indexes; PostgreSQL:
    pg_total_relation_size, i.e. with TOAST and indexes): ``core`` (entries, payloads, tree nodes, meta, signed
    checkpoints), ``aggregates`` (query tables ``qa_*``), ``other``, and ``files`` (database files / all tables)."""
    from sqlalchemy import text

    from ledger import schema

    core = {t.name for t in schema.CORE_TABLES}
    with led.engine.connect() as conn:
        if sqlite_path is not None:
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            owner = dict(conn.execute(text("SELECT name, tbl_name FROM sqlite_master")).all())
            rows = conn.execute(text("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")).all()
            tables: dict[str, int] = {}
            for name, size in rows:
                t = str(owner.get(name, name))
                tables[t] = tables.get(t, 0) + int(size)
        else:
            rows = conn.execute(
                text(
                    "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
                )
            ).all()
            tables = {str(n): int(s) for n, s in rows}
    out = {"core": 0, "aggregates": 0, "other": 0}
    for name, size in tables.items():
        group = "core" if name in core else "aggregates" if name.startswith("qa_") else "other"
        out[group] += size
    if sqlite_path is not None:
        out["files"] = sum(p.stat().st_size for p in sqlite_path.parent.glob(sqlite_path.name + "*"))
        with led.engine.connect() as conn:
            out["sqlite_page_size"] = int(conn.exec_driver_sql("PRAGMA page_size").scalar_one())
    else:
        out["files"] = sum(tables.values())
    return out


def _logical_bytes(led: Ledger) -> tuple[int, int, int]:
    """(payload bytes, body bytes, steps) of the run's step entries, as stored (before any page overhead)."""
    from sqlalchemy import func, select

    from ledger import schema

    with led.engine.connect() as conn:
        pay = conn.execute(select(func.sum(func.length(schema.payloads.c.data)))).scalar() or 0
        e = schema.entries
        body, n = conn.execute(
            select(func.sum(func.length(e.c.body)), func.count()).where(e.c.kind == "step")
        ).one()
    return int(pay), int(body or 0), int(n)


def bench(target: str, a: argparse.Namespace, sqlite_path: Path | None) -> dict[str, Any]:
    layers = [f"blocks.{i}.fc" for i in range(a.layers)]
    full = _schedule(a.examples, a.epochs, a.batch)
    limit = min(full, a.steps or full)
    led = Ledger.open(target, create=True)
    run_seq = led.append("run", _run_body(layers))

    hash_s = append_s = 0.0
    payload_bytes = 0
    n = 0
    chunk: list[Any] = []
    t_wall = time.perf_counter()
    append_cpu = 0.0
    load = [round(x, 1) for x in os.getloadavg()]

    def flush() -> None:
        nonlocal hash_s, append_s, payload_bytes, append_cpu
        t0 = time.perf_counter()
        for _, _, pl, _ in chunk:
            for arr in pl.values():
                hashlib.sha256(arr.tobytes()).digest()
        t1 = time.perf_counter()
        c1 = time.process_time()
        led.append_many(chunk)
        append_cpu += time.process_time() - c1
        t2 = time.perf_counter()
        hash_s += t1 - t0
        append_s += t2 - t1
        payload_bytes += sum(arr.nbytes for _, _, pl, _ in chunk for arr in pl.values())
        chunk.clear()

    for item in _steps(a.examples, a.epochs, a.batch, layers, run_seq, limit, a.step_format):
        chunk.append(item)
        n += 1
        if len(chunk) == a.chunk:
            flush()
            if not a.json and n % (a.chunk * 100) == 0:
                print(
                    f"  {n}/{limit} steps ({time.perf_counter() - t_wall:.0f} s)", file=sys.stderr, flush=True
                )
    if chunk:
        flush()
    scale = full / n
    sample_layer_steps = n * a.batch * a.layers
    res: dict[str, Any] = {
        "db": led.dialect,
        "step_format": a.step_format,
        "steps": n,
        "full_run_steps": full,
        "sample_steps": n * a.batch,
        "layers": a.layers,
        "chunk": a.chunk,
        "append_s": round(append_s, 2),
        "append_ms_per_step": round(1000 * append_s / n, 3),
        "append_cpu_ms_per_step": round(1000 * append_cpu / n, 3),
        "hash_s_same_payload_bytes": round(hash_s, 3),
        "append_over_hash": round(append_s / hash_s, 1),
        "payload_MB": round(payload_bytes / 1e6, 1),
    }
    if scale > 1:
        res["append_s_extrapolated_full_run"] = round(append_s * scale, 1)

    sizes = _sizes(led, sqlite_path)
    pay, body, n_steps = _logical_bytes(led)
    res["bytes"] = sizes
    res["core_bytes_per_sample_layer_step"] = round(sizes["core"] / sample_layer_steps, 3)
    res["core_per_step_constant_bytes"] = round((sizes["core"] - 4 * sample_layer_steps) / n)
    res["all_bytes_per_sample_layer_step"] = round(sizes["files"] / sample_layer_steps, 3)
    # logical split: grad_norms are the B x L part (4 bytes); the rest is per sample (ids, losses, rule, row index)
    # and per step (layer names, lr, hashes, descriptors)
    norms_b = 4 * sample_layer_steps
    res["logical_bytes_per_step"] = {
        "grad_norms": round(norms_b / n_steps),
        "other_payloads": round((pay - norms_b) / n_steps),
        "body": round(body / n_steps),
        "stored_core_total": round(sizes["core"] / n),
    }

    t0, c0 = time.perf_counter(), time.process_time()
    v = led.verify()
    verify_s = time.perf_counter() - t0
    assert v.ok, v.reason
    res["verify_s"] = round(verify_s, 2)
    res["verify_cpu_s"] = round(time.process_time() - c0, 2)  # the process: verify reads in a prefetch thread
    res["verify_MB_per_s"] = round(v.bytes_hashed / 1e6 / verify_s, 1)
    if scale > 1:
        res["verify_s_extrapolated_full_run"] = round(verify_s * scale, 1)

    qs: dict[str, float] = {}
    for lname in (layers[0], layers[-1]):
        xs = []
        for _ in range(3):
            t0 = time.perf_counter()
            r = query.layer(led, RUN, lname, top=20)
            xs.append(time.perf_counter() - t0)
            assert len(r.rows) == 20
        qs[lname] = _median_ms(xs)
    res["query_layer_ms"] = qs

    rng = np.random.default_rng(7)
    size = led.size
    gen, ver = [], []
    for seq in rng.integers(0, size, 200):
        t0 = time.perf_counter()
        p = led.prove(int(seq))
        t1 = time.perf_counter()
        ok = merkle.verify_inclusion(p.seq, p.size, p.leaf_hash, p.hashes, p.root)
        t2 = time.perf_counter()
        assert ok
        gen.append(t1 - t0)
        ver.append(t2 - t1)
    res["inclusion_proof_ms"] = {"generate": _median_ms(gen), "verify": _median_ms(ver), "entries": size}
    res["load_avg_1_5_15"] = {"start": load, "end": [round(x, 1) for x in os.getloadavg()]}
    led.close()
    return res


def _pg_schema() -> tuple[str, Any]:
    import psycopg

    admin = psycopg.connect(PG_URL.replace("postgresql+psycopg://", "postgresql://", 1), autocommit=True)
    schema = f"gl_scale_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE SCHEMA "{schema}"')
    sep = "&" if "?" in PG_URL else "?"
    return schema, (admin, f"{PG_URL}{sep}options=-csearch_path%3D{schema}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument(
        "--steps", type=int, default=None, help="append only this many steps; extrapolate the rest"
    )
    ap.add_argument("--chunk", type=int, default=16, help="steps per append transaction")
    ap.add_argument("--dir", default=None, help="where the SQLite file goes (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="8k examples x 2 epochs, B=64, SQLite")
    ap.add_argument("--json", action="store_true")
    ap.add_argument(
        "--step-format",
        type=int,
        choices=[2, STEP_VERSION],
        default=STEP_VERSION,
        help="2: the previous format",
    )
    ap.add_argument(
        "--sqlite-page-size",
        type=int,
        default=None,
        help="page size of the SQLite file (default: the store's, 4096; 65536 = ledgers made before 268d524)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the SQLite file (for inspection)")
    a = ap.parse_args(argv)
    if a.quick:
        a.examples, a.epochs, a.batch, a.db = 8192, 2, 64, "sqlite"
        aggregates.FOLD_MIN_SAMPLES = 4096  # so the quick run folds too
    out: dict[str, Any] = {
        "config": {k: getattr(a, k) for k in ("examples", "epochs", "batch", "layers", "steps")}
    }
    if a.db in ("sqlite", "both"):
        d = Path(a.dir or tempfile.mkdtemp(prefix="gl-scale-"))
        path = d / f"scale-{uuid.uuid4().hex[:6]}.db"
        if a.sqlite_page_size:  # an empty database with that page size; the ledger is created inside it
            con = sqlite3.connect(path)
            con.execute(f"PRAGMA page_size={int(a.sqlite_page_size)}")
            con.execute("VACUUM")
            con.close()
        try:
            out["sqlite"] = bench(str(path), a, path)
        finally:
            for p in d.glob(path.name + "*"):
                if not a.keep:
                    p.unlink()
    if a.db in ("postgres", "both"):
        schema, (admin, url) = _pg_schema()
        try:
            out["postgres"] = bench(url, a, None)
        finally:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
            admin.close()
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
