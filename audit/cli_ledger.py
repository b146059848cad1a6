"""``gradledger init | keygen | checkpoint | verify | prove | log``: the ledger's own commands.

Exit codes: 0 ok / intact, 1 verification failed (the first bad seq and why), 2 usage or unreadable input
(one line on stderr; nothing is created or modified).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from audit import progress
from audit.cli import fail as _fail
from audit.cli import main
from ledger import keys, note
from ledger.errors import LedgerError, LedgerInputError
from ledger.fileio import write_atomic
from ledger.store import Ledger, VerifyResult

F = TypeVar("F", bound=Callable[..., Any])

LEDGER_HELP = "LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL."


def _input_errors(f: F) -> F:
    """Turn unusable input (LedgerInputError, unreadable files) into one line on stderr and exit 2."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return f(*args, **kwargs)
        except LedgerInputError as exc:
            _fail(str(exc))
        except note.VerificationError as exc:
            _fail(str(exc), 1)
        except LedgerError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))

    return wrapper  # type: ignore[return-value]


def _read_text(path: Path, what: str) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        _fail(f"{path}: no such {what} file")
    except IsADirectoryError:
        _fail(f"{path}: is a directory, not a {what} file")
    except OSError as exc:
        _fail(f"{path}: cannot read {what} file ({exc.strerror})")
    if len(data) > 1 << 20:
        _fail(f"{path}: {len(data)} bytes is too large for a {what}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _fail(f"{path}: {what} is not UTF-8 text")


# ---- init / keygen --------------------------------------------------------------------------------------


@main.command("init")
@click.argument("ledger")
@click.option("--origin", default=None, help="Log origin (default: gradledger.local/<random uuid>).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_input_errors
def init_cmd(ledger: str, origin: str | None, as_json: bool) -> None:
    """Create an empty ledger at LEDGER.

    The new ledger holds one entry, seq 0, of kind ``ledger`` naming its origin: a unique name that every
    signed checkpoint of this ledger repeats. Refuses (exit 2) if LEDGER already holds a ledger.

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    with Ledger.create(ledger, origin=origin) as led:
        out = {"ledger": led.location, "origin": led.origin, "size": led.size, "root": led.root().hex()}
    if as_json:
        click.echo(json.dumps(out))
    else:
        click.echo(f"created {out['ledger']}\norigin  {out['origin']}")


@main.command("keygen")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--name", default=keys.DEFAULT_KEY_NAME, show_default=True, help="Key name in signatures.")
@_input_errors
def keygen_cmd(directory: Path, name: str) -> None:
    """Make an Ed25519 signing key in DIRECTORY.

    \b
    DIRECTORY/ledger.key   PEM PKCS#8 private key, mode 0600: keep it away from the database
    DIRECTORY/ledger.pub   PEM public key, for `gradledger verify --pubkey`
    DIRECTORY/ledger.vkey  C2SP signed-note verifier key line (name+keyid+key)

    Refuses (exit 2) to overwrite existing key files.
    """
    files = keys.save_keypair(directory, name)
    click.echo(f"private key  {files.private}  (mode 0600)")
    click.echo(f"public key   {files.public}")
    click.echo(f"verifier key {files.verifier}")
    click.echo(files.verifier_key.line)


def _key_name_for(key_path: Path, explicit: str | None) -> str:
    if explicit:
        return keys.check_key_name(explicit)
    vkey = key_path.with_name(keys.VERIFIER_KEY_FILE)
    if vkey.is_file():
        try:
            return keys.parse_verifier_key(vkey.read_text(encoding="utf-8").strip(), source=str(vkey)).name
        except (LedgerInputError, OSError, UnicodeDecodeError):
            pass
    return keys.DEFAULT_KEY_NAME


# ---- checkpoint ---------------------------------------------------------------------------------------------


@main.command("checkpoint")
@click.argument("ledger")
@click.option(
    "--key", "key_path", required=True, type=click.Path(path_type=Path), help="Private key file (ledger.key)."
)
@click.option(
    "--name",
    default=None,
    help="Key name (default: the name in ledger.vkey beside the key, else 'gradledger').",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the note here.",
)
@_input_errors
def checkpoint_cmd(ledger: str, key_path: Path, name: str | None, output: Path | None) -> None:
    """Sign the ledger's current tree head and store the note in the ledger.

    Runs a full verify first and refuses (exit 1) to sign a ledger that fails it, or whose tree is not an
    extension of every checkpoint signed before (RFC 9162 consistency proofs). Prints the C2SP checkpoint
    in a C2SP signed note; keep a copy OUTSIDE the database (-o FILE): it is what later exposes truncation,
    rollback, forks and replaced ledgers.

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    private_key = keys.load_private_key(key_path)
    key_name = _key_name_for(key_path, name)
    with Ledger.open(ledger) as led:
        res = led.verify()
        if not res.ok:
            _fail(f"refusing to sign: verification failed at seq {res.first_bad_seq}: {res.reason}", 1)
        try:
            text = led.sign_checkpoint(private_key, key_name)
        except LedgerError as exc:
            if isinstance(exc, LedgerInputError):
                raise
            _fail(f"refusing to sign: {exc}", 1)
    if output is not None:
        write_atomic(output, text)
    click.echo(text, nl=False)


# ---- verify -----------------------------------------------------------------------------------------------


def _load_pubkey(path: Path) -> Any:
    return keys.load_verifier(path)


def _check_signed_by(note_text: str, pubkey: Any, where: Path) -> None:
    """Exit 2 when the checkpoint carries no signature line for this key at all (wrong key)."""
    parsed = note.parse_note(note_text)
    pub = pubkey.public_key if isinstance(pubkey, keys.VerifierKey) else pubkey
    if not any(sig.key_id == keys.key_id(sig.name, pub) for sig in parsed.signatures):
        names = ", ".join(sorted({s.name for s in parsed.signatures})) or "nobody"
        _fail(f"{where}: not signed by the given public key (signed by: {names})")


@main.command("verify")
@click.argument("ledger")
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(path_type=Path),
    default=None,
    help="A signed checkpoint note kept outside the database.",
)
@click.option(
    "--pubkey",
    "pubkey_path",
    type=click.Path(path_type=Path),
    default=None,
    help="The signer's public key (ledger.pub or ledger.vkey).",
)
@click.option(
    "--deep", is_flag=True, help="Also check bodies are canonical and rebuild every indexer's tables."
)
@click.option(
    "--archive",
    "archive_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Directory of archived segment files (default: where `gradledger archive` wrote them).",
)
@click.option(
    "--allow-archived",
    is_flag=True,
    help="Exit 0 even when archived payloads could not be re-hashed (segments not found).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_input_errors
def verify_cmd(
    ledger: str,
    checkpoint_path: Path | None,
    pubkey_path: Path | None,
    deep: bool,
    archive_dir: Path | None,
    allow_archived: bool,
    as_json: bool,
) -> None:
    """Check that LEDGER is intact; exit 0 if so, 1 with the first bad seq and why.

    Re-hashes every stored byte: each payload against its sha256, each entry's leaf data rebuilt from its
    columns against its leaf hash, the prev-hash chain, seq contiguity, every stored Merkle subtree, and
    the checkpoints stored in the ledger. With --checkpoint and --pubkey, also the note's signature and
    that the ledger extends the signed tree (catches truncation, rollback, forks and a ledger replaced by
    another with the same origin). With --pubkey alone, stored checkpoints signed by that key become
    trusted anchors. The database is never modified.

    Archived payloads (`gradledger archive`) are re-hashed from their segment files. When segments are
    missing, everything else is still checked and the count of payloads not re-hashed is reported; that
    exits 1 unless --allow-archived.

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    if checkpoint_path is not None and pubkey_path is None:
        _fail("--checkpoint needs --pubkey (the key that signed it)")
    pubkey = _load_pubkey(pubkey_path) if pubkey_path is not None else None
    cp_text = None
    if checkpoint_path is not None:
        cp_text = _read_text(checkpoint_path, "checkpoint")
        note.parse_checkpoint_note(cp_text)  # malformed -> exit 2 before touching the ledger
        _check_signed_by(cp_text, pubkey, checkpoint_path)
    with (
        Ledger.open(ledger, archive_dir=archive_dir) as led,
        progress.activity("verifying", show=progress.wanted(as_json)),
    ):
        res = led.verify(checkpoint=cp_text, pubkey=pubkey, deep=deep)
    _report(res, as_json)
    sys.exit(0 if res.complete or (res.ok and allow_archived) else 1)


def _report(res: VerifyResult, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(res.to_json()))
        return
    if res.ok:
        cp = (
            f", consistent with the signed checkpoint of size {res.checkpoint['size']}"
            if res.checkpoint
            else ""
        )
        click.echo(
            f"{'ok' if res.complete else 'INCOMPLETE'}: {res.size} entries, {res.payloads_checked} payloads, {res.bytes_hashed:,} bytes re-hashed, "
            f"{res.tree_nodes_checked} subtree hashes, {res.checkpoints_checked} stored checkpoints{cp}"
        )
        click.echo(f"root {res.root.hex() if res.root else ''}")
        if res.indexers_checked:
            click.echo(f"indexers rebuilt and equal: {', '.join(res.indexers_checked)}")
        if res.archive is not None:
            a = res.archive
            click.echo(
                f"archived: {a['payloads']} payloads of {a['entries']} entries in {a['archives']} archive(s), "
                f"{a['rehashed']} re-hashed from their segments"
            )
            if not res.complete:
                click.echo(
                    f"{a['payloads'] - a['rehashed']} archived payloads NOT re-hashed: segment(s) "
                    f"{', '.join(a['missing_segments'])} not found in {'; '.join(a['looked_in'])} "
                    "(give --archive DIR; their digests in the ledger were checked)"
                )
    else:
        where = f"seq {res.first_bad_seq}" if res.first_bad_seq is not None else "ledger"
        click.echo(f"FAILED at {where}: {res.reason}")


# ---- prove / log ------------------------------------------------------------------------------------------------


@main.command("prove")
@click.argument("ledger")
@click.option("--seq", type=click.IntRange(min=0), default=None, help="The entry to prove.")
@click.option(
    "--size",
    type=click.IntRange(min=1),
    default=None,
    help="Tree size to prove against (default: all entries).",
)
@click.option("--label", "label_id", default=None, help="Prove a label's annotation entry (C2SP tlog-proof).")
@click.option(
    "--checkpoint", "checkpoint_path", type=click.Path(path_type=Path), default=None,
    help="With --label: the signed checkpoint note to prove against (default: the latest stored one).",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the proof as JSON.")
@_input_errors
def prove_cmd(
    ledger: str,
    seq: int | None,
    size: int | None,
    label_id: str | None,
    checkpoint_path: Path | None,
    as_json: bool,
) -> None:
    """Print an RFC 9162 inclusion proof that entry SEQ (or a label's record) is in the tree.

    The proof (sibling hashes, bottom-up) leads from the entry's leaf hash to the root of the tree of SIZE
    entries; check it against a signed checkpoint of that size. The proof is verified before printing.

    With --label ID: a C2SP tlog-proof (c2sp.org/tlog-proof@v1) that the label's latest annotation entry is
    in the signed ledger, with the signed checkpoint note and, on its `extra` line, the entry's leaf data;
    verifiable offline with the checkpoint key (audit.export.verify_label_proof).

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    if (seq is None) == (label_id is None):
        _fail("give exactly one of --seq or --label")
    if label_id is not None:
        from audit.export import prove_label

        cp_text = None if checkpoint_path is None else _read_text(checkpoint_path, "checkpoint")
        with Ledger.open(ledger) as led:
            click.echo(prove_label(led, label_id, cp_text), nl=False)
        return
    assert seq is not None
    with Ledger.open(ledger) as led:
        proof = led.prove(seq, size)
        origin = led.origin
    if not proof.verify():  # pragma: no cover - would mean corrupted stored state; verify explains
        _fail(f"the stored tree does not prove seq {seq}; run `gradledger verify`", 1)
    out = {"origin": origin, **proof.to_json()}
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"origin    {origin}\nseq       {proof.seq}\ntree size {proof.size}")
    click.echo(f"leaf hash {proof.leaf_hash.hex()}\nroot      {proof.root.hex()}")
    for i, h in enumerate(proof.hashes):
        click.echo(f"proof[{i}]  {h.hex()}")


@main.command("log")
@click.argument("ledger")
@click.option("--kind", "kinds", multiple=True, help="Only entries of this kind (repeatable).")
@click.option("--start", type=click.IntRange(min=0), default=0, show_default=True, help="First seq.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line (JSON Lines), with bodies.")
@_input_errors
def log_cmd(ledger: str, kinds: tuple[str, ...], start: int, limit: int | None, as_json: bool) -> None:
    """List entries: seq, kind, version, timestamp, leaf hash and a short body.

    Streams in seq order without loading the ledger into memory. Payloads are listed by name, dtype and
    shape (their bytes are not printed).

    \b
    LEDGER is a SQLite file path, a sqlite:/// URL or a postgresql+psycopg:// URL.
    """
    with Ledger.open(ledger) as led:
        for count, e in enumerate(led.entries(kind=set(kinds) or None, start=start, payloads=True)):
            if limit is not None and count >= limit:
                break
            if as_json:
                out = e.to_json(with_body=False)
                out["body"] = json.loads(e.body_bytes)  # canonical form: NaN/Inf stay {"$float": ...}
                click.echo(json.dumps(out))
                continue
            body = e.body_bytes.decode("utf-8", "replace")
            if len(body) > 96:
                body = body[:93] + "..."
            pls = " ".join(f"{n}:{d['dtype']}{d['shape']}" for n, d in e.descriptors.items())
            click.echo(
                f"{e.seq:>8}  {e.kind:<12} v{e.v}  {e.ts}  {e.leaf_hash.hex()[:16]}  {body}"
                + (f"  [{pls}]" if pls else "")
            )
