"""8 processes append to one PostgreSQL ledger at once: training-like step writers (the tracker's background
StepWriter, [64, 16] payloads), ingest-like writers (40-entry batches in one transaction) and checkpoint signers.
No fork, no gap, every entry present exactly once with its bytes, every batch contiguous, and every signed
checkpoint consistent with the final tree."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from instrument.tracker import StepWriter
from ledger import Ledger, keys, merkle
from ledger.note import verify_checkpoint

STEP_WRITERS, STEPS = 3, 60
INGEST_WRITERS, BATCHES, BATCH = 3, 8, 40
SIGNERS, SIGNATURES = 2, 12

pytestmark = pytest.mark.postgres


def _norms(writer: int, i: int) -> np.ndarray:
    return np.random.default_rng([writer, i]).random((64, 16), dtype=np.float32)


def step_writer(url: str, w: int, start: Any) -> None:
    led = Ledger.open(url)
    out = StepWriter(led, max_pending=4)  # the tracker's writer: several waiting steps per transaction
    start.wait()
    for i in range(STEPS):
        body = {"run": f"train-{w}", "step": i, "example_ids": [f"{w}-{i}-{k}" for k in range(64)]}
        out.submit("step", body, {"grad_norms": _norms(w, i), "weights": np.ones((64, 16), np.float32)})
    out.close()
    led.close()


def ingest_writer(url: str, w: int, start: Any) -> None:
    led = Ledger.open(url)
    start.wait()
    for b in range(BATCHES):
        led.append_many([("annotation", {"writer": w, "batch": b, "i": i}) for i in range(BATCH)])
    led.close()


def signer(url: str, key_path: str, name: str, out_path: str, start: Any) -> None:
    led = Ledger.open(url)
    key = keys.load_private_key(key_path)
    start.wait()
    notes = [led.sign_checkpoint(key, name) for _ in range(SIGNATURES)]
    Path(out_path).write_text("\x00".join(notes), encoding="utf-8")
    led.close()


def test_eight_writers_and_signers_on_postgres(pg_url: str, tmp_path: Path) -> None:
    kf = keys.save_keypair(tmp_path / "keys", "pg-signer")
    Ledger.open(pg_url, create=True).close()
    ctx = mp.get_context("fork")
    start = ctx.Event()
    procs = [ctx.Process(target=step_writer, args=(pg_url, w, start)) for w in range(STEP_WRITERS)]
    procs += [ctx.Process(target=ingest_writer, args=(pg_url, w, start)) for w in range(INGEST_WRITERS)]
    note_files = [tmp_path / f"notes-{s}.txt" for s in range(SIGNERS)]
    procs += [
        ctx.Process(target=signer, args=(pg_url, str(kf.private), "pg-signer", str(f), start))
        for f in note_files
    ]
    assert len(procs) == 8
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0, f"writer exited with {p.exitcode}"

    expected = 1 + STEP_WRITERS * STEPS + INGEST_WRITERS * BATCHES * BATCH
    verifier = keys.load_verifier(kf.public)
    with Ledger.open(pg_url) as led:
        res = led.verify()
        assert res.ok, res.reason
        n = led.size
        assert n == expected
        entries = list(led.entries())
        assert [e.seq for e in entries] == list(range(n))  # no gap, no duplicate seq
        # steps: each writer's steps once each, in its order, with their exact payload bytes
        steps: dict[str, list[int]] = {}
        for e in entries:
            if e.kind == "step":
                w = int(e.body["run"].split("-")[1])
                steps.setdefault(e.body["run"], []).append(e.body["step"])
                np.testing.assert_array_equal(e.payloads["grad_norms"], _norms(w, e.body["step"]))
        assert steps == {f"train-{w}": list(range(STEPS)) for w in range(STEP_WRITERS)}
        # ingest batches: all present, each one transaction = one contiguous run of seqs, in batch order
        batches: dict[tuple[int, int], list[int]] = {}
        for e in entries:
            if e.kind == "annotation":
                batches.setdefault((e.body["writer"], e.body["batch"]), []).append(e.seq)
        assert set(batches) == {(w, b) for w in range(INGEST_WRITERS) for b in range(BATCHES)}
        for seqs in batches.values():
            assert seqs == list(range(seqs[0], seqs[0] + BATCH))
        # the writers really interleaved
        kinds = [e.kind for e in entries[1:]]
        assert sum(1 for a, b in zip(kinds, kinds[1:], strict=False) if a != b) > 4

        # every signed checkpoint: a valid signature, stored, and consistent with the final tree
        signed = [t for f in note_files for t in f.read_text(encoding="utf-8").split("\x00")]
        assert len(signed) == SIGNERS * SIGNATURES
        stored = led.checkpoints()
        assert sorted(c.note for c in stored) == sorted(signed)
        sizes = [c.size for c in stored]
        assert sizes == sorted(sizes)  # signed under the sequencer: never a smaller tree after a larger one
        final_root = led.root()
        for text in signed:
            cp = verify_checkpoint(text, verifier, origin=led.origin)
            assert 0 < cp.size <= n
            assert led.root(cp.size) == cp.root
            if cp.size < n:
                proof = led.consistency_proof(cp.size, n)
                assert merkle.verify_consistency(cp.size, n, proof, cp.root, final_root)
        assert len(set(sizes)) > 1, "the signers should have signed trees of several sizes"
        last = max(signed, key=lambda t: verify_checkpoint(t, verifier).size)
        assert led.verify(checkpoint=last, pubkey=verifier).ok
