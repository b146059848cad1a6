"""Tampering with a stored ledger (SQLite and PostgreSQL) is detected, with the right first bad seq.

The attacker here has full database access: they flip bytes, delete, swap and insert rows, and can
recompute every hash (``rehash``), so only a checkpoint signed earlier and kept outside the database can
expose the rewrites that keep the log internally consistent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, Engine, select, text

from ledger import Ledger, schema
from ledger.canonical import descriptors_json, leaf_data
from ledger.tree import extend, node_rows

N = 12
KEY_NAME = "tamper.test"


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def build(url: str, origin: str | None = None, salt: int = 0) -> Ledger:
    """A ledger of N entries (seq 0 + N-1 steps), each step with two payloads."""
    led = Ledger.open(url, create=True, origin=origin)
    rng = np.random.default_rng(salt)
    led.append_many(
        [
            (
                "step",
                {"step": i, "ids": [f"ex{i}-{j}" for j in range(4)], "salt": salt},
                {
                    "grad_norms": rng.random((4, 3), dtype=np.float32),
                    "losses": rng.random(4, dtype=np.float32),
                },
            )
            for i in range(1, N)
        ]
    )
    return led


@pytest.fixture
def ledger(url: str) -> Iterator[Ledger]:
    led = build(url)
    assert led.verify().ok
    yield led
    led.close()


def sql(led: Ledger, stmt: str, **params: Any) -> None:
    with led.engine.begin() as c:
        c.execute(text(stmt), params)


def flip(led: Ledger, table: str, column: str, where: str, offset: int = 3) -> None:
    """Flip one bit of one byte of a stored bytes column, in place."""
    with led.engine.begin() as c:
        (value,) = c.execute(text(f"SELECT {column} FROM {table} WHERE {where}")).one()
        b = bytearray(value)
        b[offset] ^= 0x01
        c.execute(text(f"UPDATE {table} SET {column} = :v WHERE {where}"), {"v": bytes(b)})


def rehash(engine: Engine) -> None:
    """What an attacker with DB access can do: recompute every prev, leaf hash and subtree from the rows."""
    e, p, t = schema.entries, schema.payloads, schema.tree_nodes
    with engine.begin() as c:
        rows = c.execute(select(e.c.seq, e.c.kind, e.c.v, e.c.ts, e.c.body).order_by(e.c.seq)).all()
        prev = bytes(32)
        leaves = []
        for seq, kind, v, ts, body in rows:
            descs = [
                (n, d, s, hashlib.sha256(data).digest(), len(data))
                for n, d, s, data in c.execute(
                    select(p.c.name, p.c.dtype, p.c.shape, p.c.data).where(p.c.seq == seq).order_by(p.c.name)
                )
            ]
            for n, _d, _s, sha, _size in descs:
                c.execute(p.update().where(p.c.seq == seq, p.c.name == n).values(sha256=sha))
            h = hashlib.sha256(
                b"\x00" + leaf_data(kind, v, seq, ts, prev, body, descriptors_json(descs))
            ).digest()
            c.execute(e.update().where(e.c.seq == seq).values(prev=prev, leaf_hash=h))
            leaves.append(h)
            prev = h
        c.execute(t.delete())
        nodes = extend([], leaves, 0)
        if nodes:
            c.execute(t.insert(), node_rows(nodes))


def shift_up(c: Connection, table: str, k: int) -> None:
    c.execute(text(f"UPDATE {table} SET seq = -(seq + 1) WHERE seq >= :k"), {"k": k})
    c.execute(text(f"UPDATE {table} SET seq = -seq WHERE seq < 0"))


def check(led: Ledger, bad_seq: int | None, fragment: str, **kw: Any) -> None:
    res = led.verify(**kw)
    assert not res.ok, "tampering went unnoticed"
    assert res.first_bad_seq == bad_seq, res.reason
    assert fragment in (res.reason or ""), res.reason


# ---- stored bytes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, column, where, bad, fragment",
    [
        ("entries", "body", "seq = 5", 5, "leaf hash does not match"),
        ("entries", "leaf_hash", "seq = 5", 5, "leaf hash does not match"),
        ("entries", "prev", "seq = 5", 5, "prev hash does not match the leaf hash of entry 4"),
        ("entries", "prev", "seq = 0", 0, "prev hash is not 32 zero bytes"),
        ("payloads", "data", "seq = 5 AND name = 'losses'", 5, "payload 'losses' bytes do not match"),
        ("payloads", "data", "seq = 11 AND name = 'grad_norms'", 11, "payload 'grad_norms' bytes"),
        (
            "payloads",
            "sha256",
            "seq = 5 AND name = 'grad_norms'",
            5,
            "payload 'grad_norms' bytes do not match",
        ),
        ("tree_nodes", "hash", f"node = {schema.node_key(1, 2)}", 4, "level 1 index 2"),
        ("tree_nodes", "hash", f"node = {schema.node_key(3, 0)}", 0, "level 3 index 0"),
    ],
)
def test_flipped_byte_detected(
    ledger: Ledger, table: str, column: str, where: str, bad: int, fragment: str
) -> None:
    flip(ledger, table, column, where)
    check(ledger, bad, fragment)


@pytest.mark.parametrize(
    "stmt, bad",
    [
        ("UPDATE entries SET kind = 'stop' WHERE seq = 7", 7),
        ("UPDATE entries SET ts = '2020-01-01T00:00:00.000000Z' WHERE seq = 7", 7),
        ("UPDATE entries SET v = 2 WHERE seq = 7", 7),
        ("UPDATE payloads SET shape = '[3,4]' WHERE seq = 7 AND name = 'grad_norms'", 7),
        ("UPDATE payloads SET name = 'loss' WHERE seq = 7 AND name = 'losses'", 7),
        ("DELETE FROM payloads WHERE seq = 7 AND name = 'losses'", 7),
    ],
)
def test_edited_columns_detected(ledger: Ledger, stmt: str, bad: int) -> None:
    sql(ledger, stmt)
    check(ledger, bad, "entry 7")


def test_deleted_row_detected(ledger: Ledger) -> None:
    sql(ledger, "DELETE FROM entries WHERE seq = 5")
    check(ledger, 5, "entry 5 is missing")


def test_deleted_row_with_its_payloads_detected(ledger: Ledger) -> None:
    sql(ledger, "DELETE FROM payloads WHERE seq = 5")
    sql(ledger, "DELETE FROM entries WHERE seq = 5")
    check(ledger, 5, "entry 5 is missing")


def test_swapped_rows_detected(ledger: Ledger) -> None:
    with ledger.engine.begin() as c:
        shift = 1000
        c.execute(text("UPDATE entries SET seq = :t WHERE seq = 3"), {"t": shift})
        c.execute(text("UPDATE entries SET seq = 3 WHERE seq = 6"))
        c.execute(text("UPDATE entries SET seq = 6 WHERE seq = :t"), {"t": shift})
        c.execute(text("UPDATE payloads SET seq = :t WHERE seq = 3"), {"t": shift})
        c.execute(text("UPDATE payloads SET seq = 3 WHERE seq = 6"))
        c.execute(text("UPDATE payloads SET seq = 6 WHERE seq = :t"), {"t": shift})
    check(ledger, 3, "entry 3")


def test_swapped_payloads_detected(ledger: Ledger) -> None:
    with ledger.engine.begin() as c:
        c.execute(text("UPDATE payloads SET seq = 1000 WHERE seq = 8"))
        c.execute(text("UPDATE payloads SET seq = 8 WHERE seq = 9"))
        c.execute(text("UPDATE payloads SET seq = 9 WHERE seq = 1000"))
    check(ledger, 8, "entry 8")


def test_deleted_tree_node_detected(ledger: Ledger) -> None:
    sql(ledger, f"DELETE FROM tree_nodes WHERE node = {schema.node_key(2, 1)}")
    check(ledger, 4, "level 2 index 1 is missing")


def test_rehash_after_edit_passes_internally_but_deep_catches_noncanonical_body(ledger: Ledger) -> None:
    sql(ledger, "UPDATE entries SET body = :b WHERE seq = 6", b=b'{"step": 6}')
    rehash(ledger.engine)
    assert ledger.verify().ok  # internally consistent again: hence signed checkpoints
    check(ledger, 6, "not in canonical", deep=True)


# ---- rewrites only a signed checkpoint exposes ------------------------------------------------------------


def signed(ledger: Ledger, key: Ed25519PrivateKey) -> str:
    return ledger.sign_checkpoint(key, KEY_NAME)


def test_inserted_row_with_recomputed_hashes(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    saved = signed(ledger, key)
    body = b'{"step":99}'
    with ledger.engine.begin() as c:
        shift_up(c, "payloads", 5)
        shift_up(c, "entries", 5)
        c.execute(
            schema.entries.insert(),
            [
                {
                    "seq": 5,
                    "kind": "step",
                    "v": 1,
                    "ts": "2026-01-01T00:00:00.000000Z",
                    "prev": bytes(32),
                    "body": body,
                    "leaf_hash": bytes(32),
                }
            ],
        )
        c.execute(text("DELETE FROM signed_checkpoints"))  # the attacker hides the stored notes too
    rehash(ledger.engine)
    assert ledger.verify().ok
    # only the external checkpoint is left: the rewrite is proven, somewhere in entries 0..11
    check(
        ledger,
        0,
        "entries 0..11 do not hash to the root signed in the checkpoint",
        checkpoint=saved,
        pubkey=key.public_key(),
    )


def test_inserted_row_located_by_earlier_signed_checkpoints(url: str, key: Ed25519PrivateKey) -> None:
    led = Ledger.open(url, create=True)
    led.append_many([("step", {"step": i}) for i in range(1, 5)])
    signed(led, key)  # size 5, stored in the ledger
    led.append_many([("step", {"step": i}) for i in range(5, 12)])
    saved = signed(led, key)  # size 12, also kept outside
    with led.engine.begin() as c:
        shift_up(c, "entries", 5)
        c.execute(
            schema.entries.insert(),
            [
                {
                    "seq": 5,
                    "kind": "step",
                    "v": 1,
                    "ts": "2026-01-01T00:00:00.000000Z",
                    "prev": bytes(32),
                    "body": b"{}",
                    "leaf_hash": bytes(32),
                }
            ],
        )
    rehash(led.engine)
    # the stored size-12 note no longer matches: caught even without the external checkpoint
    check(led, 0, "stored checkpoint #2")
    # with the key, the size-5 note is a trusted anchor, so the first altered entry is pinned to 5
    check(led, 5, "entries 5..11 do not hash", checkpoint=saved, pubkey=key.public_key())
    led.close()


def test_truncated_tail(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    saved = signed(ledger, key)
    with ledger.engine.begin() as c:
        c.execute(text("DELETE FROM payloads WHERE seq >= 9"))
        c.execute(text("DELETE FROM entries WHERE seq >= 9"))
        c.execute(text("DELETE FROM signed_checkpoints"))
    rehash(ledger.engine)  # drop the tree nodes that covered the deleted tail
    assert ledger.verify().ok
    check(ledger, 9, "entries 9..11 are missing", checkpoint=saved, pubkey=key.public_key())


def test_truncated_tail_without_cleanup(ledger: Ledger) -> None:
    sql(ledger, "DELETE FROM payloads WHERE seq >= 9")
    sql(ledger, "DELETE FROM entries WHERE seq >= 9")
    check(ledger, 9, "beyond the 9 stored entries")


def test_truncation_caught_by_stored_checkpoint(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    signed(ledger, key)
    sql(ledger, "DELETE FROM payloads WHERE seq >= 10")
    sql(ledger, "DELETE FROM entries WHERE seq >= 10")
    rehash(ledger.engine)
    check(ledger, 10, "stored checkpoint #1 signed 12 entries")


def test_replaced_by_other_ledger_with_same_origin(url: str, tmp_path: Path, key: Ed25519PrivateKey) -> None:
    led = build(url)
    origin = led.origin
    saved = signed(led, key)
    led.close()
    # the impostor: a fresh ledger with the same origin, as long as the original, with different content
    impostor_url = str(tmp_path / "impostor.db")
    build(impostor_url, origin=origin, salt=1).close()
    replace(url, impostor_url)
    with Ledger.open(url) as again:
        assert again.origin == origin and again.size == N
        assert again.verify().ok
        check(
            again,
            0,
            "entries 0..11 do not hash to the root signed",
            checkpoint=saved,
            pubkey=key.public_key(),
        )


def replace(url: str, impostor_sqlite: str) -> None:
    """Overwrite the ledger at ``url`` with the impostor's rows."""
    if "://" not in url:
        Path(url).write_bytes(Path(impostor_sqlite).read_bytes())
        return
    src = Ledger.open(impostor_sqlite)
    dst = Ledger.open(url)
    with src.engine.connect() as s, dst.engine.begin() as d:
        for table in reversed(schema.CORE_TABLES):
            d.execute(table.delete())
        for table in schema.CORE_TABLES:
            rows = [dict(r._mapping) for r in s.execute(select(table))]
            if rows:
                d.execute(table.insert(), rows)
    src.close()
    dst.close()


def test_sign_refuses_rewritten_history(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    from ledger.errors import CheckpointRefused

    signed(ledger, key)
    sql(ledger, "UPDATE entries SET body = :b WHERE seq = 3", b=b'{"step":333}')
    rehash(ledger.engine)
    with pytest.raises(CheckpointRefused, match="not consistent with checkpoint #1"):
        signed(ledger, key)
    sql(ledger, "DELETE FROM entries WHERE seq >= 10")
    rehash(ledger.engine)
    with pytest.raises(CheckpointRefused, match="truncated or rolled back"):
        signed(ledger, key)


def test_sign_accepts_extension(ledger: Ledger, key: Ed25519PrivateKey) -> None:
    first = signed(ledger, key)
    ledger.append("step", {"step": 12})
    second = signed(ledger, key)
    assert [c.size for c in ledger.checkpoints()] == [N, N + 1]
    assert ledger.verify(checkpoint=first, pubkey=key.public_key()).ok
    res = ledger.verify(checkpoint=second, pubkey=key.public_key())
    assert res.ok and res.checkpoints_checked == 2 and res.checkpoint and res.checkpoint["size"] == N + 1


def test_checkpoint_from_other_ledger_rejected(
    ledger: Ledger, tmp_path: Path, key: Ed25519PrivateKey
) -> None:
    with build(str(tmp_path / "other.db"), salt=3) as other:
        foreign = signed(other, key)
    check(ledger, 0, "is for origin", checkpoint=foreign, pubkey=key.public_key())
