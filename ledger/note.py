"""C2SP signed notes, tlog checkpoints and tlog proofs (Ed25519).

Formats, from the C2SP specs (c2sp.org/signed-note, c2sp.org/tlog-checkpoint, c2sp.org/tlog-proof):

* **signed note**: UTF-8 note text ending in ``\\n``, a blank line, then one or more lines
  ``— <key name> <base64(4-byte key ID || signature)>`` (em dash U+2014). No control characters other than
  newline. The text is separated from the signatures by the *last* blank line.
* **checkpoint** (the note text): origin line, tree size in ASCII decimal without leading zeroes, base64 root
  hash (32 bytes), then optional non-empty extension lines.
* **tlog proof**: ``c2sp.org/tlog-proof@v1``, optional ``extra <base64>``, ``index <n>``, one base64 hash per
  line of the inclusion proof (leaf sibling first), a blank line, then the checkpoint note verbatim.

Verification follows sigstore-python's shape: a function that returns the verified object or raises a typed,
explained error. :class:`NoteError` (a :class:`~ledger.errors.LedgerInputError`) means the text is malformed
(unusable input, exit 2); :class:`VerificationError` and its subclasses mean well-formed but not proven
(verification failed, exit 1). Key problems raise :class:`~ledger.keys.KeyFormatError`.

Why this is hand-written: no maintained Python package implements the C2SP note formats; the signature
itself is ``cryptography``'s Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import merkle
from .errors import LedgerError, LedgerInputError
from .keys import VerifierKey, as_signer, as_verifier, check_key_name, key_id

EM_DASH = "\u2014"
SIG_PREFIX = EM_DASH + " "
TLOG_PROOF_HEADER = "c2sp.org/tlog-proof@v1"
MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 64  # the spec requires accepting at least 16
MAX_TREE_SIZE = (1 << 64) - 1

_DECIMAL_RE = re.compile(r"^(0|[1-9][0-9]*)$")
_B64_RE = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")


class NoteError(LedgerInputError, ValueError):
    """A signed note, checkpoint or tlog proof is malformed (the message names the line and the reason)."""


class VerificationError(LedgerError):
    """The input is well-formed but does not prove what was asked."""


class SignatureError(VerificationError):
    """No valid signature by the trusted key (missing, made by another key, or not matching the text)."""


class InclusionError(VerificationError):
    """An inclusion proof does not lead from the leaf to the checkpoint's root."""


class OriginError(VerificationError):
    """A checkpoint is for a different log origin than expected."""


# ---------------------------------------------------------------------------------------------------------
# Signed notes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_id: bytes  # 4 bytes
    signature: bytes  # the signature proper, without the key ID

    @property
    def line(self) -> str:
        blob = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{SIG_PREFIX}{self.name} {blob}"


@dataclass(frozen=True)
class Note:
    text: str  # includes the final newline
    signatures: tuple[NoteSignature, ...] = field(default_factory=tuple)

    def format(self) -> str:
        return format_note(self.text, self.signatures)


def _b64(value: str, what: str) -> bytes:
    if not value or not _B64_RE.match(value) or len(value) % 4:
        raise NoteError(f"{what}: not standard padded base64")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise NoteError(f"{what}: not valid base64 ({exc})") from exc
    if base64.b64encode(raw).decode("ascii") != value:
        raise NoteError(f"{what}: base64 is not in canonical form")
    return raw


def _check_text_chars(text: str, what: str) -> None:
    for lineno, line in enumerate(text.split("\n"), start=1):
        bad = next((c for c in line if ord(c) < 0x20 or ord(c) == 0x7F), None)
        if bad is not None:
            raise NoteError(f"{what} line {lineno}: control character {bad!r} (only newline is allowed)")


def _decode(data: str | bytes, what: str) -> str:
    if isinstance(data, bytes):
        if len(data) > MAX_NOTE_BYTES:
            raise NoteError(f"{what}: {len(data)} bytes exceeds the {MAX_NOTE_BYTES}-byte limit")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NoteError(f"{what}: not valid UTF-8 (byte {exc.start})") from exc
    if not isinstance(data, str):
        raise NoteError(f"{what}: expected text, got {type(data).__name__}")
    if len(data.encode("utf-8", "surrogatepass")) > MAX_NOTE_BYTES:
        raise NoteError(f"{what}: exceeds the {MAX_NOTE_BYTES}-byte limit")
    try:
        data.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise NoteError(f"{what}: not valid UTF-8 (lone surrogate at character {exc.start})") from exc
    return data


def _check_note_text(text: str) -> None:
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    _check_text_chars(text, "note text")


def parse_note(data: str | bytes) -> Note:
    """Split a signed note into its text and signature lines, checking the format strictly (no crypto)."""
    s = _decode(data, "signed note")
    _check_text_chars(s, "signed note")
    if not s.endswith("\n"):
        raise NoteError("signed note: does not end with a newline")
    split = s.rfind("\n\n")
    if split < 0:
        raise NoteError("signed note: no blank line between the text and the signatures")
    text, block = s[: split + 1], s[split + 2 :]
    lines = block[:-1].split("\n") if block else []
    if not lines or lines == [""]:
        raise NoteError("signed note: no signature lines after the last blank line")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"signed note: {len(lines)} signatures exceeds the limit of {MAX_SIGNATURES}")
    base = text.count("\n") + 1  # line number of the blank separator line
    sigs = []
    for offset, line in enumerate(lines, start=1):
        where = f"signed note line {base + offset}"
        if not line.startswith(SIG_PREFIX):
            raise NoteError(f"{where}: signature lines must start with an em dash (U+2014) and a space")
        parts = line[len(SIG_PREFIX) :].split(" ")
        if len(parts) != 2:
            raise NoteError(f"{where}: expected '— <key name> <base64 signature>'")
        name, blob_b64 = parts
        try:
            check_key_name(name)
        except ValueError as exc:
            raise NoteError(f"{where}: {exc}") from exc
        blob = _b64(blob_b64, f"{where} (signature)")
        if len(blob) < 5:
            raise NoteError(
                f"{where}: signature is {len(blob)} bytes, shorter than a key ID plus a signature"
            )
        sigs.append(NoteSignature(name, blob[:4], blob[4:]))
    return Note(text, tuple(sigs))


def format_note(text: str, signatures: Iterable[NoteSignature]) -> str:
    sigs = list(signatures)
    if not sigs:
        raise NoteError("a signed note needs at least one signature")
    _check_note_text(text)
    return text + "\n" + "".join(sig.line + "\n" for sig in sigs)


def signature_for(text: str, private_key: Ed25519PrivateKey, key_name: str) -> NoteSignature:
    """An Ed25519 note signature over ``text`` (which must be valid note text)."""
    _check_note_text(_decode(text, "note text"))
    check_key_name(key_name)
    sig = private_key.sign(text.encode("utf-8"))
    return NoteSignature(key_name, key_id(key_name, private_key.public_key()), sig)


def sign_note(text: str, private_key: object, key_name: str) -> str:
    """Sign ``text`` and return the signed note. ``private_key``: key object, PEM, or key file path."""
    key = as_signer(private_key)
    return format_note(text, [signature_for(text, key, key_name)])


def _describe(sig: NoteSignature) -> str:
    return f"{sig.name}+{sig.key_id.hex()}"


def _matches(sig: NoteSignature, v: VerifierKey | Ed25519PublicKey) -> bool:
    if isinstance(v, VerifierKey):
        return sig.name == v.name and sig.key_id == v.key_id
    # A bare public key has no name: the key ID binds the line's name to this key.
    return sig.key_id == key_id(sig.name, v)


def verify_note(data: str | bytes, keys: object) -> Note:
    """Verify a signed note against trusted key(s); return the note with only the verified signatures.

    ``keys``: one key or a list; each an ``Ed25519PublicKey`` (any key name whose key ID matches), a
    :class:`~ledger.keys.VerifierKey` or verifier key line (name and ID must match), PEM, or a key file path.
    Signatures by unknown keys are ignored, as the spec requires; a signature by a trusted key that fails to
    verify rejects the whole note.
    """
    note = parse_note(data)
    trusted = [as_verifier(k) for k in (keys if isinstance(keys, (list, tuple)) else [keys])]
    if not trusted:
        raise SignatureError("no trusted keys given")
    msg = note.text.encode("utf-8")
    verified = []
    for sig in note.signatures:
        for v in trusted:
            if not _matches(sig, v):
                continue
            pub = v.public_key if isinstance(v, VerifierKey) else v
            try:
                if len(sig.signature) != 64:
                    raise InvalidSignature
                pub.verify(sig.signature, msg)
            except InvalidSignature as exc:
                raise SignatureError(
                    f"signature by {_describe(sig)} does not verify: the note text was changed or the signature is corrupt"
                ) from exc
            verified.append(sig)
            break
    if not verified:
        found = ", ".join(_describe(s) for s in note.signatures)
        want = ", ".join(v.line if isinstance(v, VerifierKey) else "the given public key" for v in trusted)
        raise SignatureError(f"no signature by {want}; the note is signed by: {found}")
    return Note(note.text, tuple(verified))


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        return format_checkpoint(self.origin, self.size, self.root, self.extensions)


def format_checkpoint(origin: str, size: int, root: bytes, extensions: Sequence[str] = ()) -> str:
    """The checkpoint note text (validated by parsing it back)."""
    if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_TREE_SIZE:
        raise NoteError(f"checkpoint size must be an integer in [0, 2^64), got {size!r}")
    if not isinstance(root, bytes) or len(root) != merkle.HASH_SIZE:
        raise NoteError(f"checkpoint root must be {merkle.HASH_SIZE} bytes")
    text = "\n".join([origin, str(size), base64.b64encode(root).decode("ascii"), *extensions]) + "\n"
    parse_checkpoint(text)
    return text


def parse_checkpoint(text: str | bytes) -> Checkpoint:
    """Parse checkpoint note text strictly (no signature check; see :func:`verify_checkpoint`)."""
    s = _decode(text, "checkpoint")
    _check_text_chars(s, "checkpoint")
    if not s.endswith("\n"):
        raise NoteError("checkpoint: text does not end with a newline")
    lines = s[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError(f"checkpoint: needs origin, size and root lines, got {len(lines)} line(s)")
    for i, line in enumerate(lines, start=1):
        if not line:
            raise NoteError(f"checkpoint line {i}: empty line")
    origin, size_s, root_s, *ext = lines
    if not _DECIMAL_RE.match(size_s):
        raise NoteError(
            f"checkpoint line 2 (size): {size_s!r} is not a decimal number without leading zeroes"
        )
    size = int(size_s)
    if size > MAX_TREE_SIZE:
        raise NoteError(f"checkpoint line 2 (size): {size_s} does not fit in 64 bits")
    root = _b64(root_s, "checkpoint line 3 (root hash)")
    if len(root) != merkle.HASH_SIZE:
        raise NoteError(f"checkpoint line 3 (root hash): {len(root)} bytes, expected {merkle.HASH_SIZE}")
    return Checkpoint(origin, size, root, tuple(ext))


def parse_checkpoint_note(note_text: str | bytes) -> Checkpoint:
    """The checkpoint inside a signed note, without verifying any signature (for display only)."""
    return parse_checkpoint(parse_note(note_text).text)


def sign_checkpoint(
    origin: str, size: int, root: bytes, private_key: object, key_name: str, extensions: Sequence[str] = ()
) -> str:
    """Sign (origin, size, root) as a C2SP checkpoint in a signed note; returns the note text."""
    return sign_note(format_checkpoint(origin, size, root, extensions), private_key, key_name)


def verify_checkpoint(note_text: str | bytes, public_key: object, origin: str | None = None) -> Checkpoint:
    """Verify a checkpoint note's signature by ``public_key`` and return the parsed checkpoint.

    Raises NoteError (malformed), SignatureError (no valid signature by the key), OriginError (``origin``
    given and different). The checkpoint body is only parsed after its signature verified.
    """
    note = verify_note(note_text, public_key)
    cp = parse_checkpoint(note.text)
    if origin is not None and cp.origin != origin:
        raise OriginError(f"checkpoint is for origin {cp.origin!r}, expected {origin!r}")
    return cp


# ---------------------------------------------------------------------------------------------------------
# tlog proofs (c2sp.org/tlog-proof@v1)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlogProof:
    index: int
    proof: tuple[bytes, ...]
    checkpoint_note: str
    extra: bytes | None = None

    def format(self) -> str:
        return format_tlog_proof(self.index, self.proof, self.checkpoint_note, self.extra)


def format_tlog_proof(
    index: int, proof: Sequence[bytes], checkpoint_note: str, extra: bytes | None = None
) -> str:
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise NoteError(f"tlog proof index must be a non-negative integer, got {index!r}")
    if any(not isinstance(p, bytes) or len(p) != merkle.HASH_SIZE for p in proof):
        raise NoteError(f"tlog proof hashes must be {merkle.HASH_SIZE} bytes each")
    parse_note(checkpoint_note)
    lines = [TLOG_PROOF_HEADER]
    if extra is not None:
        lines.append("extra " + base64.b64encode(extra).decode("ascii"))
    lines.append(f"index {index}")
    lines += [base64.b64encode(p).decode("ascii") for p in proof]
    return "\n".join(lines) + "\n\n" + checkpoint_note


def parse_tlog_proof(data: str | bytes) -> TlogProof:
    s = _decode(data, "tlog proof")
    head, sep, cp_note = s.partition("\n\n")
    if not sep:
        raise NoteError("tlog proof: no blank line before the checkpoint")
    lines = head.split("\n")
    if lines[0] != TLOG_PROOF_HEADER:
        raise NoteError(f"tlog proof line 1: expected {TLOG_PROOF_HEADER!r}, got {lines[0][:60]!r}")
    i = 1
    extra = None
    if i < len(lines) and lines[i].startswith("extra "):
        extra = (
            _b64(lines[i][len("extra ") :], f"tlog proof line {i + 1} (extra)")
            if lines[i] != "extra "
            else b""
        )
        i += 1
    if i >= len(lines) or not lines[i].startswith("index "):
        raise NoteError(f"tlog proof line {i + 1}: expected 'index <n>'")
    idx_s = lines[i][len("index ") :]
    if not _DECIMAL_RE.match(idx_s) or int(idx_s) > MAX_TREE_SIZE:
        raise NoteError(
            f"tlog proof line {i + 1}: index {idx_s!r} is not a decimal number without leading zeroes"
        )
    proof = []
    for j in range(i + 1, len(lines)):
        h = _b64(lines[j], f"tlog proof line {j + 1} (inclusion proof hash)")
        if len(h) != merkle.HASH_SIZE:
            raise NoteError(f"tlog proof line {j + 1}: hash is {len(h)} bytes, expected {merkle.HASH_SIZE}")
        proof.append(h)
    parse_note(cp_note)
    return TlogProof(int(idx_s), tuple(proof), cp_note, extra)


def verify_tlog_proof(
    data: str | bytes, leaf_hash: bytes, public_key: object, origin: str | None = None
) -> tuple[Checkpoint, TlogProof]:
    """Verify a tlog proof for the leaf with RFC 9162 hash ``leaf_hash``: checkpoint signature, then inclusion.

    Returns the verified checkpoint and the parsed proof; raises NoteError / SignatureError / OriginError /
    InclusionError.
    """
    tp = parse_tlog_proof(data)
    cp = verify_checkpoint(tp.checkpoint_note, public_key, origin=origin)
    if tp.index >= cp.size:
        raise InclusionError(f"index {tp.index} is outside the checkpointed tree of size {cp.size}")
    if not merkle.verify_inclusion(tp.index, cp.size, leaf_hash, list(tp.proof), cp.root):
        raise InclusionError(
            f"inclusion proof for index {tp.index} does not lead to the root of the checkpointed tree "
            f"(size {cp.size}): the entry or the proof was changed"
        )
    return cp, tp
