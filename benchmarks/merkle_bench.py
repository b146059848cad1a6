"""RFC 9162 Merkle code speed: tree hash vs raw hashlib, and O(log n) proofs from stored subtree hashes.

1. Root of N leaves (``ledger.merkle.root``) against one raw ``hashlib.sha256`` per leaf over the same leaves,
   measured in the same run; the ratio is merkle / raw (an RFC 9162 tree needs 2N-1 hashes, so ~2 is the floor
   for small leaves).
2. Proof generation through the callback API (``inclusion_proof_from`` / ``consistency_proof_from``) against a
   simulated store that holds every perfect-subtree hash in a dict and answers non-perfect ranges by the RFC
   split (what a storage layer does with its stored subtrees and frontier): time per proof, store reads per
   proof, and ``verify_inclusion`` / ``verify_consistency`` time.

Times are medians of ``--repeats`` runs; ratios are medians of per-run ratios (raw and merkle interleaved).

    .venv/bin/python benchmarks/merkle_bench.py            # 1M leaves (the BENCHMARKS.md figures)
    .venv/bin/python benchmarks/merkle_bench.py --quick    # 20k leaves, seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ledger import merkle  # noqa: E402


class SimulatedStore:
    """Perfect-subtree hashes keyed by (level, index), as a storage layer keeps them; counts reads."""

    def __init__(self, leaves: list[bytes]) -> None:
        level = merkle.leaf_hashes(leaves)
        self.levels = [level]
        while len(level) > 1:
            level = [merkle.node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
            self.levels.append(level)
        self.size = len(leaves)
        self.reads = 0

    def get_subtree(self, start: int, end: int) -> bytes:
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            self.reads += 1
            lvl = n.bit_length() - 1
            return self.levels[lvl][start >> lvl]
        k = merkle.split_point(n)
        return merkle.node_hash(self.get_subtree(start, start + k), self.get_subtree(start + k, end))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(n: int, repeats: int, proofs: int, leaf_bytes: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    leaves = [rng.randbytes(leaf_bytes) for _ in range(n)]
    sha = hashlib.sha256

    def raw() -> None:
        for d in leaves:
            sha(d).digest()

    # Interleave raw / leaf / root within each repeat and take the median of the per-repeat ratios, so
    # load from other processes on the machine hits both sides of a ratio alike.
    raws, leafs, roots_t = [], [], []
    for _ in range(repeats):
        raws.append(_time(raw))
        leafs.append(_time(lambda: merkle.leaf_hashes(leaves)))
        roots_t.append(_time(lambda: merkle.root(leaves)))
    t_raw, t_leaf, t_root = (statistics.median(x) for x in (raws, leafs, roots_t))
    root_ratio = statistics.median(r / w for r, w in zip(roots_t, raws, strict=True))
    leaf_ratio = statistics.median(r / w for r, w in zip(leafs, raws, strict=True))

    store = SimulatedStore(leaves)
    root = merkle.root_from(n, store.get_subtree)
    assert root == merkle.root(leaves)
    sizes = sorted({n, n - 1, n // 2 + 3, 3 * n // 4 + 1})
    roots = {s: merkle.root_from(s, store.get_subtree) for s in sizes}

    incl_gen, incl_ver, incl_reads = [], [], []
    for _ in range(proofs):
        size = rng.choice(sizes)
        index = rng.randrange(size)
        store.reads = 0
        t0 = time.perf_counter()
        proof = merkle.inclusion_proof_from(index, size, store.get_subtree)
        t1 = time.perf_counter()
        ok = merkle.verify_inclusion(index, size, store.levels[0][index], proof, roots[size])
        t2 = time.perf_counter()
        assert ok
        incl_gen.append(t1 - t0)
        incl_ver.append(t2 - t1)
        incl_reads.append(store.reads)

    cons_gen, cons_ver, cons_reads = [], [], []
    for _ in range(proofs):
        new = rng.choice(sizes)
        old = rng.randrange(1, new + 1)
        store.reads = 0
        t0 = time.perf_counter()
        proof = merkle.consistency_proof_from(old, new, store.get_subtree)
        t1 = time.perf_counter()
        old_root = merkle.root_from(old, store.get_subtree)
        t2 = time.perf_counter()
        ok = merkle.verify_consistency(old, new, proof, old_root, roots[new])
        t3 = time.perf_counter()
        assert ok
        cons_gen.append(t1 - t0)
        cons_ver.append(t3 - t2)
        cons_reads.append(store.reads)

    us = 1e6
    return {
        "leaves": n,
        "leaf_bytes": leaf_bytes,
        "repeats": repeats,
        "raw_sha256_s": t_raw,
        "leaf_hashes_s": t_leaf,
        "root_s": t_root,
        "root_vs_raw_ratio": root_ratio,
        "leaf_hashes_vs_raw_ratio": leaf_ratio,
        "root_leaves_per_s": n / t_root,
        "inclusion_proofs": proofs,
        "inclusion_gen_us_median": statistics.median(incl_gen) * us,
        "inclusion_gen_us_p99": sorted(incl_gen)[int(0.99 * (len(incl_gen) - 1))] * us,
        "inclusion_reads_median": statistics.median(incl_reads),
        "inclusion_reads_max": max(incl_reads),
        "inclusion_verify_us_median": statistics.median(incl_ver) * us,
        "consistency_gen_us_median": statistics.median(cons_gen) * us,
        "consistency_reads_median": statistics.median(cons_reads),
        "consistency_reads_max": max(cons_reads),
        "consistency_verify_us_median": statistics.median(cons_ver) * us,
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="20k leaves, 3 repeats, 200 proofs (seconds)")
    ap.add_argument("--leaves", type=int, default=1_000_000)
    ap.add_argument(
        "--leaf-bytes", type=int, default=256, help="bytes per leaf (a step entry's leaf data is ~200-400)"
    )
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--proofs", type=int, default=2000)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.leaves, args.repeats, args.proofs = 20_000, 3, 200
    if args.leaves < 2:
        ap.error("--leaves must be >= 2")
    r = run(args.leaves, args.repeats, args.proofs, args.leaf_bytes)
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print(f"leaves: {r['leaves']:,} x {r['leaf_bytes']} B, medians of {r['repeats']} runs")
    print(f"  raw hashlib.sha256 per leaf : {r['raw_sha256_s']:.3f} s")
    print(
        f"  RFC 9162 leaf hashes        : {r['leaf_hashes_s']:.3f} s  ({r['leaf_hashes_vs_raw_ratio']:.2f}x raw)"
    )
    print(
        f"  RFC 9162 root               : {r['root_s']:.3f} s  ({r['root_vs_raw_ratio']:.2f}x raw, "
        f"{r['root_leaves_per_s'] / 1e6:.2f}M leaves/s)"
    )
    print(f"proofs from stored subtrees ({r['inclusion_proofs']} each, medians):")
    print(
        f"  inclusion   : generate {r['inclusion_gen_us_median']:.1f} us (p99 {r['inclusion_gen_us_p99']:.1f}), "
        f"{r['inclusion_reads_median']:.0f} reads (max {r['inclusion_reads_max']}), "
        f"verify {r['inclusion_verify_us_median']:.1f} us"
    )
    print(
        f"  consistency : generate {r['consistency_gen_us_median']:.1f} us, {r['consistency_reads_median']:.0f} reads "
        f"(max {r['consistency_reads_max']}), verify {r['consistency_verify_us_median']:.1f} us"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
