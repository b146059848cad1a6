"""Ledger benchmarks: append throughput, full-verify speed vs raw SHA-256, inclusion proofs at 1M entries.

    .venv/bin/python benchmarks/ledger_bench.py            # full mode (figures quoted in BENCHMARKS.md)
    .venv/bin/python benchmarks/ledger_bench.py --quick    # seconds; exercised by tests/test_store.py
    .venv/bin/python benchmarks/ledger_bench.py --no-proofs --impl /path/to/old/checkout   # same bench, old code

Append: per-step entries shaped like the tracker's (body with 256 example ids, 16 layer names, lr, update
norms and one routing-weight row; one float32 [256, 16] ``grad_norms`` payload) after a ``run`` entry, into a
fresh SQLite ledger (WAL, synchronous=FULL), both one transaction per step (``append``) and batched
(``append_many``). ``--aggregates`` also times ``append_many`` with the query-aggregates indexer
(``audit.aggregates``) running inside every append transaction (in a child process: importing it registers
the indexer process-wide).
Verify: ``Ledger.verify()`` over that ledger; the baseline is ``hashlib.sha256`` over the same stored bytes
(every body and payload), timed in the same run; the ratio is baseline time / verify time.
Proofs: a ledger of 1M tiny entries (10k in --quick), ``Ledger.prove`` for random seqs and
``merkle.verify_inclusion`` of each proof.
Every figure is the median of several runs, by wall clock and by CPU time of this process (``*_cpu``): on a
shared machine the wall figures mostly measure the other processes, the CPU figures what the code costs
(fsync waits show up only in wall time).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_IMPL = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--impl=")), None)
sys.path.insert(0, _IMPL or str(Path(__file__).resolve().parent.parent))

from ledger import Ledger, merkle  # noqa: E402

B, L = 256, 16


def step_body(step: int) -> dict[str, object]:
    return {
        "run": "bench",
        "run_seq": 1,
        "step": step,
        "epoch": step // 100,
        "example_ids": [f"ex-{(step * B + i) % 1_000_000:07d}" for i in range(B)],
        "layers": [f"blocks.{i // 2}.{'attn' if i % 2 else 'mlp'}.proj" for i in range(L)],
        "micro_batches": [B],
        "lr": [1e-3] * L,
        "update_norms": [0.0123456 * (i + 1) for i in range(L)],
        "policy_seq": None,
        "flags": {},
        "weight_rows": [[1.0] * L],  # routing weights all 1: one distinct row, no weight_index payload
    }


RUN_BODY = {
    "run": "bench",
    "architecture": {"layers": [{"name": n} for n in step_body(0)["layers"]]},  # type: ignore[union-attr]
    "loss_reduction": "mean",
}


def make_steps(n: int, seed: int = 0) -> list[tuple[str, dict[str, object], dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [("step", step_body(i), {"grad_norms": rng.random((B, L), dtype=np.float32)}) for i in range(n)]


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _clock()
    return t1[0] - t0[0], t1[1] - t0[1]


def _fresh(path: Path) -> Ledger:
    led = Ledger.open(path, create=True)
    assert led.append("run", RUN_BODY) == 1  # step bodies name run_seq 1
    return led


def _rates(prefix: str, n: int, times: list[tuple[float, float]]) -> dict[str, float]:
    wall = statistics.median(t[0] for t in times)
    cpu = statistics.median(t[1] for t in times)
    return {
        f"{prefix}_entries_per_s": n / wall,
        f"{prefix}_norms_per_s": n * B * L / wall,
        f"{prefix}_entries_per_s_cpu": n / cpu,
        f"{prefix}_norms_per_s_cpu": n * B * L / cpu,
    }


def bench_append(tmp: Path, n: int, runs: int, batch: int, n_single: int) -> dict[str, float]:
    steps = make_steps(n)
    single, batched = [], []
    for r in range(runs):
        with _fresh(tmp / f"single{r}.db") as led:
            t = _clock()
            for kind, body, pl in steps[:n_single]:
                led.append(kind, body, pl)
            single.append(_since(t))
        with _fresh(tmp / f"batched{r}.db") as led:
            t = _clock()
            for i in range(0, n, batch):
                led.append_many(steps[i : i + batch])
            batched.append(_since(t))
    return {
        "entries": n,
        "append_many_batch": batch,
        **_rates("append", n_single, single),
        **_rates("append_many", n, batched),
    }


def bench_aggregates(tmp: Path, n: int, runs: int, batch: int) -> dict[str, float]:
    """append_many with the query-aggregates indexer in every transaction (run by the child process)."""
    import audit.aggregates  # noqa: F401  (registers the indexer)

    steps = make_steps(n)
    times = []
    for r in range(runs):
        with _fresh(tmp / f"agg{r}.db") as led:
            t = _clock()
            for i in range(0, n, batch):
                led.append_many(steps[i : i + batch])
            times.append(_since(t))
    return _rates("append_many_aggregates", n, times)


def bench_verify(path: Path, runs: int) -> dict[str, float]:
    with Ledger.open(path) as led:
        blobs: list[bytes] = []
        for e in led.entries():
            blobs.append(e.body_bytes)
            blobs.extend(e.payload_bytes(name) for name in e.descriptors)
        nbytes = sum(len(b) for b in blobs)
        vt, ht = [], []
        for _ in range(runs):
            t = _clock()
            res = led.verify()
            vt.append(_since(t))
            assert res.ok, res.reason
            assert res.bytes_hashed == nbytes, (res.bytes_hashed, nbytes)
            t = _clock()
            for b in blobs:
                hashlib.sha256(b).digest()
            ht.append(_since(t))
    out: dict[str, float] = {"verify_bytes": nbytes}
    for i, suffix in ((0, ""), (1, "_cpu")):
        v, h = statistics.median(t[i] for t in vt), statistics.median(t[i] for t in ht)
        out[f"verify_mb_per_s{suffix}"] = nbytes / v / 1e6
        out[f"sha256_mb_per_s{suffix}"] = nbytes / h / 1e6
        out[f"verify_to_sha256_ratio{suffix}"] = statistics.median(
            hh[i] / vv[i] for vv, hh in zip(vt, ht, strict=True)
        )
    return out


def bench_proofs(tmp: Path, n: int, samples: int) -> dict[str, float]:
    path = tmp / "proofs.db"
    t = time.perf_counter()
    with Ledger.open(path, create=True) as led:
        chunk = 10_000
        i = led.size
        while i < n:
            m = min(chunk, n - i)
            led.append_many([("tick", {"i": j}) for j in range(i, i + m)])
            i += m
    build = time.perf_counter() - t
    rng = random.Random(1)
    gen, ver = [], []
    with Ledger.open(path) as led:
        size = led.size
        for _ in range(samples):
            seq = rng.randrange(size)
            t = time.perf_counter()
            proof = led.prove(seq)
            gen.append(time.perf_counter() - t)
            t = time.perf_counter()
            ok = merkle.verify_inclusion(proof.seq, proof.size, proof.leaf_hash, proof.hashes, proof.root)
            ver.append(time.perf_counter() - t)
            assert ok
    return {
        "proof_ledger_entries": size,
        "proof_ledger_build_s": build,
        "inclusion_proof_gen_ms": statistics.median(gen) * 1e3,
        "inclusion_proof_verify_ms": statistics.median(ver) * 1e3,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes; finishes in seconds")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--aggregates", action="store_true", help="also time appends with the query indexer")
    ap.add_argument("--no-proofs", action="store_true", help="skip the 1M-entry proof ledger")
    ap.add_argument("--runs", type=int, default=None, help="repetitions (default 3, quick 2)")
    ap.add_argument("--impl", default=None, help="import ledger from this checkout (compare old code)")
    ap.add_argument("--child-aggregates", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_aggregates:
        n, runs, batch = (int(x) for x in args.child_aggregates)
        with tempfile.TemporaryDirectory(prefix="gl-bench-") as d:
            print(json.dumps(bench_aggregates(Path(d), n, runs, batch)))
        return {}
    n_steps, runs, n_proof, samples = (150, 2, 5_000, 50) if args.quick else (3_000, 3, 1_000_000, 500)
    runs = args.runs or runs
    n_single = min(n_steps, 100 if args.quick else 500)
    with tempfile.TemporaryDirectory(prefix="gl-bench-") as d:
        tmp = Path(d)
        out: dict[str, float] = {"quick": float(args.quick)}
        out.update(bench_append(tmp, n_steps, runs, batch=64, n_single=n_single))
        out.update(bench_verify(tmp / "batched0.db", runs))
        if args.aggregates:
            cmd = [sys.executable, __file__, "--child-aggregates", str(n_steps), str(runs), "64"]
            if args.impl:
                cmd.append(f"--impl={args.impl}")
            child = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            out.update(json.loads(child.strip().splitlines()[-1]))
        if not args.no_proofs:
            out.update(bench_proofs(tmp, n_proof, samples))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v:,.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    return out


if __name__ == "__main__":
    main()
