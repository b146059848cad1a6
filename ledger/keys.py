"""Ed25519 keys for signed checkpoints: generate, save, load, and the C2SP signed-note key encodings.

Cryptography is ``cryptography``'s Ed25519; this module only does file handling and the two text
encodings the C2SP signed-note spec defines:

* key ID = ``SHA-256(name || 0x0A || 0x01 || 32-byte public key)[:4]`` (0x01 = Ed25519);
* verifier key line = ``<name>+<8 hex key ID>+<base64(0x01 || public key)>`` (golang.org/x/mod/sumdb/note).

Files written by :func:`save_keypair`: ``ledger.key`` (PEM PKCS#8, mode 0600), ``ledger.pub`` (PEM
SubjectPublicKeyInfo) and ``ledger.vkey`` (the verifier key line). Every malformed or wrong-type key raises
:class:`KeyFormatError` with a one-line message naming the file and the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import LedgerInputError

ALG_ED25519 = 0x01
PRIVATE_KEY_FILE = "ledger.key"
PUBLIC_KEY_FILE = "ledger.pub"
VERIFIER_KEY_FILE = "ledger.vkey"
DEFAULT_KEY_NAME = "gradledger"

_VKEY_RE = re.compile(r"^([^+\s]+)\+([0-9a-fA-F]{8})\+([A-Za-z0-9+/]+={0,2})$")


class KeyFormatError(LedgerInputError, ValueError):
    """A key (file, PEM text or verifier key line) is missing, malformed, encrypted or not Ed25519."""


@dataclass(frozen=True)
class VerifierKey:
    """A named Ed25519 public key, as in a C2SP verifier key line."""

    name: str
    public_key: Ed25519PublicKey

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.public_key)

    @property
    def line(self) -> str:
        return verifier_key_line(self.name, self.public_key)

    def __str__(self) -> str:
        return self.line


Verifier = VerifierKey | Ed25519PublicKey


def check_key_name(name: str) -> str:
    """Return ``name`` if it is a valid signed-note key name (non-empty, no spaces, no '+', no controls)."""
    if not isinstance(name, str) or not name:
        raise KeyFormatError("key name must be a non-empty string")
    bad = next((c for c in name if c.isspace() or c == "+" or ord(c) < 0x20 or ord(c) == 0x7F), None)
    if bad is not None:
        raise KeyFormatError(f"key name {name!r} contains {bad!r}: names must not contain spaces or '+'")
    return name


def generate_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def public_key_bytes(public_key: Ed25519PublicKey) -> bytes:
    """The 32-byte RFC 8032 encoding of an Ed25519 public key."""
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(name: str, public_key: Ed25519PublicKey | bytes) -> bytes:
    """C2SP signed-note key ID (4 bytes) of an Ed25519 key under ``name``."""
    raw = public_key if isinstance(public_key, bytes) else public_key_bytes(public_key)
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ALG_ED25519]) + raw).digest()[:4]


def verifier_key_line(name: str, public_key: Ed25519PublicKey) -> str:
    """``<name>+<hex key id>+<base64(0x01 || public key)>``."""
    check_key_name(name)
    raw = public_key_bytes(public_key)
    enc = base64.b64encode(bytes([ALG_ED25519]) + raw).decode("ascii")
    return f"{name}+{key_id(name, raw).hex()}+{enc}"


def parse_verifier_key(line: str, source: str = "verifier key") -> VerifierKey:
    """Parse and check a verifier key line (the key ID must match the name and key)."""
    text = line.strip()
    m = _VKEY_RE.match(text)
    if m is None:
        raise KeyFormatError(f"{source}: not a verifier key line '<name>+<8 hex digits>+<base64 key>'")
    name, hex_id, b64 = m.groups()
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyFormatError(f"{source}: key is not valid base64 ({exc})") from exc
    if len(blob) != 33 or blob[0] != ALG_ED25519:
        raise KeyFormatError(
            f"{source}: key must be 0x01 (Ed25519) followed by 32 bytes, got {len(blob)} bytes"
            + (f" of type 0x{blob[0]:02x}" if blob else "")
        )
    if base64.b64encode(blob).decode("ascii") != b64:
        raise KeyFormatError(f"{source}: key base64 is not in canonical form")
    check_key_name(name)
    vk = VerifierKey(name, Ed25519PublicKey.from_public_bytes(blob[1:]))
    if vk.key_id.hex() != hex_id.lower():
        raise KeyFormatError(
            f"{source}: key id {hex_id} does not match the name and key (want {vk.key_id.hex()})"
        )
    return vk


# ---------------------------------------------------------------------------------------------------------
# PEM
# ---------------------------------------------------------------------------------------------------------


def private_key_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _kind(key: object) -> str:
    name = type(key).__name__.replace("_", "")
    for prefix in ("RSA", "EllipticCurve", "DSA", "Ed448", "X25519", "X448", "DH"):
        if prefix.lower() in name.lower():
            return {"EllipticCurve": "an EC"}.get(prefix, f"a {prefix}")
    return f"a {name}"


def parse_private_key_pem(data: bytes, source: str = "private key") -> Ed25519PrivateKey:
    if b"-----BEGIN" not in data:
        raise KeyFormatError(f"{source}: not a PEM file (expected '-----BEGIN PRIVATE KEY-----')")
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise KeyFormatError(
            f"{source}: this is a public key; signing needs the private key file ({PRIVATE_KEY_FILE})"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise KeyFormatError(
            f"{source}: the private key is encrypted; gradledger needs an unencrypted PKCS#8 key"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KeyFormatError(f"{source}: unreadable PEM private key ({reason})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{source}: {_kind(key)} key, not Ed25519")
    return key


def parse_public_key_pem(data: bytes, source: str = "public key") -> Ed25519PublicKey:
    if b"-----BEGIN" not in data:
        raise KeyFormatError(f"{source}: not a PEM file (expected '-----BEGIN PUBLIC KEY-----')")
    if b"PRIVATE KEY-----" in data:
        raise KeyFormatError(
            f"{source}: this is a private key; verification needs the public key ({PUBLIC_KEY_FILE})"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise KeyFormatError(f"{source}: unreadable PEM public key ({reason})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{source}: {_kind(key)} key, not Ed25519")
    return key


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------


def _read(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError as exc:
        raise KeyFormatError(f"{p}: no such key file") from exc
    except IsADirectoryError as exc:
        raise KeyFormatError(f"{p}: is a directory, not a key file") from exc
    except OSError as exc:
        raise KeyFormatError(f"{p}: cannot read key file ({exc.strerror})") from exc
    if len(data) > 64 * 1024:
        raise KeyFormatError(f"{p}: {len(data)} bytes is far too large for a key file")
    return data


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load a PEM PKCS#8 Ed25519 private key file."""
    return parse_private_key_pem(_read(path), source=str(path))


def load_verifier(path: str | os.PathLike[str]) -> Verifier:
    """Load a public key file: PEM (-> Ed25519PublicKey) or a verifier key line (-> VerifierKey)."""
    data = _read(path)
    if b"-----BEGIN" in data:
        return parse_public_key_pem(data, source=str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyFormatError(f"{path}: neither a PEM public key nor a verifier key line (not UTF-8)") from exc
    return parse_verifier_key(text, source=str(path))


def load_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load a public key file (PEM or verifier key line) as a bare Ed25519 public key."""
    v = load_verifier(path)
    return v.public_key if isinstance(v, VerifierKey) else v


def as_verifier(key: object) -> Verifier:
    """Coerce what callers hold into a verifier.

    Accepts an ``Ed25519PublicKey``, a :class:`VerifierKey`, a verifier key line, PEM text/bytes, or a
    path (``str`` or ``PathLike``) to a ``.pub`` / ``.vkey`` file.
    """
    if isinstance(key, (Ed25519PublicKey, VerifierKey)):
        return key
    if isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError("verification needs a public key, not a private key")
    if isinstance(key, bytes):
        return parse_public_key_pem(key)
    if isinstance(key, str):
        if "-----BEGIN" in key:
            return parse_public_key_pem(key.encode("utf-8"))
        if _VKEY_RE.match(key.strip()) and not Path(key).exists():
            return parse_verifier_key(key)
        return load_verifier(key)
    if isinstance(key, os.PathLike):
        return load_verifier(key)
    raise KeyFormatError(f"unsupported public key type {type(key).__name__}")


def as_signer(key: object) -> Ed25519PrivateKey:
    """Coerce an ``Ed25519PrivateKey``, PEM text/bytes, or a path to a private key file."""
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, bytes):
        return parse_private_key_pem(key)
    if isinstance(key, str) and "-----BEGIN" in key:
        return parse_private_key_pem(key.encode("utf-8"))
    if isinstance(key, (str, os.PathLike)):
        return load_private_key(key)
    raise KeyFormatError(f"unsupported private key type {type(key).__name__}")


@dataclass(frozen=True)
class KeyFiles:
    private: Path
    public: Path
    verifier: Path
    verifier_key: VerifierKey


def save_keypair(
    directory: str | os.PathLike[str],
    name: str = DEFAULT_KEY_NAME,
    private_key: Ed25519PrivateKey | None = None,
    overwrite: bool = False,
) -> KeyFiles:
    """Write ``ledger.key`` (0600), ``ledger.pub`` and ``ledger.vkey`` into ``directory``.

    All three files are written to temporaries first and renamed into place only when all are complete, so
    a failure leaves nothing half-written. Refuses to replace existing key files unless ``overwrite``.
    """
    check_key_name(name)
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise KeyFormatError(f"{d}: exists and is not a directory")
    key = private_key if private_key is not None else generate_private_key()
    pub = key.public_key()
    vk = VerifierKey(name, pub)
    targets = {
        d / PRIVATE_KEY_FILE: (private_key_pem(key), 0o600),
        d / PUBLIC_KEY_FILE: (public_key_pem(pub), 0o644),
        d / VERIFIER_KEY_FILE: ((vk.line + "\n").encode("utf-8"), 0o644),
    }
    if not overwrite:
        existing = [str(p) for p in targets if p.exists()]
        if existing:
            raise KeyFormatError(f"{existing[0]}: already exists; refusing to overwrite a key")
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise KeyFormatError(f"{d}: cannot create directory ({exc.strerror})") from exc
    temps: list[tuple[Path, Path]] = []
    try:
        for final, (data, mode) in targets.items():
            tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            temps.append((tmp, final))
            try:
                os.fchmod(fd, mode)
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, final in temps:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise KeyFormatError(f"{d}: cannot write key files ({exc.strerror})") from exc
    return KeyFiles(d / PRIVATE_KEY_FILE, d / PUBLIC_KEY_FILE, d / VERIFIER_KEY_FILE, vk)
