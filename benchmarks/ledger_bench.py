"""Ledger benchmarks: append throughput, full-verify speed vs raw SHA-256, inclusion proofs at 1M entries.

    .venv/bin/python benchmarks/ledger_bench.py            # full mode (figures quoted in BENCHMARKS.md)
    .venv/bin/python benchmarks/ledger_bench.py --quick    # seconds; exercised by tests/test_store.py

Append: per-step entries shaped like the tracker's (body with 256 example ids, 16 layer names, lr and
update norms; one float32 [256, 16] ``grad_norms`` payload), into a fresh SQLite ledger (WAL,
synchronous=FULL), both one transaction per step (``append``) and batched (``append_many``).
Verify: ``Ledger.verify()`` over that ledger; the baseline is ``hashlib.sha256`` over the same stored bytes
(every body and payload), timed in the same run; the ratio is baseline time / verify time.
Proofs: a ledger of 1M tiny entries (10k in --quick), ``Ledger.prove`` for random seqs and
``merkle.verify_inclusion`` of each proof.
Every figure is the median of several runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    }


def make_steps(n: int, seed: int = 0) -> list[tuple[str, dict[str, object], dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    return [("step", step_body(i), {"grad_norms": rng.random((B, L), dtype=np.float32)}) for i in range(n)]


def bench_append(tmp: Path, n: int, runs: int, batch: int) -> dict[str, float]:
    steps = make_steps(n)
    single, batched = [], []
    for r in range(runs):
        with Ledger.open(tmp / f"single{r}.db", create=True) as led:
            t = time.perf_counter()
            for kind, body, pl in steps:
                led.append(kind, body, pl)
            single.append(time.perf_counter() - t)
        with Ledger.open(tmp / f"batched{r}.db", create=True) as led:
            t = time.perf_counter()
            for i in range(0, n, batch):
                led.append_many(steps[i : i + batch])
            batched.append(time.perf_counter() - t)
    s, b = statistics.median(single), statistics.median(batched)
    return {
        "entries": n,
        "append_entries_per_s": n / s,
        "append_norms_per_s": n * B * L / s,
        "append_many_batch": batch,
        "append_many_entries_per_s": n / b,
        "append_many_norms_per_s": n * B * L / b,
    }


def bench_verify(path: Path, runs: int) -> dict[str, float]:
    with Ledger.open(path) as led:
        blobs: list[bytes] = []
        for e in led.entries():
            blobs.append(e.body_bytes)
            blobs.extend(e.payload_bytes(name) for name in e.descriptors)
        nbytes = sum(len(b) for b in blobs)
        vt, ht = [], []
        for _ in range(runs):
            t = time.perf_counter()
            res = led.verify()
            vt.append(time.perf_counter() - t)
            assert res.ok, res.reason
            assert res.bytes_hashed == nbytes, (res.bytes_hashed, nbytes)
            t = time.perf_counter()
            for b in blobs:
                hashlib.sha256(b).digest()
            ht.append(time.perf_counter() - t)
    v, h = statistics.median(vt), statistics.median(ht)
    return {
        "verify_bytes": nbytes,
        "verify_mb_per_s": nbytes / v / 1e6,
        "sha256_mb_per_s": nbytes / h / 1e6,
        "verify_to_sha256_ratio": h / v,
    }


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
    args = ap.parse_args(argv)
    n_steps, runs, n_proof, samples = (150, 2, 5_000, 50) if args.quick else (3_000, 3, 1_000_000, 500)
    with tempfile.TemporaryDirectory(prefix="gl-bench-") as d:
        tmp = Path(d)
        out: dict[str, float] = {"quick": float(args.quick)}
        out.update(bench_append(tmp, n_steps, runs, batch=64))
        out.update(bench_verify(tmp / "batched0.db", runs))
        out.update(bench_proofs(tmp, n_proof, samples))
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:32s} {v:,.3f}" if isinstance(v, float) else f"{k:32s} {v}")
    return out


if __name__ == "__main__":
    main()
