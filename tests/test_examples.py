"""Every example under examples/ runs as a script (small settings) and produces what its docstring promises."""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from audit.export import verify_bundle
from ledger import Ledger, keys

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _restore_threads() -> Iterator[None]:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run_script(name: str, *args: str) -> int:
    """Run ``examples/<name>`` as ``__main__`` with ``args``; return its exit code."""
    argv = sys.argv
    sys.argv = [str(EXAMPLES / name), *args]
    try:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        sys.argv = argv
    return 0


def load(name: str) -> dict[str, Any]:
    return runpy.run_path(str(EXAMPLES / name))


def test_digits_governed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dg"
    assert run_script("digits_governed.py", "--out", str(out), "--epochs", "2", "--limit", "250") == 0
    printed = capsys.readouterr().out
    assert "verify: intact" in printed and "auditor: signature ok" in printed
    with Ledger.open(out / "ledger.db") as led:
        res = led.verify(
            checkpoint=(out / "checkpoint.txt").read_text(),
            pubkey=keys.load_verifier(out / "keys/ledger.pub"),
        )
        assert res.ok, res.reason
        assert sum(1 for _ in led.steps("cnn-1")) > 0
    report = verify_bundle((out / "bundle.json").read_bytes(), keys.load_verifier(out / "keys/ledger.pub"))
    assert all(c.status == "ok" for c in report.checks)
    assert (out / "lineage.graphml").read_text().startswith("<?xml")
    # an existing ledger is refused with exit 2
    assert run_script("digits_governed.py", "--out", str(out)) == 2


def test_labelstudio_roundtrip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mod = load("labelstudio_roundtrip.py")
    out = tmp_path / "ls"
    s = mod["run"](out, tasks=150, new_tasks=40, epochs=3)
    assert s["verify_ok"]
    assert s["round1"]["records"] == 150
    # suggestions went out as Label Studio predictions, one per new task
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == len(s["suggestions"]) == 40
    assert all(isinstance(p["task"], int) and p["result"][0]["type"] == "choices" for p in preds)
    # every round-2 label is linked to the suggestion that pre-filled it; corrected ones say so
    assert s["round2"]["records"] == 40 and s["round2"]["seeded"] == 40
    with Ledger.open(out / "ledger.db") as led:
        for seq in s["corrected"]:
            body = led.entry(seq).body
            (seed,) = body["seeded_from"]
            assert seed["origin"] == "prediction-changed"
            sugg = led.entry(seed["seq"])
            assert sugg.kind == "suggestion" and sugg.body["checkpoint_seq"] == s["checkpoints"][0]
    # checkpoint 1 -> suggestion -> corrected label -> ... -> checkpoint 2 in the lineage graph
    if s["corrected"]:
        path = s["lineage_path"]
        assert (
            path[0] == f"checkpoint:{s['checkpoints'][0]}" and path[-1] == f"checkpoint:{s['checkpoints'][1]}"
        )
        assert path[1].startswith("suggestion:labelstudio:") and path[2].startswith("label:labelstudio:")
    # annotator e-mails of both exports never reach the ledger
    db = b"".join(p.read_bytes() for p in out.glob("ledger.db*"))
    exported = (out / "round1.json").read_bytes() + (out / "round2.json").read_bytes()
    assert b"@studio.example.org" in exported and b"@studio.example.org" not in db
    assert "lineage: checkpoint:" in capsys.readouterr().out


def test_labelstudio_roundtrip_as_a_script(tmp_path: Path) -> None:
    out = tmp_path / "ls"
    args = ("--out", str(out), "--tasks", "60", "--new-tasks", "10", "--epochs", "1")
    assert run_script("labelstudio_roundtrip.py", *args) == 0
    assert run_script("labelstudio_roundtrip.py", *args) == 2


def test_tiny_transformer(tmp_path: Path) -> None:
    mod = load("tiny_transformer.py")
    s = mod["run"](tmp_path / "tt", n=480, epochs=5)
    assert s["verify_ok"]
    assert s["ambiguity_order"][0] == "ambiguous"
    assert s["disagreement_order"][0] == "flipped"
    with Ledger.open(tmp_path / "tt" / "ledger.db") as led:
        body = led.entry(s["profile_seq"]).body
    assert set(body["entropy"]) == {"clean", "ambiguous", "flipped"}
    assert body["run"] == "tiny-transformer" and body["settings"]["folds"] == 3
    late = body["layers"][-1]
    assert body["entropy"]["ambiguous"][late]["mean"] > body["entropy"]["clean"][late]["mean"]


def test_tiny_transformer_refuses_an_existing_ledger(tmp_path: Path) -> None:
    (tmp_path / "ledger.db").write_bytes(b"")
    assert run_script("tiny_transformer.py", "--out", str(tmp_path)) == 2


def test_auditor_walkthrough_names_real_commands() -> None:
    """Every ``gradledger ...`` line in examples/auditor.md names a real command and only its options."""
    import click

    from audit.cli import main

    lines = [
        ln.split()
        for ln in (EXAMPLES / "auditor.md").read_text().splitlines()
        if ln.startswith("gradledger ")
    ]
    assert len(lines) >= 4, "auditor.md shows too few gradledger commands"
    for words in lines:
        cmd: click.Command = main
        rest = words[1:]
        while isinstance(cmd, click.Group) and rest and rest[0] in cmd.commands:
            cmd = cmd.commands[rest.pop(0)]
        assert not isinstance(cmd, click.Group), f"{' '.join(words)}: incomplete command"
        known = {o for p in cmd.params for o in p.opts}
        used = {w for w in rest if w.startswith("--")}
        assert used <= known, f"{' '.join(words)}: unknown options {used - known}"
