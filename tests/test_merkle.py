"""RFC 9162 Merkle code against public golden vectors, their mutants, and a naive recursive oracle.

Golden vectors: tests/vectors/merkle.json (transcribed from transparency-dev/merkle, see its "origin").
The oracle below is deliberately naive: it follows the recursive definitions of RFC 9162 §2.1 literally
(MTH, PATH, SUBPROOF) and verifies proofs by recursive reconstruction, sharing no code with
``ledger.merkle`` beyond the two one-line hash primitives, which the golden vectors pin down.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import merkle

VECTORS = json.loads((Path(__file__).parent / "vectors" / "merkle.json").read_text())
LEAVES = [bytes.fromhex(x) for x in VECTORS["leaves_hex"]]
ROOTS = [bytes.fromhex(x) for x in VECTORS["roots_hex_by_size"]]
SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


# ------------------------------------------------------------------------------------------------------
# Naive reference implementation (test oracle)
# ------------------------------------------------------------------------------------------------------


def _h_leaf(d: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + d).digest()


def _h_node(a: bytes, b: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + a + b).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


class Naive:
    """MTH / PATH / SUBPROOF straight from RFC 9162, memoised per (start, end) so large sizes stay cheap."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves
        self.mth = lru_cache(maxsize=None)(self._mth)

    def _mth(self, start: int, end: int) -> bytes:
        n = end - start
        if n == 0:
            return hashlib.sha256(b"").digest()
        if n == 1:
            return _h_leaf(self.leaves[start])
        k = _k(n)
        return _h_node(self.mth(start, start + k), self.mth(start + k, end))

    def path(self, m: int, start: int, end: int) -> list[bytes]:
        n = end - start
        if n == 1:
            return []
        k = _k(n)
        if m < k:
            return self.path(m, start, start + k) + [self.mth(start + k, end)]
        return self.path(m - k, start + k, end) + [self.mth(start, start + k)]

    def subproof(self, m: int, start: int, end: int, b: bool) -> list[bytes]:
        n = end - start
        if m == n:
            return [] if b else [self.mth(start, end)]
        k = _k(n)
        if m <= k:
            return self.subproof(m, start, start + k, b) + [self.mth(start + k, end)]
        return self.subproof(m - k, start + k, end, False) + [self.mth(start, start + k)]


def naive_root_from_path(i: int, n: int, leaf: bytes, proof: list[bytes]) -> bytes | None:
    """Rebuild the root by consuming the proof top-down along the recursive PATH structure."""
    if n == 1:
        return leaf if not proof else None
    if not proof:
        return None
    k = _k(n)
    *rest, last = proof
    if i < k:
        sub = naive_root_from_path(i, k, leaf, rest)
        return None if sub is None else _h_node(sub, last)
    sub = naive_root_from_path(i - k, n - k, leaf, rest)
    return None if sub is None else _h_node(last, sub)


def naive_verify_inclusion(i: int, n: int, leaf: bytes, proof: list[bytes], root: bytes) -> bool:
    if not (0 <= i < n) or len(leaf) != 32 or len(root) != 32 or any(len(p) != 32 for p in proof):
        return False
    return naive_root_from_path(i, n, leaf, proof) == root


def _naive_cons(m: int, n: int, proof: list[bytes], b: bool, seed: bytes) -> tuple[bytes, bytes] | None:
    """(old hash, new hash) of this subtree, consuming the proof along SUBPROOF's recursion."""
    if m == n:
        if b:
            return (seed, seed) if not proof else None
        return (proof[0], proof[0]) if len(proof) == 1 else None
    if not proof:
        return None
    k = _k(n)
    *rest, last = proof
    if m <= k:
        r = _naive_cons(m, k, rest, b, seed)
        return None if r is None else (r[0], _h_node(r[1], last))
    r = _naive_cons(m - k, n - k, rest, False, seed)
    return None if r is None else (_h_node(last, r[0]), _h_node(last, r[1]))


def naive_verify_consistency(m: int, n: int, proof: list[bytes], r1: bytes, r2: bytes) -> bool:
    if m <= 0 or m > n or len(r1) != 32 or len(r2) != 32 or any(len(p) != 32 for p in proof):
        return False
    if m == n:
        return not proof and r1 == r2
    r = _naive_cons(m, n, proof, True, r1)
    return r is not None and r == (r1, r2)


def _flip(b: bytes, byte: int, bit: int) -> bytes:
    out = bytearray(b)
    out[byte] ^= 1 << bit
    return bytes(out)


# ------------------------------------------------------------------------------------------------------
# Golden vectors
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", range(9))
def test_golden_roots(size: int) -> None:
    assert merkle.root(LEAVES[:size]) == ROOTS[size]
    assert merkle.root_from(size, lambda s, e: merkle.root(LEAVES[s:e])) == ROOTS[size]
    assert Naive(LEAVES).mth(0, size) == ROOTS[size]


def test_empty_tree_and_hash_primitives() -> None:
    assert merkle.root([]) == hashlib.sha256(b"").digest() == merkle.EMPTY_ROOT
    assert merkle.leaf_hash(b"") == ROOTS[1]
    assert merkle.node_hash(merkle.leaf_hash(LEAVES[0]), merkle.leaf_hash(LEAVES[1])) == ROOTS[2]


def test_golden_node_hashes_of_perfect_subtrees() -> None:
    for level, row in enumerate(VECTORS["node_hashes_hex_by_level"]):
        width = 1 << level
        for i, hx in enumerate(row):
            assert merkle.root(LEAVES[i * width : (i + 1) * width]).hex() == hx


@pytest.mark.parametrize("vec", VECTORS["inclusion"], ids=lambda v: f"{v['index']}-of-{v['size']}")
def test_golden_inclusion(vec: dict) -> None:
    i, n = vec["index"], vec["size"]
    proof = [bytes.fromhex(p) for p in vec["proof"]]
    assert merkle.inclusion_proof(LEAVES[:n], i) == proof
    assert merkle.verify_inclusion(i, n, merkle.leaf_hash(LEAVES[i]), proof, ROOTS[n])


@pytest.mark.parametrize("vec", VECTORS["inclusion"][1:], ids=lambda v: f"{v['index']}-of-{v['size']}")
def test_golden_inclusion_transparency_dev_probes(vec: dict) -> None:
    """The fixed wrong-index / wrong-height probes transparency-dev asserts for its non-trivial vectors."""
    i, n = vec["index"], vec["size"]
    proof = [bytes.fromhex(p) for p in vec["proof"]]
    leaf = merkle.leaf_hash(LEAVES[i])
    for wi, wn in [(i - 1, n), (i + 1, n), (i ^ 2, n), (i, n * 2), (i, n // 2)]:
        assert not merkle.verify_inclusion(wi, wn, leaf, proof, ROOTS[n]), (wi, wn)


@pytest.mark.parametrize("vec", VECTORS["consistency"], ids=lambda v: f"{v['old_size']}-to-{v['new_size']}")
def test_golden_consistency(vec: dict) -> None:
    m, n = vec["old_size"], vec["new_size"]
    proof = [bytes.fromhex(p) for p in vec["proof"]]
    assert merkle.consistency_proof(LEAVES[:n], m) == proof
    assert merkle.verify_consistency(m, n, proof, ROOTS[m], ROOTS[n])


# ------------------------------------------------------------------------------------------------------
# Negative mutants: every golden proof and every proof of trees up to 8 leaves
# ------------------------------------------------------------------------------------------------------


def _inclusion_cases() -> list[tuple[int, int]]:
    return [(i, n) for n in range(1, 9) for i in range(n)]


def _consistency_cases() -> list[tuple[int, int]]:
    return [(m, n) for n in range(1, 9) for m in range(1, n)]


@pytest.mark.parametrize(("index", "size"), _inclusion_cases())
def test_inclusion_mutants_rejected(index: int, size: int) -> None:
    leaves = LEAVES[:size]
    root = ROOTS[size]
    leaf = merkle.leaf_hash(leaves[index])
    proof = merkle.inclusion_proof(leaves, index)
    assert merkle.verify_inclusion(index, size, leaf, proof, root)

    def rejected(i: int, n: int, lf: bytes, pr: list[bytes], rt: bytes) -> bool:
        return not merkle.verify_inclusion(i, n, lf, pr, rt)

    # Every bit of every proof element, of the root and of the leaf hash.
    for k in range(len(proof)):
        for byte in range(32):
            for bit in range(8):
                mutated = list(proof)
                mutated[k] = _flip(proof[k], byte, bit)
                assert rejected(index, size, leaf, mutated, root), (k, byte, bit)
    for byte in range(32):
        for bit in range(8):
            assert rejected(index, size, leaf, proof, _flip(root, byte, bit))
            assert rejected(index, size, _flip(leaf, byte, bit), proof, root)
    # Wrong index: any other index, and out of range.
    for other in [*range(size), size, size + 1, -1]:
        if other != index:
            assert rejected(other, size, leaf, proof, root), other
    # Wrong size: rejected unless the tree shape at that size gives the same path (the root binds the size).
    for other in range(0, 2 * size + 3):
        if other != size:
            expected = naive_verify_inclusion(index, other, leaf, proof, root)
            assert merkle.verify_inclusion(index, other, leaf, proof, root) == expected, other
    # Truncated, extended, garbage, swapped.
    if proof:
        assert rejected(index, size, leaf, proof[:-1], root)
        assert rejected(index, size, leaf, proof[1:], root)
    assert rejected(index, size, leaf, [*proof, root], root)
    assert rejected(index, size, leaf, [root, *proof], root)
    assert rejected(index, size, leaf, [*proof, SOME_HASH], root)
    assert rejected(index, size, leaf, [*proof, b""], root)
    assert rejected(index, size, leaf, [b"", *proof], root)
    if len(proof) > 1:
        assert rejected(index, size, leaf, [proof[0], SOME_HASH, *proof[1:]], root)
        for a in range(len(proof)):
            for b in range(a + 1, len(proof)):
                if proof[a] != proof[b]:
                    swapped = list(proof)
                    swapped[a], swapped[b] = swapped[b], swapped[a]
                    assert rejected(index, size, leaf, swapped, root), (a, b)
    # transparency-dev's fixed probes: empty root, random root, wrong leaf.
    assert rejected(index, size, leaf, proof, merkle.EMPTY_ROOT)
    assert rejected(index, size, leaf, proof, SOME_HASH)
    assert rejected(index, size, b"WrongLeaf", proof, root)


@pytest.mark.parametrize(("old", "new"), _consistency_cases())
def test_consistency_mutants_rejected(old: int, new: int) -> None:
    leaves = LEAVES[:new]
    r1, r2 = ROOTS[old], ROOTS[new]
    proof = merkle.consistency_proof(leaves, old)
    assert proof and merkle.verify_consistency(old, new, proof, r1, r2)

    def rejected(m: int, n: int, pr: list[bytes], a: bytes, b: bytes) -> bool:
        return not merkle.verify_consistency(m, n, pr, a, b)

    for k in range(len(proof)):
        for byte in range(32):
            for bit in range(8):
                mutated = list(proof)
                mutated[k] = _flip(proof[k], byte, bit)
                assert rejected(old, new, mutated, r1, r2), (k, byte, bit)
    for byte in range(32):
        for bit in range(8):
            assert rejected(old, new, proof, _flip(r1, byte, bit), r2)
            assert rejected(old, new, proof, r1, _flip(r2, byte, bit))
    # transparency-dev's probes: wrong sizes, wrong/swapped roots, empty proof, garbage, truncation.
    for m, n in [(old - 1, new), (old + 1, new), (old ^ 2, new), (old, new * 2), (old, new // 2)]:
        if (m, n) != (old, new):
            assert rejected(m, n, proof, r1, r2), (m, n)
    # Every other size pair: accepted exactly when the naive recursive verifier accepts.
    for m in range(0, new + 3):
        for n in range(0, 2 * new + 2):
            want = naive_verify_consistency(m, n, proof, r1, r2)
            assert merkle.verify_consistency(m, n, proof, r1, r2) == want, (m, n)
    assert rejected(old, new, proof, b"WrongRoot", r2)
    assert rejected(old, new, proof, r1, b"WrongRoot")
    assert rejected(old, new, proof, r2, r1)
    assert rejected(old, new, [], r1, r2)
    assert rejected(old, new, proof[:-1], r1, r2)
    for extra in (b"", r1, r2, SOME_HASH):
        assert rejected(old, new, [*proof, extra], r1, r2)
        assert rejected(old, new, [extra, *proof], r1, r2)
    assert rejected(old, new, [proof[0], *proof], r1, r2)
    for a in range(len(proof)):
        for b in range(a + 1, len(proof)):
            if proof[a] != proof[b]:
                swapped = list(proof)
                swapped[a], swapped[b] = swapped[b], swapped[a]
                assert rejected(old, new, swapped, r1, r2), (a, b)


def test_consistency_edge_cases_match_transparency_dev() -> None:
    r1, r2 = ROOTS[1], ROOTS[2]
    e = merkle.EMPTY_ROOT
    # From size 0 everything is rejected, including 0 -> 0 (current transparency-dev behaviour).
    assert not merkle.verify_consistency(0, 0, [], e, e)
    assert not merkle.verify_consistency(0, 1, [], e, r1)
    assert not merkle.verify_consistency(0, 1, [e], e, e)
    # Equal sizes: empty proof and equal roots only.
    assert merkle.verify_consistency(1, 1, [], r1, r1)
    assert not merkle.verify_consistency(1, 1, [], r1, r2)
    assert not merkle.verify_consistency(1, 1, [e], e, e)
    # Time travel and empty proofs.
    assert not merkle.verify_consistency(2, 1, [], r2, r1)
    assert not merkle.verify_consistency(1, 2, [], r1, r2)


@pytest.mark.parametrize(
    "args",
    [
        (0, 0, SOME_HASH, [], SOME_HASH),
        (1, 0, SOME_HASH, [], SOME_HASH),
        (2, 1, SOME_HASH, [], SOME_HASH),
        (-1, 4, SOME_HASH, [], SOME_HASH),
        (0, 1, b"", [], b""),
        (0, 1, SOME_HASH, [], b""),
        (0, 1, b"", [], SOME_HASH),
        (0, 2, SOME_HASH, [None], SOME_HASH),
        (0, 2, SOME_HASH, ["x" * 32], SOME_HASH),
        (0, 2, SOME_HASH, None, SOME_HASH),
        (True, 2, SOME_HASH, [SOME_HASH], SOME_HASH),
        ("0", 2, SOME_HASH, [SOME_HASH], SOME_HASH),
        (0, 2.0, SOME_HASH, [SOME_HASH], SOME_HASH),
    ],
)
def test_verifiers_never_raise_on_garbage(args: tuple) -> None:
    assert merkle.verify_inclusion(*args) is False
    i, n, leaf, proof, rt = args
    assert merkle.verify_consistency(i, n, proof, leaf, rt) is False


def test_single_leaf_tree_like_transparency_dev() -> None:
    h = merkle.leaf_hash(b"data")
    assert merkle.verify_inclusion(0, 1, h, [], h)
    assert not merkle.verify_inclusion(0, 1, b"", [], h)
    assert not merkle.verify_inclusion(0, 1, h, [], b"")


def test_generators_reject_out_of_domain_arguments() -> None:
    with pytest.raises(ValueError, match="not in"):
        merkle.inclusion_proof(LEAVES[:3], 3)
    with pytest.raises(ValueError, match="not in"):
        merkle.inclusion_proof([], 0)
    with pytest.raises(ValueError, match="not in"):
        merkle.inclusion_proof(LEAVES[:3], -1)
    with pytest.raises(ValueError, match="0 < old_size"):
        merkle.consistency_proof(LEAVES[:3], 0)
    with pytest.raises(ValueError, match="0 < old_size"):
        merkle.consistency_proof(LEAVES[:3], 4)
    with pytest.raises(ValueError):
        merkle.root_from(-1, lambda s, e: b"")
    assert merkle.consistency_proof(LEAVES[:3], 3) == []


# ------------------------------------------------------------------------------------------------------
# Callback API: the storage layer's O(log n) contract
# ------------------------------------------------------------------------------------------------------


class CountingStore:
    """Answers get_subtree from the naive oracle and records every range it was asked for."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.naive = Naive(leaves)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, start: int, end: int) -> bytes:
        assert 0 <= start < end <= len(self.naive.leaves)
        self.calls.append((start, end))
        return self.naive.mth(start, end)


def _disjoint(ranges: list[tuple[int, int]]) -> bool:
    ranges = sorted(ranges)
    return all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 100, 1000, 1025])
def test_callback_api_uses_log_many_disjoint_subtrees(size: int) -> None:
    leaves = [i.to_bytes(4, "big") for i in range(size)]
    store = CountingStore(leaves)
    depth = (size - 1).bit_length()
    for index in {0, size // 3, size // 2, size - 1}:
        store.calls.clear()
        proof = merkle.inclusion_proof_from(index, size, store)
        assert proof == store.naive.path(index, 0, size)
        assert len(store.calls) <= depth and _disjoint(store.calls)
        assert all(not (s <= index < e) for s, e in store.calls)
    for old in {1, size // 3 or 1, size // 2 or 1, size}:
        store.calls.clear()
        proof = merkle.consistency_proof_from(old, size, store)
        assert proof == store.naive.subproof(old, 0, size, True)
        assert len(store.calls) <= depth + 1 and _disjoint(store.calls)
    assert merkle.root_from(size, store) == merkle.root(leaves)


# ------------------------------------------------------------------------------------------------------
# Differential testing against the naive oracle
# ------------------------------------------------------------------------------------------------------


def test_exhaustive_small_trees_against_oracle() -> None:
    leaves = [bytes([i]) * (i % 5) for i in range(40)]
    for n in range(0, 41):
        naive = Naive(leaves[:n])
        root = merkle.root(leaves[:n])
        assert root == naive.mth(0, n)
        for i in range(n):
            proof = merkle.inclusion_proof(leaves[:n], i)
            assert proof == naive.path(i, 0, n)
            assert merkle.verify_inclusion(i, n, merkle.leaf_hash(leaves[i]), proof, root)
        for m in range(1, n + 1):
            proof = merkle.consistency_proof(leaves[:n], m)
            assert proof == naive.subproof(m, 0, n, True)
            assert merkle.verify_consistency(m, n, proof, naive.mth(0, m), root)
            assert naive_verify_consistency(m, n, proof, naive.mth(0, m), root)


leaf_lists = st.integers(min_value=1, max_value=300).flatmap(
    lambda n: st.lists(st.binary(max_size=12), min_size=n, max_size=n)
)


@settings(max_examples=40, deadline=None)
@given(leaves=leaf_lists, data=st.data())
def test_differential_against_naive_oracle(leaves: list[bytes], data: st.DataObject) -> None:
    n = len(leaves)
    naive = Naive(leaves)
    root = merkle.root(leaves)
    assert root == naive.mth(0, n)
    indices = data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=12))
    for i in indices:
        proof = merkle.inclusion_proof(leaves, i)
        assert proof == naive.path(i, 0, n)
        assert merkle.verify_inclusion(i, n, merkle.leaf_hash(leaves[i]), proof, root)
        # A random wrong size is judged exactly as the naive verifier judges it.
        other = data.draw(st.integers(0, 2 * n + 2))
        lh = merkle.leaf_hash(leaves[i])
        assert merkle.verify_inclusion(i, other, lh, proof, root) == naive_verify_inclusion(
            i, other, lh, proof, root
        )
    pairs = data.draw(st.lists(st.tuples(st.integers(1, n), st.integers(1, n)), min_size=1, max_size=12))
    for a, b in pairs:
        m, nn = min(a, b), max(a, b)
        proof = merkle.consistency_proof(leaves[:nn], m)
        assert proof == naive.subproof(m, 0, nn, True)
        r1, r2 = naive.mth(0, m), naive.mth(0, nn)
        assert merkle.verify_consistency(m, nn, proof, r1, r2)
        if proof:
            k = data.draw(st.integers(0, len(proof) - 1))
            bad = list(proof)
            bad[k] = _flip(bad[k], data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7)))
            assert not merkle.verify_consistency(m, nn, bad, r1, r2)


def test_benchmark_quick_mode_runs() -> None:
    """benchmarks/merkle_bench.py --quick runs and reports O(log n) store reads per proof."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "merkle_bench.py"), "--quick", "--json"],
        check=True,
        capture_output=True,
        text=True,
        cwd=repo,
        timeout=120,
    )
    r = json.loads(out.stdout)
    depth = (r["leaves"] - 1).bit_length()
    assert r["leaves"] == 20_000 and r["root_vs_raw_ratio"] > 0
    assert r["inclusion_reads_max"] <= 2 * depth and r["consistency_reads_max"] <= 3 * depth
