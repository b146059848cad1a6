"""RFC 9162 §2.1 Merkle tree hashing, inclusion proofs and consistency proofs.

Why hand-written: no maintained Python library implements RFC 9162 (RFC 6962bis) proofs well -- the PyPI
candidates are unmaintained, use different leaf/node domain separation, or build proofs only from an
in-memory list of every leaf. The ledger needs proofs built from *stored* subtree hashes in O(log n)
reads, so the algorithms here are written against a ``get_subtree(start, end)`` callback and the
list-based functions are thin wrappers over it. The code is checked against the public
certificate-transparency / transparency-dev golden vectors and a naive recursive oracle
(``tests/test_merkle.py``).

Conventions
-----------
* Leaves are the raw leaf *data*; ``leaf_hash = SHA-256(0x00 || data)``,
  ``node_hash = SHA-256(0x01 || left || right)``; the empty tree hashes to ``SHA-256(b"")``.
* Indices are 0-based. A tree of ``n > 1`` leaves splits at ``k``, the largest power of two ``< n``.
* Proof lists are ordered bottom-up (leaf level first), exactly as RFC 9162 §2.1.3 / §2.1.4 define them.

Errors (the choice, documented): generators (``inclusion_proof``, ``consistency_proof``, ``*_from``)
raise ``ValueError`` for arguments outside their domain (index not in ``[0, size)``, ``old_size`` not in
``(0, new_size]``) because asking for such a proof is a programming error. Verifiers never raise: any
argument that transparency-dev/merkle's ``proof.VerifyInclusion`` / ``proof.VerifyConsistency`` answers
with an error (index >= size, size2 < size1, consistency from size 0, a non-empty proof for equal sizes,
wrong proof length, wrong hash length) makes them return ``False``, as does a proof that does not hash to
the claimed root. Like current transparency-dev (``RootFromConsistencyProof`` checks ``size1 == 0``
before ``size1 == size2``), every consistency check from size 0 is rejected, even ``0 -> 0``;
``verify_consistency(n, n, [], r1, r2)`` for ``n > 0`` is ``r1 == r2``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_sha256 = hashlib.sha256

#: ``get_subtree(start, end)`` returns the RFC 9162 hash of ``leaves[start:end]`` (``0 <= start < end``).
SubtreeGetter = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """RFC 9162 leaf hash: SHA-256(0x00 || data)."""
    return _sha256(_LEAF_PREFIX + bytes(data)).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """RFC 9162 interior node hash: SHA-256(0x01 || left || right)."""
    return _sha256(_NODE_PREFIX + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly less than ``n`` (``n >= 2``): where RFC 9162 splits a tree."""
    if n < 2:
        raise ValueError(f"split_point needs n >= 2, got {n}")
    return 1 << ((n - 1).bit_length() - 1)


def hash_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """Root hash of a (non-empty) run of leaf hashes.

    Level-by-level reduction where an odd last node is promoted unchanged: this builds exactly the RFC 9162
    tree (left subtrees are always the largest power of two), in O(n) hashes with no recursion.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    sha = _sha256
    prefix = _NODE_PREFIX
    while len(level) > 1:
        nxt = [sha(prefix + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        if len(level) & 1:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def leaf_hashes(leaves: Sequence[bytes]) -> list[bytes]:
    """Leaf hashes of every leaf datum (one SHA-256 each)."""
    sha = _sha256
    prefix = _LEAF_PREFIX
    return [sha(prefix + bytes(d)).digest() for d in leaves]


# ---------------------------------------------------------------------------------------------------------
# Hash-level API: proofs from a get_subtree(start, end) callback (storage layers answer it from stored
# perfect subtrees plus their frontier). Every call asks for disjoint ranges, at most ~2*log2(n) of them.
# ---------------------------------------------------------------------------------------------------------


def root_from(size: int, get_subtree: SubtreeGetter) -> bytes:
    """Root hash of a tree of ``size`` leaves (``SHA-256(b"")`` when empty)."""
    if size < 0:
        raise ValueError(f"tree size must be >= 0, got {size}")
    if size == 0:
        return EMPTY_ROOT
    return get_subtree(0, size)


def inclusion_proof_from(index: int, size: int, get_subtree: SubtreeGetter) -> list[bytes]:
    """RFC 9162 §2.1.3.1 PATH(index, D[0:size]), asking ``get_subtree`` for each sibling subtree.

    Walks from the root down to the leaf; siblings are collected top-down and returned bottom-up.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in [0, {size})")
    proof: list[bytes] = []
    start, end = 0, size
    while end - start > 1:
        mid = start + split_point(end - start)
        if index < mid:
            proof.append(get_subtree(mid, end))
            end = mid
        else:
            proof.append(get_subtree(start, mid))
            start = mid
    proof.reverse()
    return proof


def consistency_proof_from(old_size: int, new_size: int, get_subtree: SubtreeGetter) -> list[bytes]:
    """RFC 9162 §2.1.4.1 PROOF(old_size, D[0:new_size]) via SUBPROOF, asking ``get_subtree`` per node.

    Requires ``0 < old_size <= new_size``; equal sizes give the empty proof.
    """
    if not 0 < old_size <= new_size:
        raise ValueError(f"consistency proof needs 0 < old_size <= new_size, got {old_size}, {new_size}")
    proof: list[bytes] = []
    start, end, m = 0, new_size, old_size
    complete = True  # SUBPROOF's "b": the subtree is still a prefix of the whole old tree
    while True:
        n = end - start
        if m == n:
            if not complete:
                proof.append(get_subtree(start, end))
            break
        k = split_point(n)
        if m <= k:
            proof.append(get_subtree(start + k, end))
            end = start + k
        else:
            proof.append(get_subtree(start, start + k))
            start += k
            m -= k
            complete = False
    proof.reverse()
    return proof


# ---------------------------------------------------------------------------------------------------------
# List-based API (thin wrappers): leaves are the raw leaf data.
# ---------------------------------------------------------------------------------------------------------


def _list_getter(leaves: Sequence[bytes]) -> SubtreeGetter:
    hashes = leaf_hashes(leaves)

    def get_subtree(start: int, end: int) -> bytes:
        return hash_leaf_hashes(hashes[start:end])

    return get_subtree


def root(leaves: Sequence[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash MTH(D[n]) of the raw leaf data."""
    return hash_leaf_hashes(leaf_hashes(leaves))


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """Inclusion proof for ``leaves[index]`` in the tree of all ``leaves``."""
    return inclusion_proof_from(index, len(leaves), _list_getter(leaves))


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """Consistency proof from the tree of ``leaves[:old_size]`` to the tree of all ``leaves``."""
    return consistency_proof_from(old_size, len(leaves), _list_getter(leaves))


# ---------------------------------------------------------------------------------------------------------
# Verifiers (RFC 9162 §2.1.3.2 and §2.1.4.2). They never raise; see the module docstring.
# ---------------------------------------------------------------------------------------------------------


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _proof_ok(proof: object) -> bool:
    return isinstance(proof, (list, tuple)) and all(_is_hash(p) for p in proof)


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes | None:
    """The root implied by an inclusion proof, or ``None`` when the proof is malformed for (index, size)."""
    if not (_is_size(index) and _is_size(size) and index < size and _is_hash(leaf) and _proof_ok(proof)):
        return None
    fn, sn = index, size - 1
    r = leaf
    sha = _sha256
    for p in proof:
        if sn == 0:
            return None  # proof too long
        if fn & 1 or fn == sn:
            r = sha(_NODE_PREFIX + p + r).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = sha(_NODE_PREFIX + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0:
        return None  # proof too short
    return r


def verify_inclusion(index: int, size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes) -> bool:
    """True iff ``proof`` shows the leaf with hash ``leaf_hash`` at ``index`` in the tree (size, root)."""
    if not _is_hash(root):
        return False
    computed = root_from_inclusion_proof(index, size, leaf_hash, proof)
    return computed is not None and computed == root


def verify_consistency(
    old_size: int, new_size: int, proof: Sequence[bytes], old_root: bytes, new_root: bytes
) -> bool:
    """True iff ``proof`` shows the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if not (_is_size(old_size) and _is_size(new_size) and _is_hash(old_root) and _is_hash(new_root)):
        return False
    if not _proof_ok(proof) or new_size < old_size:
        return False
    if old_size == 0:
        return False  # a proof from the empty tree is meaningless (transparency-dev rejects it too)
    if old_size == new_size:
        return len(proof) == 0 and old_root == new_root
    if len(proof) == 0:
        return False
    path = list(proof)
    if old_size & (old_size - 1) == 0:  # old tree is a perfect subtree: its root is the seed
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    sha = _sha256
    for c in path[1:]:
        if sn == 0:
            return False  # proof too long
        if fn & 1 or fn == sn:
            fr = sha(_NODE_PREFIX + c + fr).digest()
            sr = sha(_NODE_PREFIX + c + sr).digest()
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = sha(_NODE_PREFIX + sr + c).digest()
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == new_root
