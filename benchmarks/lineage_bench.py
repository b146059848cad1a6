"""Lineage graph and signed export benchmark on a synthetic run with real labels.

Builds a SQLite ledger through the real paths: a generated JSONL export of one label per example (two
annotators per 10 examples, e-mail identities) ingested with ``ledger.ingest``, a ``Manifest``, a ``run`` entry,
then ``epochs`` passes over the examples in steps of ``batch`` with ``layers`` per-sample norms and routing
weights (``append_many`` in chunks of 64 steps; payloads are generated before the timers), and a
``checkpoint`` entry. Then times (median of ``--repeats``):

* ``audit.lineage.graph`` with the defaults (top 20 contribution edges per layer; at most 10,000 example
  nodes, else only top contributors) and, for comparison, GraphML writing of that graph;
* ``audit.export.build_export`` with and without evidence (the first call signs the checkpoint);
* ``audit.export.verify_bundle`` of both bundles (offline: DSSE, note, inclusion proofs, recompute).

    python benchmarks/lineage_bench.py            # full: 50k examples x 20 epochs (1M sample-steps), B=256, 16 layers
    python benchmarks/lineage_bench.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit import export, lineage  # noqa: E402
from ledger import ingest, keys  # noqa: E402
from ledger.ingest.pseudonym import Pseudonymizer  # noqa: E402
from ledger.provenance import Manifest  # noqa: E402
from ledger.store import Ledger, NewEntry  # noqa: E402


def _build(path: Path, n_ex: int, epochs: int, b: int, n_l: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    layers = [f"l{j}" for j in range(n_l)]
    t0 = time.perf_counter()
    with Ledger.open(path, create=True) as led:
        src = path.with_suffix(".jsonl")
        with open(src, "w") as fh:
            for i in range(n_ex):
                fh.write(
                    json.dumps(
                        {"item_id": f"item-{i}", "label_id": f"lab-{i}", "value": str(i % 10),
                         "producer": f"annotator{(i // 10) % 2}@example.com", "consensus": float(i % 5) / 4}
                    ) + "\n"
                )  # fmt: skip
        ingest.ingest("jsonl", src, led, pseudonym_key=Pseudonymizer(bytes(range(32))))
        man = Manifest.create(led, "train", {f"ex{i}": f"lab-{i}" for i in range(n_ex)})
        t_labels = time.perf_counter() - t0
        run_seq = led.append(
            "run",
            {
                "run": "scale",
                "architecture": {
                    "layers": [{"name": n, "type": "torch.nn.Linear", "params": {}} for n in layers]
                },
                "optimizer": {"class": "torch.optim.SGD", "param_groups": []},
                "seed": seed,
                "loss_reduction": "mean",
                "policy_seq": None,
                "manifest_seq": man.seq,
                "manifest_digest": man.digest,
                "dp": None,
            },
        )
        wtab = np.array([[1.0] * n_l, [0.5] * n_l, [1.0] * (n_l // 2) + [0.0] * (n_l - n_l // 2)], np.float32)
        steps: list[NewEntry] = []
        k = 0
        for epoch in range(epochs):
            order = rng.permutation(n_ex)
            for s in range(0, n_ex - b + 1, b):
                body = {
                    "run": "scale", "run_seq": run_seq, "step": k, "epoch": epoch,
                    "example_ids": [f"ex{i}" for i in order[s : s + b]], "layers": layers, "micro_batches": [b],
                    "lr": [0.1] * n_l, "update_norms": None, "policy_seq": None,
                }  # fmt: skip
                pl = {
                    "grad_norms": rng.gamma(2.0, 0.5, size=(b, n_l)).astype(np.float32),
                    "weights": wtab[rng.integers(0, 3, size=b)],
                }
                steps.append(NewEntry("step", body, pl))
                k += 1
        t1 = time.perf_counter()
        for i in range(0, len(steps), 64):
            led.append_many(steps[i : i + 64])
        t_steps = time.perf_counter() - t1
        led.append(
            "checkpoint",
            {"run": "scale", "run_seq": run_seq, "tag": "final", "step": k, "layers": {
                n: {"sha256": hashlib.sha256(n.encode()).hexdigest(), "params": {}} for n in layers},
             "state_dict": {}, "state_dict_sha256": hashlib.sha256(b"synthetic").hexdigest()},
        )  # fmt: skip
        size = led.size
    return {"steps": k, "sample_steps": k * b, "entries": size, "labels_s": t_labels, "steps_s": t_steps}


def _median(fn: Any, repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (seconds)")
    ap.add_argument("--examples", type=int, default=50_000)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.examples, a.epochs, a.batch, a.layers, a.repeats = 512, 2, 64, 4, 1
    tmp = Path(a.dir or tempfile.mkdtemp(prefix="gl-lbench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    db = tmp / "lineage.db"
    info = _build(db, a.examples, a.epochs, a.batch, a.layers, seed=0)
    kf = keys.save_keypair(tmp / "keys", "bench")
    priv, pub = keys.load_private_key(kf.private), keys.load_verifier(kf.public)
    res: dict[str, Any] = {
        "config": {k: getattr(a, k) for k in ("examples", "epochs", "batch", "layers", "repeats")},
        "ledger": {**info, "bytes": db.stat().st_size},
    }
    with Ledger.open(db) as led:
        t_graph, g = _median(lambda: lineage.graph(led, run="scale"), a.repeats)
        t_graphml, _ = _median(lambda: lineage.write(g, tmp / "g.graphml", "graphml"), a.repeats)
        res["lineage"] = {
            "build_s": t_graph,
            "graphml_write_s": t_graphml,
            "nodes": g.number_of_nodes(),
            "edges": g.number_of_edges(),
            "examples_truncated": g.graph["examples_truncated"],
            "sample_steps_per_s": info["sample_steps"] / t_graph,
        }
        first = time.perf_counter()
        export.build_export(led, "scale", priv, "bench")  # signs the checkpoint once
        res["export_first_call_s"] = time.perf_counter() - first
        t_lean, lean = _median(lambda: export.build_export(led, "scale", priv, "bench"), a.repeats)
        t_ev, ev = _median(lambda: export.build_export(led, "scale", priv, "bench", evidence=True), a.repeats)
    lean_s, ev_s = json.dumps(lean), json.dumps(ev)
    t_vlean, _ = _median(lambda: export.verify_bundle(lean_s, pub), a.repeats)
    t_vev, rep = _median(lambda: export.verify_bundle(ev_s, pub), a.repeats)
    assert all(c.status == "ok" for c in rep.checks)
    res["export"] = {
        "no_evidence_s": t_lean,
        "evidence_s": t_ev,
        "bundle_bytes_no_evidence": len(lean_s),
        "bundle_bytes_evidence": len(ev_s),
        "evidence_entries": rep.evidence_entries,
        "verify_no_evidence_s": t_vlean,
        "verify_evidence_s": t_vev,
        "verify_evidence_vs_graph_build": t_vev / t_graph,
    }
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
