"""Stored Merkle state: perfect-subtree hashes in ``tree_nodes`` answer ``get_subtree`` in O(log n) reads.

A tree of ``n`` leaves is the binary decomposition of ``n`` into perfect subtrees (the *frontier*): one per
set bit, largest on the left. Appending leaves is a binary counter over that frontier; every perfect subtree
that completes is written once and never changes. Proofs and roots come from ``ledger.merkle``'s callback
functions, fed by :class:`StoredTree` (level 0 reads ``entries.leaf_hash``; higher levels ``tree_nodes``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import Connection, select

from . import merkle, schema
from .schema import node_key

Node = tuple[int, int, bytes]  # (level, index, hash)
_NODE = b"\x01"  # RFC 9162 interior-node prefix (as ledger.merkle.node_hash)


def frontier_positions(size: int) -> list[tuple[int, int]]:
    """(level, index) of the perfect subtrees that make up ``[0, size)``, left to right."""
    out = []
    start = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            out.append((level, start >> level))
            start += 1 << level
    return out


def perfect_ranges(start: int, end: int) -> list[tuple[int, int]]:
    """Decompose ``[start, end)`` into RFC 9162 perfect subtrees (start must be aligned as RFC splits are)."""
    out: list[tuple[int, int]] = []
    while start < end:
        n = end - start
        if n & (n - 1) == 0 and start % n == 0:
            out.append((n.bit_length() - 1, start // n))
            break
        k = merkle.split_point(n) if n > 1 else 1
        if start % k:
            raise ValueError(f"range [{start}, {end}) is not aligned to an RFC 9162 subtree")
        out.append((k.bit_length() - 1, start // k))
        start += k
    return out


def extend(frontier: list[Node], leaf_hashes: Iterable[bytes], first_index: int) -> list[Node]:
    """Push leaves onto ``frontier`` (mutated in place); return the new perfect nodes of level >= 1."""
    sha = merkle.node_hash
    created: list[Node] = []
    index = first_index
    for h in leaf_hashes:
        level, idx, node = 0, index, h
        while frontier and frontier[-1][0] == level:
            _, left_idx, left = frontier.pop()
            node = sha(left, node)
            level += 1
            idx = left_idx >> 1
            created.append((level, idx, node))
        frontier.append((level, idx, node))
        index += 1
    return created


class StoredTree:
    """Subtree hashes read from the database through one connection, cached per instance."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.cache: dict[tuple[int, int], bytes] = {}

    def fetch(self, positions: Iterable[tuple[int, int]]) -> None:
        """Load many (level, index) hashes in at most two queries."""
        want = [p for p in set(positions) if p not in self.cache]
        leaves = [i for lvl, i in want if lvl == 0]
        nodes = {node_key(lvl, i): (lvl, i) for lvl, i in want if lvl > 0}
        if self.conn.dialect.name == "sqlite" and len(leaves) < 500 and len(nodes) < 500:
            # Through the driver: building and caching two SQLAlchemy statements per call cost more CPU
            # than the indexed reads themselves (~1 ms per append transaction).
            raw: Any = self.conn.connection.driver_connection
            if leaves:
                marks = ",".join("?" * len(leaves))
                for seq, h in raw.execute(
                    f"SELECT seq, leaf_hash FROM entries WHERE seq IN ({marks})", leaves
                ):
                    self.cache[(0, seq)] = h
            if nodes:
                marks = ",".join("?" * len(nodes))
                for key, h in raw.execute(
                    f"SELECT node, hash FROM tree_nodes WHERE node IN ({marks})", list(nodes)
                ):
                    self.cache[nodes[key]] = h
            leaves, nodes = [], {}
        if leaves:
            e = schema.entries
            for seq, h in self.conn.execute(select(e.c.seq, e.c.leaf_hash).where(e.c.seq.in_(leaves))):
                self.cache[(0, seq)] = h
        if nodes:
            t = schema.tree_nodes
            for key, h in self.conn.execute(select(t.c.node, t.c.hash).where(t.c.node.in_(list(nodes)))):
                self.cache[nodes[key]] = h
        missing = [p for p in want if p not in self.cache]
        if missing:
            lvl, i = min(missing)
            raise LookupError(f"stored Merkle state lacks the subtree at level {lvl}, index {i}")

    def node(self, level: int, index: int) -> bytes:
        key = (level, index)
        if key not in self.cache:
            self.fetch([key])
        return self.cache[key]

    def subtree(self, start: int, end: int) -> bytes:
        """``get_subtree`` for ``ledger.merkle``: the RFC 9162 hash of leaves ``[start, end)``."""
        parts = perfect_ranges(start, end)
        self.fetch(parts)
        acc = self.cache[parts[-1]]
        for p in reversed(parts[:-1]):
            acc = merkle.node_hash(self.cache[p], acc)
        return acc

    def prefetch_for(self, call: Callable[[Callable[[int, int], bytes]], object]) -> None:
        """Run ``call`` once with a recording getter, then fetch every node it asked for in one go.

        Proof shapes depend only on (index, size), never on hash values, so a dry run names every node.
        """
        ranges: list[tuple[int, int]] = []

        def record(start: int, end: int) -> bytes:
            ranges.append((start, end))
            return merkle.EMPTY_ROOT

        call(record)
        self.fetch(p for s, e in ranges for p in perfect_ranges(s, e))

    def frontier(self, size: int) -> list[Node]:
        pos = frontier_positions(size)
        self.fetch(pos)
        return [(lvl, i, self.cache[(lvl, i)]) for lvl, i in pos]

    def root(self, size: int) -> bytes:
        return merkle.root_from(size, self.subtree)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self.prefetch_for(lambda g: merkle.inclusion_proof_from(index, size, g))
        return merkle.inclusion_proof_from(index, size, self.subtree)

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        self.prefetch_for(lambda g: merkle.consistency_proof_from(old_size, new_size, g))
        return merkle.consistency_proof_from(old_size, new_size, self.subtree)


def node_rows(nodes: Iterable[Node]) -> list[dict[str, object]]:
    return [{"node": node_key(lvl, i), "hash": h} for lvl, i, h in nodes]


class LevelTree:
    """Every level of a tree rebuilt in memory from recomputed leaf hashes (used by full verify).

    ``levels[l]`` is a bytearray of ``n >> l`` concatenated 32-byte hashes of the complete level-l nodes.
    """

    def __init__(self, leaf_hashes: bytearray) -> None:
        sha = hashlib.sha256
        self.levels: list[bytearray] = [leaf_hashes]
        cur = leaf_hashes
        while len(cur) >= 64:
            # left || right are adjacent in the level: one 64-byte slice per node (RFC 9162: 0x01 || l || r)
            nxt = bytearray()
            for off in range(0, len(cur) - 63, 64):
                nxt += sha(_NODE + cur[off : off + 64]).digest()
            self.levels.append(nxt)
            cur = nxt

    @property
    def size(self) -> int:
        return len(self.levels[0]) // 32

    def node(self, level: int, index: int) -> bytes:
        lv = self.levels[level]
        return bytes(lv[index * 32 : index * 32 + 32])

    def subtree(self, start: int, end: int) -> bytes:
        parts = perfect_ranges(start, end)
        acc = self.node(*parts[-1])
        for p in reversed(parts[:-1]):
            acc = merkle.node_hash(self.node(*p), acc)
        return acc

    def root(self, size: int | None = None) -> bytes:
        return merkle.root_from(self.size if size is None else size, self.subtree)
