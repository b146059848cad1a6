"""``gradledger demo``: run once (quick settings) through the CLI, then check its outputs independently.

The checks re-open the files the demo wrote rather than trusting its summary: the ledger verifies against the
signed checkpoint note with the public key; the export verifies with the bundle and the public key alone (and a
flipped byte fails); the careless annotator shows up in the head layer's answer and every label the policy bars
from the head contributes exactly nothing to it; no e-mail address from the generated export reaches the
ledger, the export bundle or the lineage graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from audit import query
from audit.cli import main
from audit.demo import HEAD, DemoConfig, Paths, barred_from_head
from audit.demo_data import CARELESS, SimulationConfig, email, identities, simulate
from audit.export import verify_bundle
from instrument import Policy
from ledger import keys
from ledger.note import VerificationError
from ledger.provenance import Manifest
from ledger.store import Ledger


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("demo") / "out"
    res = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick", "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    summary = json.loads(res.stdout)
    summary["_out"] = out
    return summary


def test_summary_lists_files_that_exist(demo: dict[str, Any]) -> None:
    for key in (
        "export",
        "ledger",
        "public_key",
        "policy",
        "checkpoint",
        "report",
        "lineage",
        "bundle",
        "summary",
    ):
        assert Path(demo[key]).is_file(), key
    assert demo["report_chain_ok"] is True
    assert Path(demo["report"]).read_text().lstrip().lower().startswith("<!doctype html")
    with Ledger.open(demo["ledger"]) as led:
        profile = led.entry(demo["profile_seq"])
    assert profile.kind == "profile" and profile.body["run"] == "digits-cnn"
    assert len(profile.body["domains"]) >= 5 and set(profile.body["domains"]) <= {
        f"digit-{c}" for c in range(10)
    }
    assert json.loads(Path(demo["summary"]).read_text())["root"] == demo["root"]


def test_rerun_into_the_same_directory_is_refused(demo: dict[str, Any]) -> None:
    res = CliRunner().invoke(main, ["demo", "--out", str(demo["_out"]), "--quick"])
    assert res.exit_code == 2
    assert "already holds a demo" in res.stderr


def test_ledger_verifies_against_the_signed_checkpoint(demo: dict[str, Any]) -> None:
    with Ledger.open(demo["ledger"]) as led:
        res = led.verify(
            checkpoint=Path(demo["checkpoint"]).read_text(),
            pubkey=keys.load_verifier(demo["public_key"]),
            deep=True,
        )
        assert res.ok, res.reason
        assert res.size == led.size == demo["entries"]
        kinds = {e.kind for e in led.entries(payloads=False)}
    assert {"annotation", "export", "manifest", "policy", "run", "step", "checkpoint"} <= kinds
    assert demo["tampered_verify_ok"] is False
    assert demo["tampered_first_bad_seq"] == demo["tampered_seq"]


def test_export_verifies_with_the_public_key_only(demo: dict[str, Any], tmp_path: Path) -> None:
    auditor = tmp_path / "auditor"
    auditor.mkdir()
    bundle = shutil.copy(demo["bundle"], auditor / "bundle.json")
    pub = shutil.copy(demo["public_key"], auditor / "ledger.pub")
    report = verify_bundle(Path(bundle).read_bytes(), keys.load_verifier(pub))
    assert {c.name: c.status for c in report.checks} == {
        n: "ok"
        for n in ("signature", "statement", "checkpoint", "inclusion", "payloads", "subject", "figures")
    }
    assert report.run == "digits-cnn"
    # the check can fail: another key, and an edited payload
    other = keys.save_keypair(tmp_path / "other", "someone-else")
    with pytest.raises(VerificationError):
        verify_bundle(Path(bundle).read_bytes(), keys.load_verifier(other.public))
    data = json.loads(Path(bundle).read_text())
    p = data["dsseEnvelope"]["payload"]
    data["dsseEnvelope"]["payload"] = p[:40] + ("A" if p[40] != "A" else "B") + p[41:]
    with pytest.raises(VerificationError):
        verify_bundle(json.dumps(data).encode(), keys.load_verifier(pub))


def test_verify_export_cli(demo: dict[str, Any]) -> None:
    res = CliRunner().invoke(
        main, ["verify-export", demo["bundle"], "--pubkey", demo["public_key"], "--json"]
    )
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout)["ok"] is True


def test_careless_annotator_is_visible_and_bounded_by_the_policy(demo: dict[str, Any]) -> None:
    pseud = demo["careless_annotator"]
    assert pseud.startswith("anon:")
    ledger = demo["ledger"]
    with Ledger.open(ledger) as led:
        by_ann = query.layer(led, "digits-cnn", HEAD, by="annotator", top=20)
        assert pseud in [r.key for r in by_ann.rows]
        manifest = Manifest.load(led, "digits-labelbox")
        policy = Policy.load(Paths(Path(demo["out"])).policy)
        theirs = sorted(ex for ex, prov in manifest.items() if prov.annotator == pseud)
        assert len(theirs) == demo["careless_labels"] > 0
        layers = list(next(iter(led.steps("digits-cnn"))).layers)
        barred = set(barred_from_head(manifest, policy, layers, theirs))
        assert len(barred) == demo["careless_barred_from_head"] > 0
        # every barred label is low-consensus or rejected, and not gold
        for ex in barred:
            prov = manifest[ex]
            assert prov.review == "reject" or (prov.consensus is not None and prov.consensus < 0.7)
        # the recorded weights follow the policy: 0 for the head on every step a barred example was in
        j = layers.index(HEAD)
        seen = 0
        for rec in led.steps("digits-cnn"):
            for i, ex in enumerate(rec.example_ids):
                if ex in barred:
                    seen += 1
                    assert rec.weights[i, j] == 0.0
                    shallow = 0.0 if manifest[ex].review == "reject" else 1.0  # low consensus: shallow only
                    assert np.all(rec.weights[i, :j] == shallow)
        assert seen > 0
        # so their head contribution is exactly that of the labels the policy admits
        mine = query.annotator(led, pseud, run="digits-cnn").runs[0]
        head = next(r for r in mine["layers"] if r["layer"] == HEAD)
        admitted = 0.0
        for ex in theirs:
            prof = query.label(led, manifest[ex].label_id, run="digits-cnn").runs[0]
            contribution = prof["totals"]["update"][j]
            if ex in barred:
                assert contribution == 0.0
                if manifest[ex].review != "reject":
                    assert prof["totals"]["update"][0] > 0.0  # while it did train conv1
            else:
                admitted += contribution
        assert head["update"] == pytest.approx(admitted, rel=1e-9)
        # and the mean weight they received for the head is the admitted fraction of their sample-steps
        assert head["weight"] < 1.0
    # the policy lowered their head share below the unrouted baseline's
    assert demo["shaping"]["shares"][HEAD] < demo["shaping_unrouted"]["shares"][HEAD]
    assert demo["shaping"]["shares"][HEAD] < demo["shaping"]["shares"]["conv1"]


def test_no_email_from_the_export_reaches_the_ledger_or_the_bundle(demo: dict[str, Any]) -> None:
    export = Path(demo["export"]).read_bytes()
    present = [who for who in identities() if who.encode() in export]
    assert email(CARELESS) in present and len(present) == len(identities())  # the grep can find them
    out = Path(demo["out"])
    shipped = [
        *out.glob("ledger.db*"),
        *(out / n for n in ("bundle.json", "lineage.graphml", "summary.json", "report.html")),
    ]
    for path in shipped:
        data = path.read_bytes()
        for who in present:
            assert who.encode() not in data, (path.name, who)
        assert b"@annotate.example.com" not in data, path.name
    assert demo["emails_in_ledger"] == []


def test_memorisation_reports_baselines_and_the_truth(demo: dict[str, Any]) -> None:
    mem = demo["memorisation"]
    assert set(mem["evaluation"]) == {"self_influence", "mean_loss", "aum"}
    for scores in mem["evaluation"].values():
        assert 0.0 <= scores["auroc"] <= 1.0
    assert len(mem["top"]) == DemoConfig.quick().top
    sim = simulate(SimulationConfig(seed=0, limit=DemoConfig.quick().limit))
    wrong = sim.wrong_examples()
    assert mem["wrong_in_top"] == sum(r["example_id"] in wrong for r in mem["top"])


def test_simulation_has_the_annotators_it_promises() -> None:
    sim = simulate(SimulationConfig(seed=0, limit=500))
    kinds = {lab.row_kind for lab in sim.labels}
    assert kinds >= {"single", "consensus", "gold"}
    careless = [lab for lab in sim.labels if lab.annotator == email(CARELESS) and not lab.skipped]
    careful = [lab for lab in sim.labels if lab.annotator != email(CARELESS) and not lab.skipped]
    assert np.mean([lab.wrong for lab in careless]) > 0.25 > 0.05 > np.mean([lab.wrong for lab in careful])
    assert any(lab.review == "Reject" for lab in sim.labels)
    for lab in sim.labels:  # assigned classes are the truth exactly when the label is not wrong
        if not lab.skipped:
            assert (lab.value == int(sim.targets[lab.image])) != lab.wrong
