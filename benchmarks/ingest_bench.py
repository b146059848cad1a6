"""Ingest throughput and memory: a generated Labelbox Export v2 NDJSON export into a fresh SQLite ledger.

Each data row is a consensus row with two labels (one bounding box + one radio classification each, a
review, consensus scores, workflow history), so N labels = N/2 lines. Reports labels/s (median of
``--repeats`` runs, each into a new ledger) by wall clock and by CPU time: of the ingesting process alone
and of it plus its parallel-ingest workers (on a shared machine the wall rate mostly measures the other
processes), the parse-only rate of one process measured in the same run (to show where the time goes), and
the peak RSS of the ingesting process and of its largest worker (bounded memory: it must not grow with N).

    .venv/bin/python benchmarks/ingest_bench.py            # 1M labels (the BENCHMARKS.md figures)
    .venv/bin/python benchmarks/ingest_bench.py --quick    # 2k labels, seconds
    .venv/bin/python benchmarks/ingest_bench.py --workers 0 --impl /tmp/old   # older code (git archive)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KEY = bytes(range(32))
PROJECT = "clbenchproject000000000001"


def generate(path: Path, labels: int, annotators: int = 50) -> None:
    """Write ``labels`` labels as ``labels // 2`` consensus data rows (deterministic)."""
    with path.open("w") as fh:
        for row in range(labels // 2):
            ls = []
            for k in range(2):
                n = row * 2 + k
                ls.append(
                    {
                        "id": f"cllabel{n:020d}",
                        "label_kind": "Default",
                        "label_details": {
                            "created_at": "2024-03-01T10:00:00.000+00:00",
                            "updated_at": "2024-03-01T10:00:00.000+00:00",
                            "created_by": f"annotator{(n * 7) % annotators}@example.com",
                            "reviews": [
                                {
                                    "reviewed_at": "2024-03-02T09:00:00.000+00:00",
                                    "reviewed_by": "reviewer@example.com",
                                    "review_action": "Approve" if n % 3 else "Reject",
                                }
                            ],
                        },
                        "performance_details": {
                            "seconds_to_create": 10 + n % 17,
                            "skipped": n % 50 == 0,
                            "consensus_score": (n % 100) / 100,
                        },
                        "annotations": {
                            "objects": [
                                {
                                    "feature_id": f"clfeat{n:020d}",
                                    "feature_schema_id": "clschemabox000000000000001",
                                    "name": "vehicle",
                                    "value": "vehicle",
                                    "annotation_kind": "ImageBoundingBox",
                                    "bounding_box": {
                                        "top": float(n % 400),
                                        "left": 12.5,
                                        "height": 40.0,
                                        "width": 60.25,
                                    },
                                    "classifications": [],
                                }
                            ],
                            "classifications": [
                                {
                                    "feature_id": f"clradio{n:020d}",
                                    "name": "weather",
                                    "value": "weather",
                                    "radio_answer": {
                                        "name": "sunny" if n % 2 else "cloudy",
                                        "value": "sunny",
                                    },
                                }
                            ],
                            "relationships": [],
                        },
                    }
                )
            line = {
                "data_row": {
                    "id": f"cldatarow{row:020d}",
                    "global_key": f"img/{row:08d}.jpg",
                    "external_id": None,
                },
                "projects": {
                    PROJECT: {
                        "labels": ls,
                        "project_details": {
                            "workflow_status": "IN_REVIEW",
                            "consensus_expected_label_count": 2,
                            "workflow_history": [
                                {
                                    "action": "Submit",
                                    "created_at": "2024-03-01T10:05:30.000+00:00",
                                    "created_by": "reviewer@example.com",
                                    "previous_task_name": "Initial labeling task",
                                    "next_task_name": "Review",
                                }
                            ],
                        },
                    }
                },
            }
            fh.write(json.dumps(line) + "\n")


def parse_only(path: Path) -> tuple[float, float]:
    """(labels/s by wall clock, labels/s by CPU time): stream + parse + normalise + encode, one process."""
    sys.path.insert(0, str(REPO))
    from ledger.ingest import labelbox_format
    from ledger.ingest.context import ParseContext
    from ledger.ingest.pseudonym import Pseudonymizer
    from ledger.ingest.reader import ExportReader

    ctx = ParseContext(Pseudonymizer(KEY))
    ref = {"sha256": "0" * 64, "size": 0, "name": "x"}
    n = 0
    t, c = time.perf_counter(), time.process_time()
    for line, _, el in ExportReader(path):
        for r in labelbox_format.parse("labelbox.export_v2", el, line, ctx):
            r.encode(ref)
            n += 1
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def child(export: str, ledger_path: str, workers: str, impl: str, bulk: str) -> None:
    """Run one ingest in this process; print wall and CPU seconds (own, workers'), records and peak RSS."""
    sys.path.insert(0, impl or str(REPO))  # impl: older code, for a same-run before / after
    import ledger
    from ledger import Ledger, ingest
    from ledger.ingest.pseudonym import Pseudonymizer

    kw: dict[str, object] = {} if workers == "auto" else {"workers": int(workers)}
    if bulk != "auto":
        kw["bulk"] = bulk == "on"
    t, c = time.perf_counter(), time.process_time()
    with Ledger.open(Path(ledger_path), create=True) as led:
        s = ingest.labelbox(export, led, pseudonym_key=Pseudonymizer(KEY), **kw)
    secs, cpu = time.perf_counter() - t, time.process_time() - c
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, waited for by the ingest
    own = resource.getrusage(resource.RUSAGE_SELF)
    res = {
        "seconds": secs,
        "cpu_seconds": cpu,
        "worker_cpu_seconds": kids.ru_utime + kids.ru_stime,
        "records": s.records,
        "peak_rss_mib": own.ru_maxrss / 1024,  # Linux: KiB
        "worker_peak_rss_mib": kids.ru_maxrss / 1024,
        "impl": str(Path(ledger.__file__).resolve().parents[1]),
    }
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2k labels, 2 repeats (seconds)")
    ap.add_argument("--workers", default="auto", help="parallel-ingest workers: auto (default) or a number")
    ap.add_argument("--impl", default="", help="import ledger from this directory (older code, git archive)")
    ap.add_argument("--export", type=Path, help="use (or write and keep) the generated export at this path")
    ap.add_argument("--no-parse-only", action="store_true", help="skip the parse-only measurement")
    ap.add_argument(
        "--bulk",
        choices=("auto", "on", "off"),
        default="auto",
        help="bulk transaction (SQLite rollback journal): the library's choice (on for exports >= 64 MiB), on, "
        "or off (WAL, as with `gradledger ingest --shared`)",
    )
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    labels, repeats = (2000, 2) if args.quick else (args.labels, args.repeats)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        export = args.export or Path(tmp) / "export.ndjson"
        if not export.exists():
            generate(export, labels)
        size_mb = export.stat().st_size / 1e6
        runs = []
        for i in range(repeats):
            db = Path(tmp) / f"ledger{i}.db"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                str(export),
                str(db),
                args.workers,
                args.impl,
                args.bulk,
            ]
            res = json.loads(
                subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            )
            assert res["records"] == labels, res
            runs.append(res)
            db_mb = db.stat().st_size / 1e6
            for f in Path(tmp).glob(f"ledger{i}.db*"):
                os.remove(f)
        parse_rate, parse_cpu_rate = (0.0, 0.0) if args.no_parse_only else parse_only(export)
    load_after = os.getloadavg()[0]
    rates = [labels / r["seconds"] for r in runs]
    med = statistics.median(rates)
    med_cpu = statistics.median(labels / r["cpu_seconds"] for r in runs)
    med_total = statistics.median(labels / (r["cpu_seconds"] + r["worker_cpu_seconds"]) for r in runs)
    peak, worker_peak = max(r["peak_rss_mib"] for r in runs), max(r["worker_peak_rss_mib"] for r in runs)
    print(
        f"code: {runs[0]['impl']}; workers: {args.workers}; bulk: {args.bulk}; load average {load_before:.1f} before, {load_after:.1f} after"
    )
    print(
        f"labels: {labels:,} in {labels // 2:,} NDJSON rows ({size_mb:.1f} MB export, {db_mb:.1f} MB ledger)"
    )
    print(
        f"ingest: median {med:,.0f} labels/s wall over {repeats} runs (each {', '.join(f'{r:,.0f}' for r in rates)})"
    )
    print(
        f"ingest by CPU time: the ingesting process {med_cpu:,.0f} labels/s; with its workers {med_total:,.0f} labels/s"
    )
    if parse_rate:
        print(
            f"parse+normalise+encode only, one process (same run): {parse_rate:,.0f} labels/s wall, "
            f"{parse_cpu_rate:,.0f} labels/s CPU"
        )
    print(
        f"peak RSS: ingesting process {peak:.0f} MiB, largest worker {worker_peak:.0f} MiB (bounded: no growth with N)"
    )
    summary = {
        "labels": labels,
        "workers": args.workers,
        "bulk": args.bulk,
        "median_labels_per_s": med,
        "median_labels_per_s_cpu": med_cpu,
        "median_labels_per_s_cpu_with_workers": med_total,
        "parse_labels_per_s": parse_rate,
        "parse_labels_per_s_cpu": parse_cpu_rate,
        "peak_rss_mib": peak,
        "worker_peak_rss_mib": worker_peak,
        "load_before": load_before,
        "load_after": load_after,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
