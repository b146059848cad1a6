"""Ingest into a real ledger: counts, atomic failure, re-ingest, seed links, privacy of the stored bytes, CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main
from ledger import Ledger, ingest
from ledger.ingest.errors import IngestError
from ledger.ingest.index import lookup
from ledger.ingest.pseudonym import read_key
from tests.ingest_support import EMAIL, FIXTURES, KEY, emails_in, pseud, samples, wrap_v2_label


@pytest.fixture(autouse=True)
def _check_spliced_values(monkeypatch: pytest.MonkeyPatch) -> None:
    # ingest splices each label value's canonical bytes into the body: re-check every splice here
    import ledger.canonical

    monkeypatch.setattr(ledger.canonical, "CHECK_CANONICAL", True)


@pytest.fixture
def led(tmp_path: Path) -> Ledger:
    return Ledger.open(tmp_path / "l.db", create=True)


def _bodies(led: Ledger, kind: str) -> list[dict]:
    return [e.body for e in led.entries(kind=kind, payloads=False)]


def test_counts_and_entries(led: Ledger) -> None:
    s = ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", led, pseudonym_key=pseud())
    assert (s.records, s.items, s.annotators, s.skipped, s.duplicates) == (6, 3, 3, 1, 0)
    assert (s.first_seq, s.last_seq, s.export_seq) == (1, 6, 7)
    (exp,) = _bodies(led, "export")
    raw = (FIXTURES / "labelbox_export_v2.ndjson").read_bytes()
    import hashlib

    assert exp["sha256"] == hashlib.sha256(raw).hexdigest() and exp["size"] == len(raw)
    assert exp["name"] == "labelbox_export_v2.ndjson"  # the base name only, never the directory
    assert exp["counts"]["records"] == 6 and exp["format"] == "labelbox.export_v2"
    anns = _bodies(led, "annotation")
    assert [a["label_id"] for a in anns] == [f"cllb000000000000000000000{i}" for i in range(1, 7)]
    assert all(a["export"]["sha256"] == exp["sha256"] for a in anns)
    assert led.verify(deep=True).ok


def test_reingest_same_export_adds_nothing(led: Ledger) -> None:
    first = ingest.labelstudio(FIXTURES / "labelstudio_export.json", led, pseudonym_key=pseud())
    size = led.size
    again = ingest.labelstudio(FIXTURES / "labelstudio_export.json", led, pseudonym_key=pseud())
    assert again.already_ingested and again.records == 0 and led.size == size
    assert again.duplicates == first.records + first.suggestions and again.export_seq == first.export_seq


def test_overlapping_export_adds_only_changed_labels(led: Ledger, tmp_path: Path) -> None:
    ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", led, pseudonym_key=pseud())
    rows = [json.loads(x) for x in (FIXTURES / "labelbox_export_v2.ndjson").read_text().splitlines()]
    label = rows[0]["projects"]["clproj00consensus000000001"]["labels"][1]
    label["label_details"]["reviews"].append(
        {
            "reviewed_at": "2024-03-05T09:00:00.000+00:00",
            "reviewed_by": "rev.kim@example.com",
            "review_action": "Approve",
        }
    )
    newer = tmp_path / "export-later.ndjson"
    newer.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = ingest.labelbox(newer, led, pseudonym_key=pseud())
    assert (s.records, s.duplicates) == (1, 5)
    revs = [a for a in _bodies(led, "annotation") if a["label_id"] == "cllb0000000000000000000002"]
    assert [len(a["reviews"]) for a in revs] == [1, 2]


def test_seed_links_mal_and_labelstudio(led: Ledger) -> None:
    mal = ingest.labelbox(FIXTURES / "labelbox_mal_import.ndjson", led, pseudonym_key=pseud())
    assert (mal.suggestions, mal.records, mal.format) == (3, 0, "labelbox.mal")
    lb = ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", led, pseudonym_key=pseud())
    assert lb.seeded == 1
    ls = ingest.labelstudio(FIXTURES / "labelstudio_export.json", led, pseudonym_key=pseud())
    assert (ls.suggestions, ls.seeded) == (3, 2)
    by_id = {a["label_id"]: a for a in _bodies(led, "annotation")}
    sugg = {
        (s["source"], s["suggestion_id"]): seq
        for seq, s in ((e.seq, e.body) for e in led.entries(kind="suggestion"))
    }
    seed = by_id["cllb0000000000000000000001"]["seeded_from"]
    assert seed == [{"suggestion_id": "9c5d4f8e-4a61-4b7e-9a3c-0d2f1e6b7a01", "origin": "mal",
                     "seq": sugg[("labelbox", "9c5d4f8e-4a61-4b7e-9a3c-0d2f1e6b7a01")]}]  # fmt: skip
    assert by_id["9001"]["seeded_from"] == [
        {"suggestion_id": "501", "origin": "prediction-changed", "seq": sugg[("labelstudio", "501")]}
    ]
    assert led.entry(sugg[("labelstudio", "501")]).body["model_version"] == "detector-v3"
    assert by_id["9004"]["seeded_from"][0]["seq"] == sugg[("labelstudio", "502")]


def test_generic_model_label_seeds_a_human_one(led: Ledger) -> None:
    ingest.jsonl(FIXTURES / "generic_labels.jsonl", led, pseudonym_key=pseud())
    by_id = {a["label_id"]: (e.seq, a) for e in led.entries(kind="annotation") for a in [e.body]}
    assert by_id["human-7"][1]["seeded_from"] == [
        {"suggestion_id": "snorkel-2", "origin": "prediction", "seq": by_id["snorkel-2"][0]}
    ]


def _malformed(tmp_path: Path) -> list[tuple[str, str, bytes, int, str | None]]:
    good = (FIXTURES / "labelbox_export_v2.ndjson").read_bytes()
    lines = good.splitlines(keepends=True)
    row3 = json.loads(lines[2])
    row3["projects"]["clproj00benchmark000000002"]["labels"][1]["performance_details"]["consensus_score"] = (
        "high"
    )
    row3_missing = json.loads(lines[2])
    del row3_missing["data_row"]["id"]
    big = b'{"data_row": {"id": "x", "pad": "' + b"x" * (50 * 1024 * 1024) + b'"}, "projects": {}}\n'
    return [
        ("labelbox", "bad-json.ndjson", lines[0] + lines[1][:-40] + b"\n" + lines[2], 2, None),
        ("labelbox", "missing.ndjson", lines[0] + lines[1] + json.dumps(row3_missing).encode() + b"\n", 3, "data_row.id"),
        ("labelbox", "wrong-type.ndjson", lines[0] + lines[1] + json.dumps(row3).encode() + b"\n", 3,
         "projects.clproj00benchmark000000002.labels[1].performance_details.consensus_score"),
        ("labelbox", "latin1.ndjson", lines[0] + lines[1].replace(b"Review", b"R\xe9view") + lines[2], 2, None),
        ("labelbox", "huge-line.ndjson", lines[0] + big, 2, None),
        ("labelstudio", "ls-missing.json", (FIXTURES / "labelstudio_export.json").read_bytes().replace(b'"result": [],', b"", 1), None, "annotations[0].result"),
        ("jsonl", "gen.jsonl", b'{"item_id": "a", "label_id": "b", "value": 1}\n{"item_id": "a", "label_id": "c", "value": 1, "probabilities": [0.2]}\n', 2, "probabilities"),
        ("jsonl", "gen.csv", b"item_id,label_id,value,gold\na,b,1,true\na,c,2,maybe\n", 3, "gold"),
    ]  # fmt: skip


def test_malformed_exports_append_nothing(led: Ledger, tmp_path: Path) -> None:
    ingest.labelbox(FIXTURES / "labelbox_mal_import.ndjson", led, pseudonym_key=pseud())
    size, root = led.size, led.root()
    db = Path(led.location)
    for source, name, data, line, field in _malformed(tmp_path):
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(IngestError) as ei:
            ingest.ingest(source, p, led, pseudonym_key=pseud())
        err = ei.value
        assert err.path == str(p) and "\n" not in str(err), name
        if line is not None:
            assert err.line == line, (name, str(err))
        else:
            assert err.line is not None, name
        if field is not None:
            assert err.field == field, (name, str(err))
        assert led.size == size and led.root() == root, name
    led.close()
    with Ledger.open(db) as again:
        assert again.size == size and again.verify(deep=True).ok


def test_cli_error_is_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.ndjson"
    bad.write_bytes(b'{"data_row": {"id": "a"}, "projects": {}}\n{"data_row": {"id": 5.5}, "projects": {}}\n')
    key = tmp_path / "k"
    key.write_text(KEY.hex() + "\n")
    key.chmod(0o600)
    led_path = tmp_path / "cli.db"
    res = CliRunner().invoke(
        main, ["ingest", "labelbox", str(bad), "--ledger", str(led_path), "--pseudonym-key", str(key)]
    )
    assert res.exit_code == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == [f"error: {bad}:2: field 'data_row.id': expected string or integer id, got number"]
    with Ledger.open(led_path) as led:
        assert led.size == 1 and not list(led.entries(kind="export"))


def test_cli_json_counts_and_duplicates(tmp_path: Path) -> None:
    led_path = tmp_path / "cli.db"
    args = [
        "ingest",
        "labelstudio",
        str(FIXTURES / "labelstudio_export.json"),
        "--ledger",
        str(led_path),
        "--json",
    ]
    r1 = CliRunner().invoke(main, args)
    assert r1.exit_code == 0, r1.output
    out = json.loads(r1.stdout)
    assert {k: out[k] for k in ("records", "items", "annotators", "skipped", "duplicates")} == {
        "records": 5, "items": 3, "annotators": 4, "skipped": 1, "duplicates": 0
    }  # fmt: skip
    assert "created pseudonym key" in r1.stderr
    key = Path(str(led_path) + ".pseudonym-key")
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(read_key(key)) == 32
    r2 = CliRunner().invoke(main, args)
    assert (
        r2.exit_code == 0
        and json.loads(r2.stdout)["duplicates"] == 8
        and json.loads(r2.stdout)["already_ingested"]
    )
    assert "created pseudonym key" not in r2.stderr


def test_no_email_reaches_the_database_bytes(tmp_path: Path) -> None:
    """Every e-mail address in every test export is absent from the raw SQLite file and its WAL."""
    s = samples()
    v2 = wrap_v2_label(s / "labelbox_export_v2_label_from_sdk_notebook.json", tmp_path / "sdk_v2.ndjson")
    inputs = [
        ("labelbox", v2), ("labelbox", s / "labelbox_v1_export_image.json"),
        ("labelbox", s / "labelbox_mal_import_image.json"), ("labelbox", s / "labelbox_mal_import_classification.json"),
        ("labelstudio", s / "labelstudio_export_basic.json"), ("labelstudio", s / "labelstudio_export_with_history.json"),
        ("labelstudio", s / "labelstudio_export_with_reviews_agreement.json"),
        ("labelbox", FIXTURES / "labelbox_mal_import.ndjson"), ("labelbox", FIXTURES / "labelbox_export_v2.ndjson"),
        ("labelbox", FIXTURES / "labelbox_v1_export.json"), ("labelstudio", FIXTURES / "labelstudio_export.json"),
        ("jsonl", FIXTURES / "generic_labels.jsonl"), ("jsonl", FIXTURES / "generic_labels.csv"),
    ]  # fmt: skip
    emails = emails_in(*(p for _, p in inputs))
    assert len(emails) >= 12  # the SDK fixtures' addresses plus the realistic ones
    db = tmp_path / "privacy.db"
    led = Ledger.open(db, create=True)
    for source, p in inputs:
        ingest.ingest(source, p, led, pseudonym_key=pseud())
    # snapshot with the WAL still present, then after the checkpoint on close
    copies = []
    for suffix in ("", "-wal", "-shm"):
        f = Path(str(db) + suffix)
        if f.exists():
            shutil.copy(f, tmp_path / f"snap{suffix}")
            copies.append(tmp_path / f"snap{suffix}")
    assert any(c.name.endswith("-wal") and c.stat().st_size > 0 for c in copies)
    led.close()
    files = copies + [Path(str(db) + sfx) for sfx in ("", "-wal") if Path(str(db) + sfx).exists()]
    blob = b"".join(f.read_bytes() for f in files)
    for e in emails:
        assert e not in blob, e
        assert e.lower() not in blob.lower(), e
    assert not EMAIL.findall(blob)
    # and names from the expanded user objects are not copied either
    for name in (b"Okafor", b"first_name", b"last_name", b"created_username"):
        assert name not in blob


def test_lookup_index_matches_entries(led: Ledger) -> None:
    ingest.labelstudio(FIXTURES / "labelstudio_export.json", led, pseudonym_key=pseud())
    with led.engine.connect() as conn:
        got = lookup(conn, "annotation", ["9001", "9002", "nope"])
    want = {
        ("labelstudio", e.body["label_id"]): e.seq
        for e in led.entries(kind="annotation")
        if e.body["label_id"] in ("9001", "9002")
    }
    assert {k: v[0] for k, v in got.items()} == want
    assert os.path.exists(led.location)


def test_foreign_entries_of_ingest_kinds_do_not_break_appends(led: Ledger) -> None:
    """With the ingest indexer loaded, a hand-written entry of an ingest kind is appended and skipped by the
    index (it is not an ingest record), and a deep verify rebuilds the index identically."""
    seq = led.append("annotation", {"note": "written by another tool"})
    ingest.labelstudio(samples() / "labelstudio_export_basic.json", led, pseudonym_key=pseud())
    assert led.entry(seq).body == {"note": "written by another tool"}
    with led.engine.connect() as conn:  # the index holds only real ingest records
        assert lookup(conn, "annotation", ["note"]) == {}
    assert led.verify(deep=True).ok
