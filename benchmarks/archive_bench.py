"""Archival figures: database bytes before / after archiving a run's steps, segment bytes, archive and verify time.

Builds a ledger of tracker-shaped step entries (the scale run's generator and schedule, ``benchmarks/scale.py``:
1M examples x 10 epochs in shuffled batches; B x L
``grad_norms`` <f4 (gamma-distributed, like real norms), ``losses`` <f4, ``rules`` <i1, ``weight_index`` <u1;
~4 KB JSON body) with the query-aggregates indexer on, then archives every step (``ledger.archive.archive_run``)
and reports:

* bytes: the database before, after archiving (SQLite: file pages, with the pages now free; PostgreSQL: the
  ledger tables' total relation size) and after ``VACUUM`` (SQLite) / ``VACUUM FULL payloads`` (PostgreSQL);
  raw payload bytes and the segment files' bytes (zstd);
* time, wall and CPU (``time.process_time``): the archive call (of which its full verify, and writing +
  re-reading the segments), and full ``verify`` with the segments (re-hashing every archived byte from them)
  and without (segments moved away: descriptors and tree only);
* SQLite only: the ratio of full verify with segments to full verify of an unarchived copy of the same ledger,
  measured in interleaved rounds (median of ``--rounds``).

    python benchmarks/archive_bench.py                    # SQLite, the scale run: 39,062 steps, B=256, L=16
    python benchmarks/archive_bench.py --db postgres --steps 10000
    python benchmarks/archive_bench.py --quick            # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scale  # noqa: E402  (the scale run's step generator)

from audit import aggregates  # noqa: E402, F401  (the query-aggregates indexer, as a real run has it)
from ledger.archive import archive_run, database_bytes, free_bytes, reclaim  # noqa: E402
from ledger.store import Ledger  # noqa: E402


def _timed(fn: Any) -> tuple[Any, float, float]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def _fill(led: Ledger, a: argparse.Namespace) -> int:
    layers = [f"blocks.{i}.fc" for i in range(a.layers)]
    run_seq = led.append("run", scale._run_body(layers))
    chunk: list[Any] = []
    for item in scale._steps(a.examples, a.epochs, a.batch, layers, run_seq, a.steps):
        chunk.append(item)
        if len(chunk) == 16:
            led.append_many(chunk)
            chunk.clear()
    if chunk:
        led.append_many(chunk)
    return led.size


def bench(target: str, a: argparse.Namespace, work: Path, sqlite_path: Path | None) -> dict[str, Any]:
    led = Ledger.open(target, create=True)
    size = _fill(led, a)
    if sqlite_path is not None:
        led.close()  # checkpoint the WAL, then keep an unarchived copy for the interleaved verify baseline
        shutil.copy(sqlite_path, work / "baseline.db")
        led = Ledger.open(target)
    out: dict[str, Any] = {"db": led.dialect, "steps": a.steps, "batch": a.batch, "layers": a.layers}
    seg_dir = work / "segments"
    res, wall, cpu = _timed(lambda: archive_run(led, scale.RUN, size, seg_dir))
    out["archive"] = {
        "entries": res.entries,
        "payloads": res.payloads,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "of_which_verify_wall_s": round(res.verify_seconds, 3),
        "of_which_segments_wall_s": round(res.write_seconds, 3),
    }
    vac, vwall, _ = _timed(lambda: reclaim(led))
    out["bytes"] = {
        "raw_payloads": res.bytes,
        "segments": res.compressed_bytes,
        "segments_over_raw": round(res.compressed_bytes / res.bytes, 3),
        "db_before": res.db_bytes_before,
        "db_after": res.db_bytes_after,
        "db_free_after": res.free_bytes_after,
        "db_after_vacuum": database_bytes(led),
        "db_free_after_vacuum": free_bytes(led),
        "vacuum_wall_s": round(vwall, 3),
    }
    assert led.root(res.size_before).hex() == res.root

    # verify with the segments (every archived byte re-hashed), interleaved with the unarchived copy
    with_s: list[tuple[float, float]] = []
    base_s: list[tuple[float, float]] = []
    base = Ledger.open(work / "baseline.db") if sqlite_path is not None else None
    for _ in range(a.rounds):
        v, w, c = _timed(led.verify)
        assert v.complete, v.reason
        with_s.append((w, c))
        if base is not None:
            vb, w, c = _timed(base.verify)
            assert vb.complete
            base_s.append((w, c))
    out["verify_with_segments"] = {
        "wall_s": round(statistics.median(w for w, _ in with_s), 3),
        "cpu_s": round(statistics.median(c for _, c in with_s), 3),
        "MB_rehashed": round(v.bytes_hashed / 1e6, 1),
    }
    if base is not None:
        base.close()
        ratios = [wc[1] / bc[1] for wc, bc in zip(with_s, base_s, strict=True)]
        out["verify_unarchived_copy"] = {
            "wall_s": round(statistics.median(w for w, _ in base_s), 3),
            "cpu_s": round(statistics.median(c for _, c in base_s), 3),
        }
        out["verify_cpu_ratio_archived_over_unarchived"] = round(statistics.median(ratios), 2)
    # verify without the segments: tree, leaves, descriptors, archive entries; archived bytes not re-hashed
    shutil.move(seg_dir, work / "moved")
    v, w, c = _timed(led.verify)
    assert v.ok and not v.complete and v.archive is not None
    out["verify_without_segments"] = {
        "wall_s": round(w, 3),
        "cpu_s": round(c, 3),
        "payloads_not_rehashed": v.archive["payloads"] - v.archive["rehashed"],
    }
    led.close()
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgres", "both"], default="sqlite")
    ap.add_argument("--examples", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps", type=int, default=None, help="only the first N steps (default: all)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved verify rounds (median)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one)")
    ap.add_argument("--quick", action="store_true", help="8k examples x 2 epochs at B=64, SQLite, one round")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    if a.quick:
        a.examples, a.epochs, a.batch, a.db, a.rounds = 8192, 2, 64, "sqlite", 1
    full = a.epochs * (a.examples // a.batch)
    a.steps = min(full, a.steps or full)
    load = os.getloadavg()
    results: dict[str, Any] = {"load_avg_before": [round(x, 2) for x in load]}
    with tempfile.TemporaryDirectory(dir=a.dir) as tmp:
        work = Path(tmp)
        if a.db in ("sqlite", "both"):
            (work / "sqlite").mkdir()
            path = work / "sqlite" / "archive_bench.db"
            results["sqlite"] = bench(str(path), a, work / "sqlite", path)
        if a.db in ("postgres", "both"):
            schema, (admin, url) = scale._pg_schema()
            (work / "pg").mkdir()
            try:
                results["postgres"] = bench(url, a, work / "pg", None)
            finally:
                admin.execute(f'DROP SCHEMA "{schema}" CASCADE')
                admin.close()
    results["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(results, indent=None if a.json else 2))
    return results


if __name__ == "__main__":
    main()
