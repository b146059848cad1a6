"""The gradledger walk-through: a real ledger, signed, verified, tampered with, and caught.

``run_demo(out)`` is a sequence of small steps so the end-to-end demo (training, ingest, audit) can grow
around it: init a SQLite ledger, make a signing key, append entries with payloads, sign a checkpoint kept
outside the database, verify (intact), flip one byte of one payload in a COPY of the database, verify
the copy (fails, naming the first bad seq), and verify the copy against the saved checkpoint.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ledger import keys
from ledger.store import Ledger, VerifyResult

Say = Callable[[str], None]


def init_ledger(out: Path) -> Path:
    path = out / "ledger.db"
    if path.exists():
        raise FileExistsError(f"{path}: already exists; choose an empty --out directory")
    Ledger.create(path).close()
    return path


def make_key(out: Path) -> keys.KeyFiles:
    return keys.save_keypair(out / "keys", "gradledger-demo")


def append_steps(path: Path, steps: int = 24, batch: int = 32, layers: int = 4, seed: int = 0) -> list[int]:
    """Per-step entries shaped like the tracker's, each with [batch, layers] float32 payloads."""
    rng = np.random.default_rng(seed)
    names = [f"layer{i}" for i in range(layers)]
    with Ledger.open(path) as led:
        run = led.append("run", {"run": "demo", "layers": names, "seed": seed})
        items = []
        for s in range(steps):
            norms = rng.gamma(2.0, 0.5, size=(batch, layers)).astype(np.float32)
            losses = rng.random(batch, dtype=np.float32)
            if s == 5:
                losses[3] = np.nan  # NaN is legal data and round-trips through the ledger
            body = {
                "run": "demo",
                "run_seq": run,
                "step": s,
                "epoch": s // 8,
                "example_ids": [f"ex-{(s * batch + i) % 200:03d}" for i in range(batch)],
                "layers": names,
                "lr": [0.05] * layers,
            }
            items.append(("step", body, {"grad_norms": norms, "losses": losses}))
        return [run, *led.append_many(items)]


def sign(path: Path, key: keys.KeyFiles, out: Path) -> Path:
    with Ledger.open(path) as led:
        text = led.sign_checkpoint(keys.load_private_key(key.private), key.verifier_key.name)
    cp = out / "checkpoint.txt"
    cp.write_text(text, encoding="utf-8")
    return cp


def verify(path: Path, checkpoint: Path | None = None, pubkey: Path | None = None) -> VerifyResult:
    with Ledger.open(path) as led:
        cp = checkpoint.read_text(encoding="utf-8") if checkpoint else None
        return led.verify(checkpoint=cp, pubkey=keys.load_verifier(pubkey) if pubkey else None)


def tampered_copy(path: Path, out: Path, seq: int) -> Path:
    """Copy the (closed, checkpointed) database and flip one bit of one payload byte of entry ``seq``."""
    copy = out / "ledger-tampered.db"
    shutil.copyfile(path, copy)
    con = sqlite3.connect(copy)
    try:
        (data,) = con.execute(
            "SELECT data FROM payloads WHERE seq = ? AND name = 'grad_norms'", (seq,)
        ).fetchone()
        b = bytearray(data)
        b[17] ^= 0x01
        con.execute("UPDATE payloads SET data = ? WHERE seq = ? AND name = 'grad_norms'", (bytes(b), seq))
        con.commit()
    finally:
        con.close()
    return copy


def run_demo(out: Path, say: Say = print) -> dict[str, Any]:
    """Run every step into ``out``; returns a summary (paths, sizes, verification outcomes)."""
    out.mkdir(parents=True, exist_ok=True)
    path = init_ledger(out)
    say(f"1. created ledger {path}")
    key = make_key(out)
    say(f"2. signing key {key.private} (public: {key.public})")
    seqs = append_steps(path)
    say(
        f"3. appended {len(seqs)} entries (seq {seqs[0]}..{seqs[-1]}), each step with grad_norms and losses payloads"
    )
    cp = sign(path, key, out)
    say(f"4. signed checkpoint saved outside the database: {cp}")
    ok = verify(path, cp, key.public)
    say(
        f"5. verify: {'intact' if ok.ok else 'FAILED'} ({ok.size} entries, {ok.bytes_hashed:,} bytes re-hashed)"
    )
    target = seqs[len(seqs) // 2]
    bad_path = tampered_copy(path, out, target)
    bad = verify(bad_path)
    say(f"6. flipped one bit of entry {target}'s grad_norms in {bad_path.name}")
    say(f"7. verify copy: {'intact' if bad.ok else 'FAILED'} at seq {bad.first_bad_seq}: {bad.reason}")
    summary = {
        "ledger": str(path),
        "tampered_copy": str(bad_path),
        "checkpoint": str(cp),
        "private_key": str(key.private),
        "public_key": str(key.public),
        "entries": ok.size,
        "root": ok.root.hex() if ok.root else None,
        "verify_ok": ok.ok,
        "tampered_seq": target,
        "tampered_verify_ok": bad.ok,
        "tampered_first_bad_seq": bad.first_bad_seq,
        "tampered_reason": bad.reason,
    }
    say(
        "summary: the original verifies against its signed checkpoint; the one-bit edit is caught at seq "
        f"{bad.first_bad_seq}"
    )
    return summary
