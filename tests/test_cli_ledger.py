"""The ledger CLI: exit codes 0 / 1 / 2, one-line errors, nothing created or modified on bad input."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from audit.cli import main
from ledger import Ledger


def run(*args: str) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_error_line(res: Result) -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path: Path) -> dict[str, Path]:
    led = tmp_path / "l.db"
    assert run("init", led).exit_code == 0
    with Ledger.open(led) as lg:
        lg.append_many(
            [
                (
                    "step",
                    {"i": i, "loss": float("nan") if i == 2 else 0.5},
                    {"g": np.ones((2, 2), np.float32) * i},
                )
                for i in range(6)
            ]
        )
    keys = tmp_path / "keys"
    assert run("keygen", keys).exit_code == 0
    other = tmp_path / "other-keys"
    assert run("keygen", other, "--name", "someone.else").exit_code == 0
    cp = tmp_path / "cp.txt"
    res = run("checkpoint", led, "--key", keys / "ledger.key", "-o", cp)
    assert res.exit_code == 0, res.stderr
    return {"ledger": led, "keys": keys, "other": other, "cp": cp, "dir": tmp_path}


def test_init_and_refuse_second_init(tmp_path: Path) -> None:
    led = tmp_path / "a.db"
    res = run("init", led, "--json")
    assert res.exit_code == 0
    out = json.loads(res.stdout)
    assert out["size"] == 1 and out["origin"].startswith("gradledger.local/")
    before = led.read_bytes()
    res = run("init", led)
    assert res.exit_code == 2 and "already a gradledger ledger" in one_error_line(res)
    assert led.read_bytes() == before


def test_keygen_files_modes_and_no_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "k"
    res = run("keygen", d, "--name", "audit.example")
    assert res.exit_code == 0
    assert stat.S_IMODE(os.stat(d / "ledger.key").st_mode) == 0o600
    assert (d / "ledger.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert (d / "ledger.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    vkey = (d / "ledger.vkey").read_text().strip()
    name, keyid, b64 = vkey.split("+", 2)
    assert name == "audit.example" and len(keyid) == 8 and b64
    before = snapshot(d)
    res = run("keygen", d)
    assert res.exit_code == 2 and "refusing to overwrite" in one_error_line(res)
    assert snapshot(d) == before


def test_checkpoint_verify_prove_log(setup: dict[str, Path]) -> None:
    led, keys, cp = setup["ledger"], setup["keys"], setup["cp"]
    note = cp.read_text()
    assert note.splitlines()[1] == "7" and "\u2014 gradledger " in note
    with Ledger.open(led) as lg:
        assert [c.note for c in lg.checkpoints()] == [note]
    res = run("verify", led, "--checkpoint", cp, "--pubkey", keys / "ledger.pub")
    assert res.exit_code == 0 and res.stdout.startswith("ok: 7 entries"), res.stdout
    res = run("verify", led, "--checkpoint", cp, "--pubkey", keys / "ledger.vkey", "--json", "--deep")
    out = json.loads(res.stdout)
    assert res.exit_code == 0 and out["ok"] and out["checkpoint"]["size"] == 7 and out["deep"]
    res = run("prove", led, "--seq", "3", "--json")
    proof = json.loads(res.stdout)
    assert res.exit_code == 0 and proof["seq"] == 3 and proof["size"] == 7 and len(proof["proof"]) == 3
    with Ledger.open(led) as lg:
        assert proof["root"] == lg.root().hex()
    assert "leaf hash" in run("prove", led, "--seq", "0").stdout
    res = run("log", led, "--kind", "step", "--json")
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[2]["body"]["loss"] == {"$float": "NaN"} and rows[2]["payloads"]["g"]["shape"] == [2, 2]
    text = run("log", led, "--limit", "2").stdout.splitlines()
    assert len(text) == 2 and text[0].split()[:2] == ["0", "ledger"]


def test_verify_failure_exit_1_names_first_bad_seq(setup: dict[str, Path]) -> None:
    led = setup["ledger"]
    con = sqlite3.connect(led)
    (body,) = con.execute("SELECT body FROM entries WHERE seq = 4").fetchone()
    con.execute("UPDATE entries SET body = ? WHERE seq = 4", (body.replace(b'"i":3', b'"i":8'),))
    con.commit()
    con.close()
    res = run("verify", led)
    assert res.exit_code == 1 and res.stdout.startswith("FAILED at seq 4:"), res.stdout
    out = json.loads(run("verify", led, "--json").stdout)
    assert out["ok"] is False and out["first_bad_seq"] == 4
    res = run("checkpoint", led, "--key", setup["keys"] / "ledger.key")
    assert res.exit_code == 1 and "refusing to sign" in one_error_line(res)


def test_truncation_caught_only_with_saved_checkpoint(setup: dict[str, Path]) -> None:
    led = setup["ledger"]
    con = sqlite3.connect(led)
    con.execute("DELETE FROM signed_checkpoints")
    con.execute("DELETE FROM payloads WHERE seq >= 5")
    con.execute("DELETE FROM entries WHERE seq >= 5")
    con.execute(
        "DELETE FROM tree_nodes WHERE node >= 0"
    )  # rebuild the tree for 5 leaves, as an attacker would
    con.commit()
    con.close()
    from ledger.tree import extend, node_rows

    with Ledger.open(led) as lg, lg.engine.begin() as c:
        from ledger import schema

        leaves = [e.leaf_hash for e in lg.entries(payloads=False)]
        c.execute(schema.tree_nodes.insert(), node_rows(extend([], leaves, 0)))
    assert run("verify", led).exit_code == 0
    res = run("verify", led, "--checkpoint", setup["cp"], "--pubkey", setup["keys"] / "ledger.pub")
    assert res.exit_code == 1 and "FAILED at seq 5" in res.stdout and "truncated" in res.stdout


# ---- bad input: exit 2, one line, nothing created or modified -------------------------------------------


@pytest.mark.parametrize(
    "command", [["verify"], ["log"], ["prove", "--seq", "0"], ["checkpoint", "--key", "KEY"]]
)
def test_missing_ledger_is_not_created(setup: dict[str, Path], command: list[str]) -> None:
    missing = setup["dir"] / "missing.db"
    args = [a.replace("KEY", str(setup["keys"] / "ledger.key")) for a in command]
    res = run(args[0], missing, *args[1:])
    assert res.exit_code == 2 and "no such ledger" in one_error_line(res)
    assert not missing.exists()
    res = run(args[0], f"sqlite:///{missing}", *args[1:])
    assert res.exit_code == 2 and not missing.exists()


@pytest.mark.parametrize("kind", ["garbage", "foreign", "empty", "directory"])
def test_unreadable_or_foreign_database(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "db"
    if kind == "garbage":
        target.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 40)
    elif kind == "foreign":
        con = sqlite3.connect(target)
        con.execute("CREATE TABLE notes (x TEXT)")
        con.commit()
        con.close()
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        target.mkdir()
    before = snapshot(tmp_path)
    for cmd in (["verify"], ["log"], ["prove", "--seq", "0"]):
        res = run(cmd[0], target, *cmd[1:])
        assert res.exit_code == 2, (cmd, res.stdout, res.stderr)
        one_error_line(res)
    assert snapshot(tmp_path) == before


def test_corrupted_ledger_file(setup: dict[str, Path]) -> None:
    led = setup["ledger"]
    data = bytearray(led.read_bytes())
    data[0:16] = b"not sqlite!!!!!!"
    led.write_bytes(bytes(data))
    before = snapshot(setup["dir"])
    res = run("verify", led)
    assert res.exit_code == 2 and "cannot read the database" in one_error_line(res)
    assert snapshot(setup["dir"]) == before


def test_bad_keys(setup: dict[str, Path]) -> None:
    led, keys, other, cp = setup["ledger"], setup["keys"], setup["other"], setup["cp"]
    before = snapshot(setup["dir"])
    garbage = setup["dir"] / "garbage.pem"
    garbage.write_text("hello\n")
    before = snapshot(setup["dir"])
    cases = [
        (
            ["verify", led, "--checkpoint", cp, "--pubkey", other / "ledger.pub"],
            "not signed by the given public key",
        ),
        (["verify", led, "--checkpoint", cp, "--pubkey", garbage], "garbage.pem"),
        (["verify", led, "--checkpoint", cp, "--pubkey", keys / "ledger.key"], "private key"),
        (["verify", led, "--checkpoint", cp, "--pubkey", setup["dir"] / "nope.pub"], "no such key file"),
        (["verify", led, "--checkpoint", cp], "--checkpoint needs --pubkey"),
        (["checkpoint", led, "--key", keys / "ledger.pub"], "public key"),
        (["checkpoint", led, "--key", garbage], "not a PEM file"),
    ]
    for args, fragment in cases:
        res = run(*args)
        assert res.exit_code == 2, (args, res.stdout, res.stderr)
        assert fragment in one_error_line(res), res.stderr
    assert snapshot(setup["dir"]) == before


def test_bad_checkpoints(setup: dict[str, Path]) -> None:
    led, keys, cp = setup["ledger"], setup["keys"], setup["cp"]
    d = setup["dir"]
    text = cp.read_text()
    variants = {
        "junk.txt": "this is not a checkpoint\n",
        "truncated.txt": text.split("\n\n")[0],
        "binary.txt": "\udcff",
        "badsize.txt": text.replace("\n7\n", "\n07\n", 1),
    }
    for name, body in variants.items():
        (d / name).write_bytes(body.encode("utf-8", "surrogateescape"))
    before = snapshot(d)
    for name in variants:
        res = run("verify", led, "--checkpoint", d / name, "--pubkey", keys / "ledger.pub")
        assert res.exit_code == 2, (name, res.stdout, res.stderr)
        one_error_line(res)
    res = run("verify", led, "--checkpoint", d / "missing.txt", "--pubkey", keys / "ledger.pub")
    assert res.exit_code == 2 and "no such checkpoint file" in one_error_line(res)
    assert snapshot(d) == before
    # a well-formed note whose body was edited is a verification failure, not an input error
    edited = d / "edited.txt"
    lines = text.split("\n")
    lines[1] = "6"
    edited.write_text("\n".join(lines))
    res = run("verify", led, "--checkpoint", edited, "--pubkey", keys / "ledger.pub")
    assert res.exit_code == 1 and "does not verify" in one_error_line(res)


def test_prove_out_of_range(setup: dict[str, Path]) -> None:
    res = run("prove", setup["ledger"], "--seq", "99")
    assert res.exit_code == 2 and "seq 99" in one_error_line(res)
