"""Ingest throughput and memory: a generated Labelbox Export v2 NDJSON export into a fresh SQLite ledger.

Each data row is a consensus row with two labels (one bounding box + one radio classification each, a
review, consensus scores, workflow history), so N labels = N/2 lines. Reports labels/s (median of
``--repeats`` runs, each into a new ledger), the parse-only rate measured in the same run (to show where
the time goes), by wall clock and by CPU time of the ingesting process (on a shared machine the wall rate
mostly measures the other processes), and the peak RSS of a child process that does one full ingest (bounded memory: it must not
grow with N).

    .venv/bin/python benchmarks/ingest_bench.py            # 1M labels (the BENCHMARKS.md figures)
    .venv/bin/python benchmarks/ingest_bench.py --quick    # 2k labels, seconds
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger import Ledger, ingest  # noqa: E402
from ledger.ingest import labelbox_format  # noqa: E402
from ledger.ingest.context import ParseContext  # noqa: E402
from ledger.ingest.pseudonym import Pseudonymizer  # noqa: E402
from ledger.ingest.reader import ExportReader  # noqa: E402

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
    """(labels/s by wall clock, labels/s by CPU time): stream + parse + normalise + record hashing."""
    ctx = ParseContext(Pseudonymizer(KEY))
    n = 0
    t, c = time.perf_counter(), time.process_time()
    for line, _, el in ExportReader(path):
        for r in labelbox_format.parse("labelbox.export_v2", el, line, ctx):
            r.body({"sha256": "0" * 64, "size": 0, "name": "x"})
            n += 1
    return n / (time.perf_counter() - t), n / (time.process_time() - c)


def one_ingest(export: Path, ledger_path: Path) -> tuple[float, float, int]:
    t, c = time.perf_counter(), time.process_time()
    with Ledger.open(ledger_path, create=True) as led:
        s = ingest.labelbox(export, led, pseudonym_key=Pseudonymizer(KEY))
    return time.perf_counter() - t, time.process_time() - c, s.records


def child(export: str, ledger_path: str) -> None:
    """Run one ingest in this process and print wall and CPU seconds, records and peak RSS (MiB)."""
    secs, cpu, n = one_ingest(Path(export), Path(ledger_path))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"seconds": secs, "cpu_seconds": cpu, "records": n, "peak_rss_mib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="2k labels, 2 repeats (seconds)")
    ap.add_argument("--child", nargs=2, metavar=("EXPORT", "LEDGER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    labels, repeats = (2000, 2) if args.quick else (args.labels, args.repeats)
    with tempfile.TemporaryDirectory(prefix="ingest-bench-") as tmp:
        export = Path(tmp) / "export.ndjson"
        generate(export, labels)
        size_mb = export.stat().st_size / 1e6
        rates = []
        cpu_rates = []
        peaks = []
        for i in range(repeats):
            db = Path(tmp) / f"ledger{i}.db"
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(export), str(db)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            res = json.loads(out.strip().splitlines()[-1])
            assert res["records"] == labels, res
            rates.append(res["records"] / res["seconds"])
            cpu_rates.append(res["records"] / res["cpu_seconds"])
            peaks.append(res["peak_rss_mib"])
            db_mb = db.stat().st_size / 1e6
            for f in Path(tmp).glob(f"ledger{i}.db*"):
                os.remove(f)
        parse_rate, parse_cpu_rate = parse_only(export)
    med = statistics.median(rates)
    med_cpu = statistics.median(cpu_rates)
    print(
        f"labels: {labels:,} in {labels // 2:,} NDJSON rows ({size_mb:.1f} MB export, {db_mb:.1f} MB ledger)"
    )
    print(
        f"ingest: median {med:,.0f} labels/s over {repeats} runs (each {', '.join(f'{r:,.0f}' for r in rates)})"
    )
    print(f"ingest by CPU time of the ingesting process: median {med_cpu:,.0f} labels/s")
    print(
        f"parse+normalise only (same run): {parse_rate:,.0f} labels/s wall, {parse_cpu_rate:,.0f} labels/s CPU; "
        f"ledger share of ingest CPU time {1 - med_cpu / parse_cpu_rate:.0%}"
    )
    print(
        f"peak RSS of one ingest process: max {max(peaks):.0f} MiB (runs: {', '.join(f'{p:.0f}' for p in peaks)})"
    )
    print(
        json.dumps(
            {
                "labels": labels,
                "median_labels_per_s": med,
                "median_labels_per_s_cpu": med_cpu,
                "parse_labels_per_s": parse_rate,
                "parse_labels_per_s_cpu": parse_cpu_rate,
                "peak_rss_mib": max(peaks),
            }
        )
    )


if __name__ == "__main__":
    main()
