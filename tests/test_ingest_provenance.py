"""Manifests and LabelProvenance; pseudonym keys; model suggestions recorded and exported as pre-labels."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from audit.cli import main
from ledger import Ledger, ingest
from ledger.ingest.errors import PseudonymKeyError
from ledger.ingest.pseudonym import Pseudonymizer, create_key, open_key, read_key
from ledger.ingest.suggestions import export_labelbox_mal, export_labelstudio_predictions, record_suggestions
from ledger.provenance import LabelProvenance, Manifest, ManifestError
from tests.ingest_support import FIXTURES, KEY, expected_pseudonym, pseud


@pytest.fixture
def led(tmp_path: Path) -> Ledger:
    led = Ledger.open(tmp_path / "p.db", create=True)
    for source, name in [
        ("labelbox", "labelbox_export_v2.ndjson"),
        ("labelbox", "labelbox_v1_export.json"),
        ("labelstudio", "labelstudio_export.json"),
        ("jsonl", "generic_labels.jsonl"),
    ]:
        ingest.ingest(source, FIXTURES / name, led, pseudonym_key=pseud())
    return led


def test_manifest_resolves_provenance(led: Ledger) -> None:
    m = Manifest.create(
        led,
        "train-v1",
        {
            "ex-lb": "cllb0000000000000000000001",
            "ex-ls": ["labelstudio:9001", "9002"],  # a consensus item trained on both labels
            "ex-v1": "ckv1label000000000000000002",
            "ex-gen": {"label_ids": ["human-7"], "content_sha256": "ab" * 32},
            "ex-snorkel": "snorkel-2",
        },
        domains={"ex-lb": "street"},
        rights={"ex-v1": "withdrawn"},
    )
    lb = m["ex-lb"]
    assert isinstance(lb, LabelProvenance)
    assert (lb.source, lb.producer, lb.review, lb.domain, lb.gold) == (
        "labelbox",
        "human",
        "approve",
        "street",
        False,
    )
    assert lb.annotator == expected_pseudonym("ana.silva@example.com")
    assert (lb.consensus, lb.consensus_method) == (
        0.82,
        "labelbox.consensus_score",
    )  # Labelbox scale is [0, 1]
    ls = m["ex-ls"]
    assert ls.consensus == pytest.approx(66.67 / 100) and ls.consensus_method == "labelstudio.agreement"
    assert ls.annotators == (
        expected_pseudonym("labelstudio:user:3"),
        expected_pseudonym("labelstudio:user:4"),
    )
    assert len(ls.label_seqs) == 2 and ls.label_seq == ls.label_seqs[0]
    v1 = m["ex-v1"]
    assert (v1.review, v1.rights, v1.consensus_method) == ("reject", "withdrawn", "labelbox.v1.agreement")
    gen = m["ex-gen"]
    assert gen.consensus == pytest.approx((4 - 1) / (5 - 1)) and gen.consensus_method == "inhouse.likert5"
    assert (gen.review, gen.gold, gen.content_sha256) == ("fix", True, "ab" * 32)
    sn = m["ex-snorkel"]
    assert (sn.producer, sn.annotator, sn.rights, sn.domain) == ("model", None, "withdrawn", "email")
    assert sn.value == {"probabilities": [0.25, 0.75]}
    assert led.entry(m.seq).kind == "manifest"

    again = Manifest.load(led, "train-v1")
    assert again.digest == m.digest and len(again) == 5 and "ex-ls" in again and "nope" not in again
    assert again["ex-ls"] == m["ex-ls"]
    assert Manifest.load(led, m.seq).digest == m.digest
    with pytest.raises(KeyError, match="'nope' is not in manifest 'train-v1'"):
        again["nope"]


def test_manifest_latest_review_and_revision(led: Ledger, tmp_path: Path) -> None:
    rows = [json.loads(x) for x in (FIXTURES / "labelbox_export_v2.ndjson").read_text().splitlines()]
    rows[0]["projects"]["clproj00consensus000000001"]["labels"][1]["label_details"]["reviews"].append(
        {
            "reviewed_at": "2024-03-09T09:00:00.000+00:00",
            "reviewed_by": "rev.kim@example.com",
            "review_action": "Approve",
        }
    )
    later = tmp_path / "later.ndjson"
    later.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = Manifest.create(led, "a", {"x": "cllb0000000000000000000002"})
    ingest.labelbox(later, led, pseudonym_key=pseud())
    after = Manifest.create(led, "b", {"x": "cllb0000000000000000000002"})
    assert before["x"].review == "reject" and after["x"].review == "approve"  # the latest decision wins
    assert after["x"].label_seq > before["x"].label_seq  # resolves to the newest revision
    assert Manifest.load(led, "a")["x"].review == "reject"  # an existing manifest stays pinned


def test_manifest_errors(led: Ledger) -> None:
    with pytest.raises(ManifestError, match="'missing' is not in the ledger"):
        Manifest.create(led, "m", {"e": "missing"})
    with pytest.raises(ManifestError, match="domains: example 'zzz'"):
        Manifest.create(led, "m", {"e": "9001"}, domains={"zzz": "d"})
    with pytest.raises(ManifestError, match="no manifest named"):
        Manifest.load(led, "never")
    with pytest.raises(ManifestError, match="not a manifest"):
        Manifest.load(led, 1)


def test_manifest_ambiguous_label_id(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "amb.db", create=True)
    gen = tmp_path / "g.jsonl"
    gen.write_text(json.dumps({"item_id": "t", "label_id": "9001", "value": "x"}) + "\n")
    ingest.labelstudio(FIXTURES / "labelstudio_export.json", led, pseudonym_key=pseud())
    ingest.jsonl(gen, led, pseudonym_key=pseud())
    with pytest.raises(ManifestError, match="several sources"):
        Manifest.create(led, "m", {"e": "9001"})
    m = Manifest.create(led, "m", {"e": "jsonl:9001", "f": "labelstudio:9001"})
    assert (m["e"].source, m["f"].source) == ("jsonl", "labelstudio")


def test_manifest_cli(led: Ledger, tmp_path: Path) -> None:
    mp = tmp_path / "map.json"
    mp.write_text(json.dumps({"examples": {"a": "9001"}, "domains": {"a": "vehicles"}}))
    led.close()
    res = CliRunner().invoke(
        main, ["manifest", "create", "cli-m", str(mp), "--ledger", led.location, "--json"]
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    with Ledger.open(led.location) as again:
        assert Manifest.load(again, "cli-m")["a"].domain == "vehicles" and out["examples"] == 1
    mp.write_text(json.dumps({"a": "unknown-label"}))
    bad = CliRunner().invoke(main, ["manifest", "create", "x", str(mp), "--ledger", led.location])
    assert bad.exit_code == 2 and "unknown-label" in bad.stderr


# -- pseudonym keys ---------------------------------------------------------------------------------------------
def test_pseudonym_is_keyed_hmac() -> None:
    p = Pseudonymizer(KEY)
    assert p.pseudonym("Ana.Silva@Example.com") == expected_pseudonym("ana.silva@example.com")
    assert Pseudonymizer(bytes(32)).pseudonym("ana.silva@example.com") != p.pseudonym("ana.silva@example.com")
    assert (
        p.scrub_text("mail ana.silva@example.com now")
        == f"mail {expected_pseudonym('ana.silva@example.com')} now"
    )


def test_key_files(tmp_path: Path) -> None:
    key = tmp_path / "k"
    create_key(key)
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and len(read_key(key)) == 32
    key.chmod(0o644)
    with pytest.raises(PseudonymKeyError, match="chmod 600"):
        read_key(key)
    with pytest.raises(PseudonymKeyError, match="not found"):
        read_key(tmp_path / "absent")
    with pytest.raises(PseudonymKeyError, match="no local file"):
        open_key(None, "postgresql+psycopg://h/db")
    messages: list[str] = []
    first = open_key(None, tmp_path / "l.db", announce=messages.append)
    second = open_key(None, tmp_path / "l.db", announce=messages.append)
    assert len(messages) == 1 and "created pseudonym key" in messages[0]
    assert first.key_id == second.key_id and first.pseudonym("a@b.io") == second.pseudonym("a@b.io")


def test_identity_map_is_a_separate_file(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "m.db", create=True)
    idmap = tmp_path / "identities.jsonl"
    key = tmp_path / "k"
    key.write_text(KEY.hex())
    os.chmod(key, 0o600)
    ingest.labelbox(FIXTURES / "labelbox_v1_export.json", led, pseudonym_key=key, identity_map=idmap)
    pairs = [json.loads(x) for x in idmap.read_text().splitlines()]
    assert {p["identity"] for p in pairs} == {
        "ana.silva@example.com",
        "ben.okafor@example.com",
        "rev.kim@example.com",
    }
    assert all(p["pseudonym"] == expected_pseudonym(p["identity"]) for p in pairs)
    assert stat.S_IMODE(idmap.stat().st_mode) == 0o600


# -- suggestions ------------------------------------------------------------------------------------------------
def test_record_export_and_link_suggestions(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "s.db", create=True)
    ckpt = led.append("checkpoint", {"run": "r", "tag": "epoch-1"})
    rows = [
        {"item_id": "cldr0000000000000000000001", "suggestion_id": "9c5d4f8e-4a61-4b7e-9a3c-0d2f1e6b7a01",
         "value": {"name": "vehicle", "bbox": {"top": 49.0, "left": 99.0, "height": 40.0, "width": 60.0}}, "confidence": 0.93},
        {"item_id": "101", "value": [{"type": "rectanglelabels", "from_name": "label", "to_name": "image",
                                     "value": {"x": 9.0, "y": 20.0, "width": 30.5, "height": 12.25, "rectanglelabels": ["Car"]}}],
         "confidence": 0.87},
    ]  # fmt: skip
    seqs = record_suggestions(led, rows, checkpoint_seq=ckpt, model_version="detector-v3")
    assert [led.entry(s).body["checkpoint_seq"] for s in seqs] == [ckpt, ckpt]
    with pytest.raises(ValueError, match="not a checkpoint"):
        record_suggestions(led, rows, checkpoint_seq=seqs[0])
    with pytest.raises(ValueError, match="e-mail"):
        record_suggestions(led, [{"item_id": "x", "value": "ask bob@example.com"}])

    mal = tmp_path / "mal.ndjson"
    assert export_labelbox_mal(led, mal, checkpoint_seq=ckpt) == 1
    (line,) = [json.loads(x) for x in mal.read_text().splitlines()]
    assert line == {"uuid": "9c5d4f8e-4a61-4b7e-9a3c-0d2f1e6b7a01", "dataRow": {"id": "cldr0000000000000000000001"},
                    "name": "vehicle", "bbox": {"top": 49, "left": 99, "height": 40, "width": 60}, "confidence": 0.93}  # fmt: skip
    preds = tmp_path / "preds.json"
    assert export_labelstudio_predictions(led, preds, model_version="detector-v3") == 1
    (pred,) = json.loads(preds.read_text())
    assert (pred["task"], pred["model_version"], pred["score"]) == (101, "detector-v3", 0.87)

    # The annotators correct the pre-label in Labelbox; the export's feature id is the MAL uuid.
    s = ingest.labelbox(FIXTURES / "labelbox_export_v2.ndjson", led, pseudonym_key=pseud())
    assert s.seeded == 1
    (seeded,) = [e.body for e in led.entries(kind="annotation") if e.body["seeded_from"]]
    assert seeded["seeded_from"] == [
        {"suggestion_id": "9c5d4f8e-4a61-4b7e-9a3c-0d2f1e6b7a01", "origin": "mal", "seq": seqs[0]}
    ]

    res = CliRunner().invoke(
        main,
        [
            "suggestions",
            "export",
            str(tmp_path / "cli.ndjson"),
            "--ledger",
            led.location,
            "--format",
            "labelbox-mal",
            "--json",
        ],
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["written"] == 1
