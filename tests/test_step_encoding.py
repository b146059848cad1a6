"""Step entry encodings. v2 stores routing weights as distinct rows (body) + a per-sample row index (u1/u2
payload): the [B, L] float32 array comes back bit for bit, v1 entries (a ``weights`` payload) still read,
malformed encodings are refused. v3 (ids through the run's example table, weights and layers from the run
entry, rules once per example) reads back exactly as the same run written as v2 (records, query aggregates,
memorization, signed exports), on SQLite and PostgreSQL; a missing step is found. And the scale benchmark's
quick mode runs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from audit import aggregates, query
from audit.memorization import rank_memorization
from ledger import Ledger, indexers
from ledger.records import (
    StepEncoder,
    StepRecord,
    _index_payload,
    decode_index,
    encode_weights,
    step_weights,
)
from tests.query_support import aggregate_tables

ROOT = Path(__file__).resolve().parents[1]


def _body(b: int, n_l: int, **extra: object) -> dict[str, object]:
    return {
        "run": "r", "run_seq": 1, "step": 0, "epoch": 0, "example_ids": [f"e{i}" for i in range(b)],
        "layers": [f"l{j}" for j in range(n_l)], "micro_batches": [b], "lr": [0.1] * n_l,
        "update_norms": None, "policy_seq": None, "flags": {}, **extra,
    }  # fmt: skip


@pytest.mark.parametrize(("rows", "dtype"), [(1, None), (5, "uint8"), (256, "uint8"), (300, "uint16")])
def test_weights_round_trip_bit_exact(rows: int, dtype: str | None) -> None:
    rng = np.random.default_rng(rows)
    table = rng.random((rows, 7)).astype(np.float32)
    table[0] = [1 / 3, 0.1, 0.0, 1.0, 2e-38, 0.7, 1e-45]  # awkward float32 values (incl. subnormals)
    pick = np.concatenate([np.arange(rows), rng.integers(0, rows, 400)])
    w = table[pick]
    body_rows, index = encode_weights(w)
    assert len(body_rows) == rows
    assert (index is None) == (dtype is None) and (index is None or index.dtype == np.dtype(dtype))
    # through canonical JSON and the ledger's payload bytes, as a reader sees it
    body = json.loads(json.dumps(_body(len(pick), 7, weight_rows=body_rows)))
    payloads = {} if index is None else {"weight_index": np.frombuffer(index.tobytes(), index.dtype)}
    got = step_weights(body, payloads)
    assert got is not None and got.dtype == np.float32
    assert got.tobytes() == w.tobytes()


def test_v1_and_v2_entries_read_the_same(tmp_path: Path) -> None:
    w = np.array([[1, 1, 0], [1, 0.5, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    norms = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows, index = encode_weights(w)
    with Ledger.open(tmp_path / "l.db", create=True) as led:
        s1 = led.append("step", _body(4, 3), {"grad_norms": norms, "weights": w})
        s2 = led.append(
            "step",
            _body(4, 3, weight_rows=rows),
            {"grad_norms": norms, "weight_index": index},
            v=2,
        )
        r1, r2 = StepRecord.from_entry(led.entry(s1)), StepRecord.from_entry(led.entry(s2))
        np.testing.assert_array_equal(r1.weights, w)
        assert r2.weights.tobytes() == w.tobytes()
        assert led.entry(s2).descriptors["weight_index"]["size"] == 4  # one byte per sample, not 4·L
        assert led.verify().ok


@pytest.mark.parametrize(
    ("rows", "index"),
    [
        ([[1.0, 1.0]], np.zeros(3, np.uint8)),  # wrong number of layers
        ([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], None),  # two rows but no index
        ([[1.0, 1.0, 1.0]], np.array([0, 1, 0, 0], np.uint8)),  # index past the table
        ([[1.0, 1.0, 1.0]], np.zeros(3, np.uint8)),  # index shorter than the batch
        ([[1.0, 1.0, 1.0]], np.zeros(4, np.int8)),  # signed index type
        ([], None),  # no rows
        ("1,1,1", None),  # not a list
    ],
)
def test_malformed_weight_encodings_are_refused(rows: object, index: np.ndarray | None) -> None:
    body = _body(4, 3, weight_rows=rows)
    assert step_weights(body, {} if index is None else {"weight_index": index}) is None


# ----- step v 3: the run's example table, weights from the run entry ------------------------------------------

LAYERS3 = ["enc.0", "enc.1", "head"]
TABLE3 = np.array([[1, 1, 1], [1, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0]], np.float32)  # rules 0..2, default last


def _run3(name: str = "r3", table: np.ndarray | None = TABLE3) -> dict[str, Any]:
    body: dict[str, Any] = {
        "run": name,
        "architecture": {"layers": [{"name": n, "type": "torch.nn.Linear", "params": {}} for n in LAYERS3]},
        "optimizer": {"class": "torch.optim.SGD", "param_groups": []},
        "seed": 0,
        "loss_reduction": "mean",
        "policy_seq": None,
        "manifest_seq": None,
    }
    return body | StepEncoder(LAYERS3, table).run_fields()


def _v2_steps(run: str, run_seq: int, seed: int, n_ex: int = 40, epochs: int = 3) -> list[tuple[Any, ...]]:
    """Tracker-shaped (v 2) steps with everything a step can hold: rules per example (one changes mid-run),
    weights from the table by rule (except one step), duplicates, micro-batches, NaN norms, a layer without a
    learning rate, DP clip factors, losses, margins and flags; as (kind, body, payloads, weights)."""
    rng = np.random.default_rng(seed)
    rule_of = rng.integers(-1, 3, n_ex)
    out: list[tuple[Any, ...]] = []
    k = 0
    for epoch in range(epochs):
        order = rng.permutation(n_ex)
        for s in range(0, n_ex, 9):
            rows = order[s : s + 9].copy()
            if k == 2:
                rows[-1] = rows[0]  # an example twice in one step
            if k == 7:
                rule_of[rows[1]] = (rule_of[rows[1]] + 2) % 3  # its rule differs from the one it had
            b = len(rows)
            rules = rule_of[rows].astype("<i1")
            weights = TABLE3[np.where(rules < 0, len(TABLE3) - 1, rules)]
            if k == 5:
                weights = weights.copy()
                weights[0] = [0.25, 0.0, 1.0]  # not what the run's table gives
            norms = rng.gamma(2.0, 0.5, size=(b, 3)).astype(np.float32)
            flags: dict[str, list[int]] = {}
            if k == 4:
                norms[1, 2] = np.nan
                flags["nonfinite_grad_norm"] = [1]
            lr: list[float | None] = [0.1 / (1 + k)] * 3
            if k == 6:
                lr = [0.1, 0.1, None]
            rows_w, index = encode_weights(weights)
            body = {
                "run": run, "run_seq": run_seq, "step": k, "epoch": epoch,
                "example_ids": [f"ex-{i}" for i in rows], "layers": LAYERS3,
                "micro_batches": [b] if k % 3 else [b - 4, 4], "lr": lr,
                "update_norms": rng.random(3).tolist(), "policy_seq": None, "flags": flags, "weight_rows": rows_w,
            }  # fmt: skip
            payloads = {
                "grad_norms": norms,
                "rules": rules,
                "losses": rng.random(b, dtype=np.float32),
                "margins": rng.normal(size=b).astype(np.float32),
                "clip": rng.uniform(0.2, 1, b).astype(np.float32),
            }
            if index is not None:
                payloads["weight_index"] = index
            out.append(("step", body, payloads, weights))
            k += 1
    return out


def _write(led: Ledger, fmt: int, seed: int = 0, chunk: int = 1) -> int:
    run_seq = led.append("run", _run3())
    enc = StepEncoder(LAYERS3, TABLE3)
    items = []
    for kind, body, pl, w in _v2_steps("r3", run_seq, seed):
        items.append((kind, body, pl, 2) if fmt == 2 else (kind, *enc.encode(body, pl, w), 3))
    for i in range(0, len(items), chunk):
        led.append_many(items[i : i + chunk])
    return run_seq


def _same_records(a: Ledger, b: Ledger, run: str) -> int:
    ra, rb = list(a.steps(run)), list(b.steps(run))
    assert len(ra) == len(rb) > 0
    for x, y in zip(ra, rb, strict=True):
        for f in fields(x):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if isinstance(u, np.ndarray):
                assert isinstance(v, np.ndarray) and u.dtype == v.dtype and u.tobytes() == v.tobytes(), f.name
            else:
                assert u == v, f.name
    return len(ra)


@pytest.fixture
def small_folds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aggregates, "FOLD_MIN_SAMPLES", 0)
    monkeypatch.setattr(aggregates, "FOLD_EPOCHS", 1)


def test_v3_encoding_is_what_was_asked_for() -> None:
    enc = StepEncoder(LAYERS3, TABLE3)
    steps = _v2_steps("r3", 1, seed=3)
    first = [enc.encode(b, p, w) for _, b, p, w in steps]
    b0, p0 = first[0]
    assert b0["new_ids"] == steps[0][1]["example_ids"] and b0["first_index"] == 0
    assert "example_index" not in p0 and "rules" not in p0  # rows = the new examples in order
    assert b0["new_rules"] == steps[0][2]["rules"].tolist()  # their rules, once, in the body
    assert "layers" not in b0 and "weight_rows" not in b0 and "example_ids" not in b0 and "flags" not in b0
    later = first[len(first) // 2 + 1 :]
    plain = [(b, p) for b, p in later if "new_ids" not in b and "weight_rows" not in b]
    assert plain and all(p["example_index"].dtype == np.uint8 for _, p in plain)
    assert (
        sum("rules" not in p for _, p in plain) >= len(plain) - 2
    )  # only steps holding the re-ruled example
    assert all(isinstance(b["lr"], float) for b, _ in plain)  # one rate for every layer
    assert "weight_rows" in first[5][0]  # weights off the run's table: said in the step
    assert first[6][0]["lr"] == [0.1, 0.1, None]
    assert "rules" in first[7][1]  # a row's rule differs from its example's first one
    # the encoder leaves its inputs alone
    assert "example_ids" in steps[0][1] and "weight_rows" in steps[0][1]


@pytest.mark.parametrize("n", [1, 256, 257, 65536, 65537, 1 << 24, (1 << 24) + 1, 1 << 32])
def test_example_index_widths_round_trip(n: int) -> None:
    idx = np.array([0, n - 1, n // 2, 0, n - 1], dtype=np.int64)
    enc = _index_payload(idx, n)
    want = {1: "<u1", 2: "<u2", 4: "<u4"}
    width = 1 if n <= 256 else 2 if n <= 65536 else 3 if n <= 1 << 24 else 4
    if width == 3:
        assert enc.dtype == np.dtype("<u1") and enc.shape == (5, 3)
    else:
        assert enc.dtype == np.dtype(want[width]) and enc.shape == (5,)
    stored = np.frombuffer(enc.tobytes(), enc.dtype).reshape(enc.shape)  # as the ledger stores it
    got = decode_index(stored)
    assert got is not None and got.tolist() == idx.tolist()
    assert decode_index(np.zeros(3, np.int32)) is None and decode_index(np.zeros((3, 2), np.uint8)) is None


@pytest.mark.parametrize("chunk", [1, 5])
def test_v3_reads_exactly_as_v2_records_and_aggregates(tmp_path: Path, small_folds: None, chunk: int) -> None:
    """The oracle is the same run written as v 2 (ids, layers and weights in every entry): every record field
    and every query-aggregates row must come back identical, and the v 3 ledger verifies deep."""
    with Ledger.open(tmp_path / "v2.db", create=True) as a, Ledger.open(tmp_path / "v3.db", create=True) as b:
        _write(a, 2, chunk=chunk)
        _write(b, 3, chunk=chunk)
        assert {e.v for e in b.entries(kind="step", payloads=False)} == {3}
        assert _same_records(a, b, "r3") == 15
        ref = aggregate_tables(a)
        assert ref["qa_base"] and ref["qa_steps"] and aggregate_tables(b) == ref
        assert b.verify(deep=True).ok
        qa = query.layer(a, "r3", "head", top=50)
        qb = query.layer(b, "r3", "head", top=50)
        assert [(r.example_id, r.score) for r in qa.rows] == [(r.example_id, r.score) for r in qb.rows]
        ma = rank_memorization(a.steps("r3"))
        mb = rank_memorization(b.steps("r3"))
        assert [(r.example_id, r.score) for r in ma.rows] == [(r.example_id, r.score) for r in mb.rows]
        sizes = [sum(len(v) for v in e.descriptors.values()) for e in b.entries(kind="step", payloads=False)]
        assert sizes  # smoke: descriptors read


def test_v3_on_postgresql_reads_as_v2(pg_url: str, tmp_path: Path, small_folds: None) -> None:
    with Ledger.open(tmp_path / "v2.db", create=True) as a, Ledger.open(pg_url, create=True) as b:
        _write(a, 2)
        _write(b, 3, chunk=4)
        _same_records(a, b, "r3")
        assert aggregate_tables(b) == aggregate_tables(a)
        assert b.verify(deep=True).ok


def test_v3_index_cache_survives_rollbacks_other_writers_and_cold_starts(
    tmp_path: Path, small_folds: None
) -> None:
    """The query indexer keeps each run's example table in-process; a rolled-back append (then another step at
    that seq), steps appended through another connection and an emptied cache must not change its tables."""

    class Boom:
        name, kinds, tables, float_rtol = "boom", frozenset({"boom"}), (), 0.0

        def apply(self, conn: Any, entries: Any) -> None:
            raise RuntimeError("boom")

    with Ledger.open(tmp_path / "ref.db", create=True) as ref:
        _write(ref, 2)
        want = aggregate_tables(ref)
    path = tmp_path / "w.db"
    a = Ledger.open(path, create=True)
    b = Ledger.open(path)
    run_seq = a.append("run", _run3())
    enc = StepEncoder(LAYERS3, TABLE3)
    items = [(k, *enc.encode(body, pl, w), 3) for k, body, pl, w in _v2_steps("r3", run_seq, 0)]
    other = StepEncoder(LAYERS3, TABLE3)  # a step the rolled-back transaction held, with other new ids
    _, ob, op, ow = _v2_steps("r3", run_seq, 99)[0]
    ghost = ("step", *other.encode(ob, op, ow), 3)
    indexers.register(Boom())
    try:
        for i, item in enumerate(items):
            if i == 3:
                with pytest.raises(RuntimeError, match="boom"):
                    a.append_many([ghost, ("boom", {})])
            if i == 9:
                aggregates._TABLE_CACHE.clear()
            (a if i % 2 else b).append_many([item])
    finally:
        indexers.unregister("boom")
    assert aggregate_tables(a) == want and a.verify().ok
    a.close()
    b.close()


def test_v3_rule_rows_without_a_run_table(tmp_path: Path) -> None:
    """A run entry without ``weight_table``: each step says its weight rows, by rule (no index payload)."""
    with Ledger.open(tmp_path / "nt.db", create=True) as led:
        run_seq = led.append("run", _run3(table=None))
        enc = StepEncoder(LAYERS3)
        steps = _v2_steps("r3", run_seq, 1)[:4]
        for kind, body, pl, w in steps:
            b3, p3 = enc.encode(body, pl, w)
            assert "rule_rows" in b3 and "weight_index" not in p3
            led.append(kind, b3, p3, v=3)
        got = [r.weights.tobytes() for r in led.steps("r3")]
        assert got == [np.asarray(w, np.float32).tobytes() for *_, w in steps]


def test_v3_table_is_in_the_bodies_so_archived_payloads_do_not_hide_it(
    tmp_path: Path, small_folds: None
) -> None:
    """Archive the run's first steps (their payload bytes leave the database), empty the indexer's table cache
    and append the rest: the table is rebuilt from the bodies; records (segments found) and aggregates match."""
    from ledger.archive import archive_run

    with Ledger.open(tmp_path / "ref.db", create=True) as ref:  # v 2, a stand-in where the archive entry goes
        ref_seq = ref.append("run", _run3())
        v2 = [(k, b, p, 2) for k, b, p, _ in _v2_steps("r3", ref_seq, 0)]
        ref.append_many(v2[:8])
        ref.append("marker", {})
        ref.append_many(v2[8:])
        want = aggregate_tables(ref)
        want_records = [(r.example_ids, r.rule_ids.tolist()) for r in ref.steps("r3")]  # type: ignore[union-attr]
    with Ledger.open(tmp_path / "a.db", create=True) as led:
        run_seq = led.append("run", _run3())
        enc = StepEncoder(LAYERS3, TABLE3)
        items = [(k, *enc.encode(b, p, w), 3) for k, b, p, w in _v2_steps("r3", run_seq, 0)]
        led.append_many(items[:8])
        archive_run(led, "r3", led.size, tmp_path / "segments")
        aggregates._TABLE_CACHE.clear()
        led.append_many(items[8:])
        assert aggregate_tables(led) == want
        got = [(r.example_ids, r.rule_ids.tolist()) for r in led.steps("r3")]  # type: ignore[union-attr]
        assert got == want_records


def test_v3_reader_finds_a_missing_step(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "gap.db", create=True) as led:
        run_seq = led.append("run", _run3())
        enc = StepEncoder(LAYERS3, TABLE3)
        for k, (kind, body, pl, w) in enumerate(_v2_steps("r3", run_seq, 0)):
            item = (kind, *enc.encode(body, pl, w), 3)
            if k != 1:  # lost: its new examples never reach the ledger
                led.append(*item[:3], v=3)
        with pytest.raises(
            ValueError,
            match=r"step entry 3: its new examples start at table index 18, but the run's earlier steps hold 9 ",
        ):
            list(led.steps("r3"))
        assert led.verify(deep=True).ok  # the indexer skips what it cannot read, deterministically


def test_v3_step_without_its_run_entry_or_table_is_refused(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "x.db", create=True) as led:
        enc = StepEncoder(LAYERS3, TABLE3)
        _, body, pl, w = _v2_steps("r3", 5, 0)[0]
        seq = led.append("step", *enc.encode(body, pl, w), v=3)
        with pytest.raises(ValueError, match="read it with ledger.records.StepReader"):
            StepRecord.from_entry(led.entry(seq))
        with pytest.raises(ValueError, match="no layers and no run entry at run_seq 5"):
            list(led.steps("r3"))


def test_v3_export_verifies_offline_with_the_same_figures(tmp_path: Path) -> None:
    from audit import export
    from ledger import keys

    priv = keys.generate_private_key()
    stmts = []
    for fmt in (2, 3):
        with Ledger.open(tmp_path / f"e{fmt}.db", create=True) as led:
            _write(led, fmt)
            bundle = export.build_export(led, "r3", priv, "gradledger-test", evidence=True)
        rep = export.verify_bundle(json.dumps(bundle), priv.public_key())
        assert all(c.status in ("ok", "skipped") for c in rep.checks)
        st = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        stmts.append(st["predicate"]["contributions"])
    assert stmts[0] == stmts[1]


def test_scale_benchmark_quick() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    res = json.loads(out.stdout)["sqlite"]
    assert res["steps"] == res["full_run_steps"] == 2 * (8192 // 64)
    assert res["step_format"] == 3 and res["bytes"]["sqlite_page_size"] == 4096
    assert res["append_over_hash"] > 1
    # the grad_norms alone are 4 bytes per sample-layer-step; the stored ledger holds at least that
    assert res["logical_bytes_per_step"]["grad_norms"] == 64 * 16 * 4
    assert res["core_bytes_per_sample_layer_step"] >= 4.0
    assert (
        res["verify_s"] > 0
        and res["query_layer_ms"]
        and res["inclusion_proof_ms"]["entries"] == res["steps"] + 2
    )
