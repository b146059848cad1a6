"""Signed provenance exports, ``verify-export`` and ``prove --label`` on a small real run.

Predicate figures are checked against the brute-force oracle of tests/query_support.py (independent of
audit.contributions); tampering is done on decoded bytes and re-encoded, so each case reaches the check it
targets (a broken base64 string is a malformed bundle: exit 2).
"""

from __future__ import annotations

import base64
import copy
import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from audit import dsse, export
from audit.cli import main
from ledger import keys, note
from ledger.store import Ledger
from tests.ingest_support import EMAIL
from tests.lineage_support import LAYERS, Built, build
from tests.query_support import brute_force

TOP = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    return build(tmp_path_factory.mktemp("export"))


@pytest.fixture(scope="module")
def bundle_path(built: Built) -> Path:
    out = built.path.parent / "bundle.json"
    res = CliRunner().invoke(
        main,
        ["export", str(built.path), "--run", "mlp", "--key", str(built.key), "-o", str(out), "--evidence",
         "--top", str(TOP)],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture()
def bundle(bundle_path: Path) -> dict[str, Any]:
    return json.loads(bundle_path.read_text())


def _statement(b: dict[str, Any]) -> dict[str, Any]:
    return json.loads(base64.b64decode(b["dsseEnvelope"]["payload"]))


def _verify(path: Path, pub: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["verify-export", str(path), "--pubkey", str(pub), *extra])


def _write(tmp: Path, b: dict[str, Any], name: str = "t.json") -> Path:
    p = tmp / name
    p.write_text(json.dumps(b))
    return p


def _flip(b64: str, pos: int) -> str:
    raw = bytearray(base64.b64decode(b64))
    raw[pos % len(raw)] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


def test_export_verifies_and_has_the_statement_shape(built: Built, bundle_path: Path, bundle: Any) -> None:
    res = _verify(bundle_path, built.pub, "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["ok"] and {c["name"]: c["status"] for c in rep["checks"]} == dict.fromkeys(
        ("signature", "statement", "checkpoint", "inclusion", "payloads", "subject", "figures"), "ok"
    )
    assert _verify(bundle_path, built.vkey).exit_code == 0  # the verifier key line works too
    env = bundle["dsseEnvelope"]
    assert env["payloadType"] == "application/vnd.in-toto+json"
    payload = base64.b64decode(env["payload"])
    st = json.loads(payload)
    from ledger.canonical import canonical_json

    assert canonical_json(st, "statement") == payload  # RFC 8785 bytes
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == export.PREDICATE_TYPE
    p = st["predicate"]
    with Ledger.open(built.path) as led:
        cps = [led.entry(s).body for s in built.checkpoints]
        assert [s["digest"]["sha256"] for s in st["subject"]] == [c["state_dict_sha256"] for c in cps]
        assert p["ledger"]["origin"] == led.origin
        cp = note.verify_checkpoint(p["ledger"]["checkpoint"]["note"], keys.load_verifier(built.pub))
        assert cp.root == led.root(cp.size) and cp.size > max(built.checkpoints)
        run = led.entry(p["run"]["seq"]).body
        assert p["run"]["config"] == run and p["policy"]["digest"].startswith("sha256:")
        assert p["manifest"]["digest"] == led.entry(built.manifest_seq).body["digest"]
    assert p["dp"] is None and [e["name"] for e in p["exports"]] == ["labels.jsonl"]
    assert not EMAIL.findall(bundle_path.read_bytes())  # pseudonyms only, in the predicate and the evidence


def test_predicate_figures_equal_the_brute_force_oracle(built: Built, bundle: Any) -> None:
    with Ledger.open(built.path) as led:
        orc = brute_force(list(led.steps("mlp")), "mean")
        man = led.entry(built.manifest_seq).body["examples"]
        ann_of = {
            e.seq: e.body["producer"]["id"]
            for e in led.entries(kind="annotation")
            if e.body["producer"]["kind"] == "human"
        }
    fig = _statement(bundle)["predicate"]["contributions"]
    assert fig["metric"] == "update" and fig["top_k"] == TOP and fig["examples"] == len(orc.update)
    for j, layer in enumerate(fig["layers"]):
        assert layer["layer"] == LAYERS[j]
        total = sum(v[j] for v in orc.update.values())
        assert layer["total"] == pytest.approx(total, rel=1e-12)
        by_label: dict[int, float] = {}
        by_ann: dict[str, float] = {}
        for ex, rec in man.items():
            for s in {lab["seq"] for lab in rec["labels"]}:
                by_label[s] = by_label.get(s, 0.0) + orc.update[ex][j]
            for a in {ann_of[lab["seq"]] for lab in rec["labels"]}:
                by_ann[a] = by_ann.get(a, 0.0) + orc.update[ex][j]
        want = sorted(by_label, key=lambda s: (-by_label[s], s))[:TOP]
        assert [r["seq"] for r in layer["labels"]] == want
        for r in layer["labels"]:
            assert r["score"] == pytest.approx(by_label[r["seq"]], rel=1e-12)
            assert r["share"] == pytest.approx(by_label[r["seq"]] / total, rel=1e-12)
            assert r["annotator"].startswith("anon:")
        assert [r["annotator"] for r in layer["annotators"]] == sorted(by_ann, key=lambda a: (-by_ann[a], a))[
            :TOP
        ]
        for r in layer["annotators"]:
            assert r["score"] == pytest.approx(by_ann[r["annotator"]], rel=1e-12)


def test_without_evidence_says_what_was_not_checked(built: Built, tmp_path: Path) -> None:
    out = tmp_path / "lean.json"
    r = CliRunner().invoke(
        main, ["export", str(built.path), "--run", "mlp", "--key", str(built.key), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    res = _verify(out, built.pub)
    assert res.exit_code == 0
    assert "not checked without evidence: inclusion, payloads, subject, figures" in res.output
    assert "skipped  figures" in res.output


@pytest.mark.parametrize("pos", [0, 7, 100, 1000, -1])
def test_flipped_payload_byte_fails(built: Built, bundle: Any, tmp_path: Path, pos: int) -> None:
    bundle["dsseEnvelope"]["payload"] = _flip(bundle["dsseEnvelope"]["payload"], pos)
    res = _verify(_write(tmp_path, bundle), built.pub)
    assert res.exit_code == 1 and "FAILED signature" in res.output


@pytest.mark.parametrize("pos", [0, 31, 63])
def test_flipped_signature_byte_fails(built: Built, bundle: Any, tmp_path: Path, pos: int) -> None:
    sig = bundle["dsseEnvelope"]["signatures"][0]
    sig["sig"] = _flip(sig["sig"], pos)
    res = _verify(_write(tmp_path, bundle), built.pub)
    assert res.exit_code == 1 and "FAILED signature" in res.output


def test_another_key_fails(bundle_path: Path, tmp_path: Path) -> None:
    other = keys.save_keypair(tmp_path / "other")
    res = _verify(bundle_path, other.public)
    assert res.exit_code == 1 and "FAILED signature" in res.output and "another key" in res.output


@pytest.mark.parametrize("field", ["leaf_data", "payload", "proof"])
@pytest.mark.parametrize("which", [0, 5, -1])
def test_flipped_evidence_byte_fails(
    built: Built, bundle: Any, tmp_path: Path, field: str, which: int
) -> None:
    ents = bundle["evidence"]["entries"]
    if field == "payload":
        ents = [e for e in ents if e["payloads"]]
    e = ents[which]
    if field == "leaf_data":
        e["leaf_data"] = _flip(e["leaf_data"], 40)
    elif field == "payload":
        name = sorted(e["payloads"])[0]
        e["payloads"][name] = _flip(e["payloads"][name], 3)
    else:
        e["proof"][0] = _flip(e["proof"][0], 0)
    res = _verify(_write(tmp_path, bundle), built.pub)
    assert res.exit_code == 1, res.output
    want = "FAILED payload" if field == "payload" else "FAILED inclusion"
    assert want in res.output and f"seq {e['seq']}" in res.output


def test_missing_evidence_entry_fails(built: Built, bundle: Any, tmp_path: Path) -> None:
    ents = bundle["evidence"]["entries"]
    steps = [i for i, e in enumerate(ents) if e["kind"] == "step"]
    last = copy.deepcopy(bundle)
    del ents[steps[0]]  # it brought the run's first examples (step v 3: the others' ids refer to them)
    res = _verify(_write(tmp_path, bundle), built.pub)
    assert res.exit_code == 1 and "FAILED evidence: the run's step entries do not read" in res.output
    assert "a step of the run is missing" in res.output
    del last["evidence"]["entries"][steps[-1]]  # a later step: the figures no longer recompute
    res = _verify(_write(tmp_path, last), built.pub)
    assert res.exit_code == 1 and "FAILED predicate: predicate.run does not match" in res.output


def test_resigned_wrong_figures_fail(built: Built, bundle: Any, tmp_path: Path) -> None:
    """Even with a valid signature, figures that do not recompute from the evidence are rejected."""
    st = _statement(bundle)
    fig = st["predicate"]["contributions"]["layers"][1]["labels"][0]
    fig["score"] = fig["score"] * (1 + 1e-15) + 1e-300  # one ulp-scale change
    from ledger.canonical import canonical_json

    env = dsse.sign(
        canonical_json(st, "statement"), dsse.INTOTO_PAYLOAD_TYPE, keys.load_private_key(built.key)
    )
    bundle["dsseEnvelope"] = env.to_json()
    res = _verify(_write(tmp_path, bundle), built.pub)
    assert res.exit_code == 1 and "FAILED figures" in res.output


@pytest.mark.parametrize(
    "mutate, msg",
    [
        (lambda b: "not json {", "not valid JSON"),
        (lambda b: {k: v for k, v in b.items() if k != "dsseEnvelope"}, "missing field 'dsseEnvelope'"),
        (lambda b: {**b, "mediaType": "x"}, "bundle.mediaType"),
        (lambda b: {**b, "evidence": {"tree_size": 3, "entries": [{"seq": "a"}]}}, "entries[0].seq"),
        (lambda b: _bad_b64(b), "not valid base64"),
        (lambda b: {**b, "dsseEnvelope": {"payload": "AA=="}}, "missing field 'payloadType'"),
    ],
)
def test_malformed_bundle_exits_2(built: Built, bundle: Any, tmp_path: Path, mutate: Any, msg: str) -> None:
    m = mutate(copy.deepcopy(bundle))
    p = tmp_path / "m.json"
    p.write_text(m if isinstance(m, str) else json.dumps(m))
    res = _verify(p, built.pub)
    assert res.exit_code == 2 and msg in res.output, res.output
    assert _verify(tmp_path / "absent.json", built.pub).exit_code == 2
    bad_key = tmp_path / "bad.pub"
    bad_key.write_text("not a key")
    assert _verify(p, bad_key).exit_code == 2


def _bad_b64(b: dict[str, Any]) -> dict[str, Any]:
    b["evidence"]["entries"][0]["leaf_data"] = "!!!"
    return b


def test_export_reuses_a_covering_checkpoint_and_refuses_a_corrupt_ledger(
    built: Built, tmp_path: Path
) -> None:
    db = tmp_path / "copy.db"
    shutil.copy(built.path, db)
    r = CliRunner()
    with Ledger.open(db) as led:
        n = len(led.checkpoints())
    assert (
        r.invoke(
            main, ["export", str(db), "--run", "mlp", "--key", str(built.key), "-o", str(tmp_path / "a")]
        ).exit_code
        == 0
    )
    assert (
        r.invoke(
            main, ["export", str(db), "--run", "mlp", "--key", str(built.key), "-o", str(tmp_path / "b")]
        ).exit_code
        == 0
    )
    with Ledger.open(db) as led:
        assert len(led.checkpoints()) == max(n, 1)  # signed at most once, then reused
        step = next(e.seq for e in led.entries(kind="step"))
    con = sqlite3.connect(db)
    con.execute(
        "UPDATE payloads SET data = zeroblob(length(data)) WHERE seq = ? AND name = 'grad_norms'", (step,)
    )
    con.commit()
    con.close()
    out = tmp_path / "c.json"
    res = r.invoke(
        main, ["export", str(db), "--run", "mlp", "--key", str(built.key), "-o", str(out), "--evidence"]
    )
    assert res.exit_code == 1 and f"seq {step}" in res.output and not out.exists()
    res = r.invoke(main, ["export", str(db), "--run", "nope", "--key", str(built.key), "-o", str(out)])
    assert res.exit_code == 2 and "no run named 'nope'" in res.output


def test_dp_epsilon_is_exported_and_recomputes(tmp_path: Path) -> None:
    b = build(tmp_path, dp=True)
    with Ledger.open(b.path) as led:
        bundle = export.build_export(
            led, "mlp", keys.load_private_key(b.key), "gradledger-test", evidence=True
        )
        last = [r for r in led.steps("mlp")][-1]
    dp = _statement(bundle)["predicate"]["dp"]
    assert dp["eps"] == last.eps and dp["eps"] > 0 and dp["delta"] == 1e-5
    rep = export.verify_bundle(json.dumps(bundle), keys.load_verifier(b.pub))
    assert [c.status for c in rep.checks] == ["ok"] * 7


def test_prove_label(built: Built, tmp_path: Path) -> None:
    r = CliRunner()
    with Ledger.open(built.path) as led:
        if not led.checkpoints():
            led.sign_checkpoint(keys.load_private_key(built.key), "gradledger-test")
        seq = next(e.seq for e in led.entries(kind="annotation") if e.body["label_id"] == "lab-7")
        leaf = led.entry(seq).leaf_hash
    res = r.invoke(main, ["prove", str(built.path), "--label", "lab-7"])
    assert res.exit_code == 0, res.output
    text = res.output
    assert text.startswith("c2sp.org/tlog-proof@v1\nextra ") and f"\nindex {seq}\n" in text
    cp, tp = note.verify_tlog_proof(text, leaf, keys.load_verifier(built.pub))  # the spec's own verifier path
    assert tp.index == seq
    body = export.verify_label_proof(text, keys.load_verifier(built.pub), "lab-7")
    assert body["label_id"] == "lab-7" and body["producer"]["id"].startswith("anon:")
    # against a checkpoint file kept outside the database
    cpf = tmp_path / "cp.note"
    cpf.write_text(tp.checkpoint_note)
    res2 = r.invoke(main, ["prove", str(built.path), "--label", "jsonl:lab-7", "--checkpoint", str(cpf)])
    assert res2.exit_code == 0 and res2.output == text
    # tampered: one byte of the entry, of a proof hash, or another key
    tampered = text.replace(
        text.split("\n")[1], "extra " + _flip(text.split("\n")[1].removeprefix("extra "), 200)
    )
    with pytest.raises(note.InclusionError):
        export.verify_label_proof(tampered, keys.load_verifier(built.pub))
    lines = text.split("\n")
    lines[3] = _flip(lines[3], 0)
    with pytest.raises(note.InclusionError):
        export.verify_label_proof("\n".join(lines), keys.load_verifier(built.pub))
    with pytest.raises(note.SignatureError):
        export.verify_label_proof(text, keys.save_keypair(tmp_path / "k2").public)
    with pytest.raises(note.InclusionError, match="not 'lab-8'"):
        export.verify_label_proof(text, keys.load_verifier(built.pub), "lab-8")
    res = r.invoke(main, ["prove", str(built.path), "--label", "nope"])
    assert res.exit_code == 2 and "no annotation entry with label id 'nope'" in res.output
    res = r.invoke(main, ["prove", str(built.path)])
    assert res.exit_code == 2 and "exactly one of --seq or --label" in res.output


def test_top_annotators_agree_with_gradledger_query(built: Built, bundle: Any) -> None:
    """Cross-check with the query aggregates (a separate implementation of the same metric)."""
    from audit import query

    fig = _statement(bundle)["predicate"]["contributions"]
    with Ledger.open(built.path) as led:
        for layer in fig["layers"]:
            q = query.layer(led, "mlp", layer["layer"], top=TOP, by="annotator")
            assert q.total == pytest.approx(layer["total"], rel=1e-9)
            assert [r.key for r in q.rows] == [a["annotator"] for a in layer["annotators"]]
            for r, a in zip(q.rows, layer["annotators"], strict=True):
                assert r.score == pytest.approx(a["score"], rel=1e-9)
