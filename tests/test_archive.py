"""Archival (ledger/archive.py, ``gradledger archive``): payload bytes move to segment files, the tree stays.

Oracles: the root, proofs and payload arrays captured BEFORE archiving (the archive must not change any of them);
``hashlib.sha256`` of the bytes in the segment files; a byte flipped by hand inside one zip member.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select

from audit import aggregates, query  # noqa: F401  (registers the query_aggregates indexer)
from ledger import keys, merkle, schema
from ledger.archive import (
    SEGMENT_SUFFIX,
    ArchivedPayloadError,
    ArchiveError,
    ArchiveInputError,
    archive_run,
    member_name,
)
from ledger.records import STEP_VERSION, encode_weights
from ledger.store import Ledger
from tests.test_cli_ledger import one_error_line
from tests.test_cli_ledger import run as run_cli

LAYERS = ["fc1", "fc2", "fc3"]
B = 8


def _run_body(run: str) -> dict[str, Any]:
    return {
        "run": run,
        "architecture": {"layers": [{"name": n, "type": "torch.nn.Linear", "params": {}} for n in LAYERS]},
        "optimizer": {"class": "torch.optim.SGD", "param_groups": []},
        "seed": 0,
        "loss_reduction": "mean",
        "policy_seq": None,
        "manifest_seq": None,
    }


def _step(run: str, run_seq: int, k: int, rng: np.random.Generator) -> tuple[Any, ...]:
    """A tracker-shaped step entry (v 2) with two routing rows, so weight_index is a payload too."""
    w = np.ones((B, len(LAYERS)), np.float32)
    w[: B // 2, 0] = 0.0
    rows, index = encode_weights(w)
    body = {
        "run": run, "run_seq": run_seq, "step": k, "epoch": k // 10,
        "example_ids": [f"ex-{int(i)}" for i in rng.choice(40, B, replace=False)], "layers": LAYERS,
        "micro_batches": [B], "lr": [0.1] * len(LAYERS), "update_norms": None, "policy_seq": None,
        "flags": {}, "weight_rows": rows,
    }  # fmt: skip
    payloads = {
        "grad_norms": rng.gamma(2.0, 0.5, size=(B, len(LAYERS))).astype(np.float32),
        "losses": rng.random(B, dtype=np.float32),
        "weight_index": index,
    }
    return ("step", body, payloads, STEP_VERSION)


def make_ledger(target: str | Path, steps: int = 30) -> Ledger:
    """Runs "exp" and "other", steps interleaved; a few entries of other kinds in between."""
    led = Ledger.open(target, create=True)
    rng = np.random.default_rng(7)
    exp = led.append("run", _run_body("exp"))
    other = led.append("run", _run_body("other"))
    for k in range(steps):
        led.append_many([_step("exp", exp, k, rng), _step("other", other, k, rng)])
        if k % 7 == 3:
            led.append("note", {"k": k}, {"blob": rng.random(5)})
    return led


def step_seqs(led: Ledger, run: str) -> list[int]:
    return [e.seq for e in led.entries("step", payloads=False) if e.body["run"] == run]


def payload_snapshot(led: Ledger) -> dict[int, dict[str, bytes]]:
    return {e.seq: {n: e.payload_bytes(n) for n in e.descriptors} for e in led.entries()}


def segments(d: Path) -> list[Path]:
    return sorted(d.glob("*" + SEGMENT_SUFFIX))


def emptied_rows(led: Ledger) -> int:
    p = schema.payloads
    with led.engine.connect() as conn:
        return int(conn.execute(select(func.count()).where(func.length(p.c.data) == 0)).scalar_one())


def flip_member_byte(seg: Path, member: str) -> None:
    """Flip one byte in the middle of a zip member's compressed data (its local header left alone)."""
    import backports.zstd.zipfile as zipfile

    with zipfile.ZipFile(seg) as zf:
        info = zf.getinfo(member)
    raw = bytearray(seg.read_bytes())
    off = info.header_offset
    name_len = int.from_bytes(raw[off + 26 : off + 28], "little")
    extra_len = int.from_bytes(raw[off + 28 : off + 30], "little")
    start = off + 30 + name_len + extra_len
    raw[start + info.compress_size // 2] ^= 0x01
    seg.write_bytes(bytes(raw))


# ---- archive, verify, read ------------------------------------------------------------------------------


def test_archive_keeps_tree_and_verify_rehashes_segments(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    key = keys.generate_private_key()
    led.sign_checkpoint(key, "test")
    note_text = led.checkpoints()[-1].note
    n0, root0 = led.size, led.root()
    before = payload_snapshot(led)
    exp = step_seqs(led, "exp")
    cut = exp[20]  # archive exp's first 20 steps
    proof0 = led.prove(exp[3])
    layer0 = query.layer(led, "exp", "fc1", top=50).to_json()

    res = archive_run(led, "exp", cut, tmp_path / "arch", segment_bytes=600)
    assert res.entries == 20 and res.archive_seq == n0
    assert len(res.segments) > 2  # several segments: lookup across files
    assert res.root == root0.hex() and res.size_before == n0
    # the tree of the first n0 entries did not move: root, inclusion and consistency proofs, the signed note
    assert led.root(n0) == root0
    assert led.prove(exp[3], n0) == proof0
    cons = led.consistency_proof(n0)
    assert merkle.verify_consistency(n0, led.size, cons, root0, led.root())
    # exactly the archived payload rows were emptied; the other run's are intact
    assert emptied_rows(led) == sum(len(before[s]) for s in exp[:20])
    # every segment member is the exact stored bytes (sha256 against the copy taken before)
    import backports.zstd.zipfile as zipfile

    members = 0
    for seg in segments(tmp_path / "arch"):
        with zipfile.ZipFile(seg) as zf:
            for name in zf.namelist():
                if name == "segment.json":
                    continue
                seq, pname = int(name.split("/")[0]), name.split("/")[1]
                assert zf.read(name) == before[seq][pname]
                members += 1
    assert members == res.payloads == sum(len(before[s]) for s in exp[:20])
    # the archive entry records every segment's file digest
    body = led.entry(res.archive_seq).body
    assert [s["sha256"] for s in body["segments"]] == [
        hashlib.sha256((tmp_path / "arch" / s["file"]).read_bytes()).hexdigest() for s in body["segments"]
    ]
    assert json.loads((Path(res.manifest or "")).read_bytes()) == body

    v = led.verify(checkpoint=note_text, pubkey=key.public_key(), deep=True)
    assert v.ok and v.complete, v.reason
    assert v.archive is not None and v.archive["payloads"] == v.archive["rehashed"] == res.payloads
    assert v.archive["entries"] == 20 and v.archive["missing_segments"] == []
    assert "query_aggregates" in v.indexers_checked
    # readers read through the segments: every payload byte-identical to before
    after = payload_snapshot(led)
    assert all(after[s] == before[s] for s in before)
    recs = list(led.steps("exp"))
    assert len(recs) == 30 and np.array_equal(
        recs[0].grad_norms, np.frombuffer(before[exp[0]]["grad_norms"], "<f4").reshape(B, 3)
    )
    # the aggregates are unaffected
    assert query.layer(led, "exp", "fc1", top=50).to_json() == layer0
    led.close()

    # a second archive of the same run takes the next entries only; verify covers both
    led = Ledger.open(tmp_path / "l.db")
    res2 = archive_run(led, "exp", led.size, tmp_path / "arch2")
    assert res2.entries == 10 and res2.segments[0]["first_seq"] == exp[20]
    v = led.verify()
    assert v.complete and v.archive is not None and v.archive["archives"] == 2 and v.archive["entries"] == 30
    assert archive_run(led, "exp", led.size, tmp_path / "arch3").archive_seq is None  # nothing left
    led.close()


def test_segments_found_in_explicit_dir_after_moving(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    res = archive_run(led, "exp", led.size, tmp_path / "arch")
    led.close()
    shutil.move(tmp_path / "arch", tmp_path / "cold")
    with Ledger.open(tmp_path / "l.db", archive_dir=tmp_path / "cold") as led:
        v = led.verify()
        assert v.complete and v.archive is not None and v.archive["rehashed"] == res.payloads
        assert len(list(led.steps("exp"))) == 30
    out = run_cli("verify", tmp_path / "l.db", "--archive", tmp_path / "cold")
    assert out.exit_code == 0 and f"{res.payloads} re-hashed" in out.stdout


def test_flipped_byte_in_segment_names_the_exact_entry(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    exp = step_seqs(led, "exp")
    res = archive_run(led, "exp", led.size, tmp_path / "arch", segment_bytes=2000)
    target = exp[13]
    seg = next(
        tmp_path / "arch" / s["file"] for s in res.segments if s["first_seq"] <= target <= s["last_seq"]
    )
    flip_member_byte(seg, member_name(target, "grad_norms"))
    v = led.verify()
    assert not v.ok and v.first_bad_seq == target, v.reason
    assert f"entry {target}" in (v.reason or "") and seg.name in (v.reason or "")
    out = run_cli("verify", tmp_path / "l.db")
    assert out.exit_code == 1 and f"FAILED at seq {target}" in out.stdout
    # reading it gives a clear error instead of wrong numbers
    with pytest.raises(ArchivedPayloadError, match=f"entry {target}"):
        led.entry(target).payloads  # noqa: B018
    led.close()


def test_changed_segment_outside_payloads_fails_at_the_archive_entry(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    res = archive_run(led, "exp", led.size, tmp_path / "arch")
    seg = tmp_path / "arch" / res.segments[0]["file"]
    flip_member_byte(seg, "segment.json")
    v = led.verify()
    assert not v.ok and v.first_bad_seq == res.archive_seq
    assert seg.name in (v.reason or "") and "does not hash" in (v.reason or "")
    led.close()


def test_missing_segment_is_reported_not_passed(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    exp = step_seqs(led, "exp")
    res = archive_run(led, "exp", led.size, tmp_path / "arch", segment_bytes=2000)
    gone = res.segments[1]
    (tmp_path / "arch" / gone["file"]).unlink()
    v = led.verify()
    assert v.ok and not v.complete  # nothing is wrong; not everything could be re-hashed
    assert v.archive is not None and v.archive["missing_segments"] == [gone["file"]]
    assert v.archive["payloads"] - v.archive["rehashed"] == gone["payloads"]
    out = run_cli("verify", tmp_path / "l.db")
    assert out.exit_code == 1
    assert "INCOMPLETE" in out.stdout and gone["file"] in out.stdout and str(tmp_path / "arch") in out.stdout
    assert run_cli("verify", tmp_path / "l.db", "--allow-archived").exit_code == 0
    js = json.loads(run_cli("verify", tmp_path / "l.db", "--json").stdout)
    assert (
        js["ok"] is True and js["complete"] is False and js["archive"]["missing_segments"] == [gone["file"]]
    )
    # a reader of an entry in the missing segment: descriptors list, bytes raise naming the segment
    inside = next(s for s in exp if gone["first_seq"] <= s <= gone["last_seq"])
    e = led.entry(inside)
    assert e.descriptors["grad_norms"]["size"] == B * 3 * 4
    with pytest.raises(ArchivedPayloadError, match=gone["file"]):
        e.payloads  # noqa: B018
    with pytest.raises(ArchivedPayloadError, match="archive entry"):
        list(led.steps("exp"))
    assert len(list(led.steps("other"))) == 30  # other runs read as before
    assert run_cli("log", tmp_path / "l.db").exit_code == 0  # descriptors still list
    led.close()


def test_emptied_payload_without_an_archive_entry_is_caught(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    archive_run(led, "exp", led.size, tmp_path / "arch")
    victim = step_seqs(led, "other")[4]
    p = schema.payloads
    with led.engine.begin() as conn:
        conn.execute(p.update().where(p.c.seq == victim, p.c.name == "losses").values(data=b""))
    v = led.verify()
    assert not v.ok and v.first_bad_seq == victim and "no archive entry holds" in (v.reason or "")
    led.close()


def test_vacuum_returns_space(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db", steps=300)
    root = led.root()
    res = archive_run(led, "exp", led.size, tmp_path / "arch", vacuum=True)
    assert res.vacuumed and res.db_bytes_before and res.db_bytes_after
    assert res.db_bytes_after < res.db_bytes_before
    assert led.root(res.size_before) == root and led.verify().complete
    led.close()


# ---- atomicity ----------------------------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


@pytest.mark.parametrize(
    "point", ["verified", "segment-written", "manifest-written", "entry-appended", "payloads-emptied"]
)
def test_a_failure_at_any_step_leaves_the_ledger_unchanged(tmp_path: Path, point: str) -> None:
    led = make_ledger(tmp_path / "l.db")
    n0, root0 = led.size, led.root()
    before = payload_snapshot(led)

    def fault(step: str) -> None:
        if step == point:
            raise Boom(step)

    with pytest.raises(Boom):
        archive_run(led, "exp", led.size, tmp_path / "arch", segment_bytes=2000, fault=fault)
    assert led.size == n0 and led.root() == root0 and emptied_rows(led) == 0
    assert payload_snapshot(led) == before
    v = led.verify()
    assert v.complete and v.archive is None
    orphans = (
        {p.name: p.read_bytes() for p in segments(tmp_path / "arch")} if (tmp_path / "arch").exists() else {}
    )
    # a re-run succeeds; segment files left by the failed run are rewritten byte-identically, under the same names
    res = archive_run(led, "exp", led.size, tmp_path / "arch", segment_bytes=2000)
    assert res.archive_seq == n0
    for name, data in orphans.items():
        assert (tmp_path / "arch" / name).read_bytes() == data
    assert led.verify().complete
    led.close()


def test_failure_after_commit_leaves_a_complete_archive(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")

    def fault(step: str) -> None:
        if step == "committed":
            raise Boom(step)

    with pytest.raises(Boom):
        archive_run(led, "exp", led.size, tmp_path / "arch", fault=fault)
    v = led.verify()
    assert v.complete and v.archive is not None and v.archive["entries"] == 30
    led.close()


def _crashing_archive(path: str, out: str) -> None:
    led = Ledger.open(path)

    def die(step: str) -> None:
        if step == "payloads-emptied":  # inside the transaction, rows already emptied
            os._exit(3)

    archive_run(led, "exp", led.size, out, fault=die)


def test_process_killed_inside_the_transaction_leaves_the_ledger_unchanged(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    n0, root0 = led.size, led.root()
    led.close()
    proc = mp.get_context("fork").Process(
        target=_crashing_archive, args=(str(tmp_path / "l.db"), str(tmp_path / "a"))
    )
    proc.start()
    proc.join(60)
    assert proc.exitcode == 3
    with Ledger.open(tmp_path / "l.db") as led:
        assert led.size == n0 and led.root() == root0 and emptied_rows(led) == 0
        assert led.verify().complete


def test_rows_changed_while_writing_segments_refuses(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    n0 = led.size
    victim = step_seqs(led, "exp")[2]

    def tamper(step: str) -> None:
        if step == "manifest-written":
            p = schema.payloads
            with led.engine.begin() as conn:
                conn.execute(
                    p.update().where(p.c.seq == victim, p.c.name == "losses").values(sha256=b"\0" * 32)
                )

    with pytest.raises(ArchiveError, match=f"entry {victim}"):
        archive_run(led, "exp", led.size, tmp_path / "arch", fault=tamper)
    assert led.size == n0 and emptied_rows(led) == 0
    led.close()


def test_refuses_a_ledger_that_does_not_verify(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    victim = step_seqs(led, "exp")[1]
    p = schema.payloads
    with led.engine.begin() as conn:
        conn.execute(p.update().where(p.c.seq == victim, p.c.name == "losses").values(data=b"\1" * (B * 4)))
    with pytest.raises(ArchiveError, match=f"seq {victim}"):
        archive_run(led, "exp", led.size, tmp_path / "arch")
    assert not (tmp_path / "arch").exists()
    out = run_cli("archive", tmp_path / "l.db", "--run", "exp", "--before-seq", 5, "-o", tmp_path / "arch")
    assert out.exit_code == 1 and f"verification failed at seq {victim}" in one_error_line(out)
    led.close()


# ---- PostgreSQL ---------------------------------------------------------------------------------------------


@pytest.mark.postgres
def test_archive_on_postgres(tmp_path: Path, pg_url: str) -> None:
    led = make_ledger(pg_url)
    n0, root0 = led.size, led.root()
    before = payload_snapshot(led)
    exp = step_seqs(led, "exp")
    res = archive_run(led, "exp", exp[25], tmp_path / "arch", segment_bytes=2000, vacuum=True)
    assert res.entries == 25 and res.vacuumed and res.db_bytes_after is not None
    assert led.root(n0) == root0
    v = led.verify(deep=True)
    assert v.complete and v.archive is not None and v.archive["rehashed"] == res.payloads, v.reason
    after = payload_snapshot(led)
    assert all(after[s] == before[s] for s in before)
    # flipped byte -> exact entry; missing segment -> reported
    target = exp[7]
    seg = next(
        tmp_path / "arch" / s["file"] for s in res.segments if s["first_seq"] <= target <= s["last_seq"]
    )
    saved = seg.read_bytes()
    flip_member_byte(seg, member_name(target, "losses"))
    v = led.verify()
    assert not v.ok and v.first_bad_seq == target
    seg.unlink()
    v = led.verify()
    assert v.ok and not v.complete and v.archive is not None and v.archive["missing_segments"] == [seg.name]
    seg.write_bytes(saved)
    assert led.verify().complete
    led.close()


@pytest.mark.postgres
def test_archive_on_postgres_is_atomic(tmp_path: Path, pg_url: str) -> None:
    led = make_ledger(pg_url, steps=10)
    n0, root0 = led.size, led.root()

    def fault(step: str) -> None:
        if step == "payloads-emptied":
            raise Boom(step)

    with pytest.raises(Boom):
        archive_run(led, "exp", led.size, tmp_path / "arch", fault=fault)
    assert led.size == n0 and led.root() == root0 and emptied_rows(led) == 0
    assert led.verify().complete
    led.close()


# ---- CLI ----------------------------------------------------------------------------------------------------


def test_cli_archive_and_verify(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db")
    n0, root0 = led.size, led.root().hex()
    led.close()
    out = run_cli(
        "archive", tmp_path / "l.db", "--run", "exp", "--before-seq", n0, "-o", tmp_path / "arch", "--json"
    )
    assert out.exit_code == 0, out.stderr
    js = json.loads(out.stdout)
    assert js["entries"] == 30 and js["root"] == root0 and js["archive_seq"] == n0
    assert js["db_bytes_before"] and js["db_bytes_after"] is not None and js["free_bytes_after"] is not None
    text = run_cli(
        "archive",
        tmp_path / "l.db",
        "--run",
        "other",
        "--before-seq",
        n0,
        "-o",
        tmp_path / "arch",
        "--vacuum",
    )
    assert text.exit_code == 0 and "archived 30 step entries of run 'other'" in text.stdout
    assert "unchanged" in text.stdout and "vacuumed" in text.stdout
    again = run_cli("archive", tmp_path / "l.db", "--run", "exp", "--before-seq", n0, "-o", tmp_path / "arch")
    assert again.exit_code == 0 and "nothing to archive" in again.stdout
    v = run_cli("verify", tmp_path / "l.db", "--json")
    assert v.exit_code == 0 and json.loads(v.stdout)["complete"] is True


def test_cli_archive_bad_input(tmp_path: Path) -> None:
    led = make_ledger(tmp_path / "l.db", steps=3)
    n = led.size
    led.close()
    a = ("archive", tmp_path / "l.db")
    cases = [
        ((*a, "--run", "nope", "--before-seq", n, "-o", tmp_path / "o"), "no run named 'nope'"),
        ((*a, "--run", "exp", "--before-seq", n + 5, "-o", tmp_path / "o"), f"not in [1, {n}]"),
        (
            ("archive", tmp_path / "missing.db", "--run", "exp", "--before-seq", 2, "-o", tmp_path / "o"),
            "no such ledger",
        ),
    ]
    for args, msg in cases:
        out = run_cli(*args)
        assert out.exit_code == 2, (args, out.stdout, out.stderr)
        assert msg in one_error_line(out)
    # usage errors click finds (missing / out-of-range options, -o naming a file): exit 2, click's usage text
    (tmp_path / "afile").write_text("x")
    usage = [
        (*a, "--before-seq", n, "-o", tmp_path / "o"),
        (*a, "--run", "exp", "-o", tmp_path / "o"),
        (*a, "--run", "exp", "--before-seq", 0, "-o", tmp_path / "o"),
        (*a, "--run", "exp", "--before-seq", n),
        (*a, "--run", "exp", "--before-seq", n, "-o", tmp_path / "afile"),
    ]
    for args in usage:
        out = run_cli(*args)
        assert out.exit_code == 2 and "Error:" in out.stderr, args
    assert not (tmp_path / "o").exists()
    with Ledger.open(tmp_path / "l.db") as led:
        assert led.size == n and led.verify().archive is None
    with pytest.raises(ArchiveInputError, match="zstd level"):
        archive_run(Ledger.open(tmp_path / "l.db"), "exp", n, tmp_path / "o", level=0)


def test_archive_bench_quick() -> None:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "archive_bench.py"
    spec = importlib.util.spec_from_file_location("archive_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--quick", "--json"])["sqlite"]
    a = out["archive"]
    # which payloads a step carries besides grad_norms depends on the step encoding (scale.py's generator)
    assert a["entries"] == 256 and 256 <= a["payloads"] <= 5 * 256
    b = out["bytes"]
    assert 256 * 64 * 16 * 4 <= b["raw_payloads"] <= 256 * 64 * (16 * 4 + 4 + 4 + 1 + 1)
    assert b["db_after_vacuum"] < b["db_before"] and b["segments"] > 0
    assert out["verify_with_segments"]["MB_rehashed"] > b["raw_payloads"] / 1e6
    assert out["verify_without_segments"]["payloads_not_rehashed"] == a["payloads"]
