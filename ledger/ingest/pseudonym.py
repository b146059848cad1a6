"""Keyed pseudonyms for annotator and reviewer identities (HMAC-SHA256; the key never enters the ledger).

Why keyed: a plain hash of an e-mail address can be reversed by hashing a list of candidate addresses. With a
secret key, only the key holder can confirm that ``anon:...`` is ``alice@example.com``.

Key file: 64 hex characters (32 random bytes) and a newline, mode 0600, kept *outside* the ledger database.
Pass it explicitly (``--pseudonym-key FILE``), or let :func:`open_key` create ``<ledger>.pseudonym-key``
beside a SQLite ledger on first use (it says so on stderr). A key file readable by group or others is
refused, like ``ssh`` refuses a world-readable private key. Keep the same key for every ingest into one
ledger, otherwise one person gets two pseudonyms.

Identity map: optionally, the pseudonym → identity pairs are appended to a separate JSONL file (mode 0600)
so the key holder can answer "who is anon:...?" without brute force. The ledger and its exports never
include it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ledger.ingest.errors import PseudonymKeyError

KEY_BYTES = 32
PREFIX = "anon:"
_DOMAIN = b"gradledger-pseudonym/1\n"
_KEY_ID_DOMAIN = b"gradledger-pseudonym-key-id/1"

# Practical e-mail matcher (RFC 5322 local parts are broader, but exports use ordinary addresses).
EMAIL_RE = re.compile(
    r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+"
)


def normalise_identity(identity: str) -> str:
    """E-mail addresses compare case-insensitively in practice; other identities are kept as given."""
    identity = identity.strip()
    return identity.casefold() if "@" in identity else identity


class Pseudonymizer:
    """Maps identities to stable pseudonyms ``anon:<32 hex>`` and scrubs e-mail addresses from text."""

    def __init__(self, key: bytes, identity_map: str | os.PathLike[str] | None = None) -> None:
        if len(key) < 16:
            raise PseudonymKeyError("pseudonym key must be at least 16 bytes")
        self._key = key
        self._cache: dict[str, str] = {}
        self._map_path = Path(identity_map) if identity_map is not None else None
        self._new_pairs: dict[str, str] = {}
        self._known_in_map: set[str] = set()
        if self._map_path is not None and self._map_path.exists():
            with self._map_path.open(encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        self._known_in_map.add(json.loads(line)["pseudonym"])
        self.key_id = hmac.new(key, _KEY_ID_DOMAIN, hashlib.sha256).hexdigest()[:16]
        self._sub: Callable[[re.Match[str]], str] = lambda m: self.pseudonym(m.group(0))

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        # For parallel-ingest workers: the same key and identity map, a fresh cache (the bound ``_sub``
        # lambda cannot be pickled anyway). The pipe to a child process never leaves the machine.
        return (Pseudonymizer, (self._key, self._map_path))

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], identity_map: str | os.PathLike[str] | None = None
    ) -> Pseudonymizer:
        return cls(read_key(path), identity_map=identity_map)

    def pseudonym(self, identity: str) -> str:
        """``anon:`` + the first 128 bits of HMAC-SHA256(key, domain || normalised identity), hex."""
        hit = self._cache.get(identity)
        if hit is not None:
            return hit
        norm = normalise_identity(identity)
        digest = hmac.new(self._key, _DOMAIN + norm.encode("utf-8"), hashlib.sha256).hexdigest()
        pseud = PREFIX + digest[:32]
        self._cache[identity] = pseud
        if self._map_path is not None and pseud not in self._known_in_map:
            self._new_pairs[pseud] = norm
        return pseud

    def scrub_text(self, text: str) -> str:
        """Replace every e-mail address in ``text`` by its pseudonym."""
        if "@" not in text:
            return text
        return EMAIL_RE.sub(self._sub, text)

    def scrub(self, obj: Any) -> Any:
        """Return ``obj`` (JSON-like) with e-mail addresses in every string and key replaced by pseudonyms."""
        if isinstance(obj, str):
            return self.scrub_text(obj)
        if isinstance(obj, dict):
            return {self.scrub_text(k): self.scrub(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.scrub(v) for v in obj]
        return obj

    def take_new_pairs(self) -> dict[str, str]:
        """Pseudonym -> identity pairs first seen since the last call (a parallel-ingest worker hands them to
        the writing process, which adds them with ``add_pairs``; only that process writes the map)."""
        out, self._new_pairs = self._new_pairs, {}
        self._known_in_map.update(out)
        return out

    def add_pairs(self, pairs: dict[str, str]) -> None:
        if self._map_path is None:
            return
        for pseud, ident in pairs.items():
            if pseud not in self._known_in_map:
                self._new_pairs[pseud] = ident

    def flush_identity_map(self) -> int:
        """Append the pairs first seen in this session to the identity map file (mode 0600)."""
        if self._map_path is None or not self._new_pairs:
            return 0
        fd = os.open(self._map_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as fh:
            for pseud, ident in sorted(self._new_pairs.items()):
                fh.write(json.dumps({"pseudonym": pseud, "identity": ident}, ensure_ascii=False) + "\n")
        written = len(self._new_pairs)
        self._known_in_map.update(self._new_pairs)
        self._new_pairs.clear()
        return written


def contains_email(text: str) -> bool:
    return "@" in text and EMAIL_RE.search(text) is not None


def read_key(path: str | os.PathLike[str]) -> bytes:
    """Read a key file, refusing one that group or others can read."""
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise PseudonymKeyError(f"{p}: pseudonym key file not found") from None
    if os.name == "posix" and st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PseudonymKeyError(
            f"{p}: pseudonym key file is accessible by group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {p}"
        )
    text = p.read_text(encoding="ascii", errors="replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise PseudonymKeyError(f"{p}: pseudonym key file must hold hex digits") from None
    if len(key) < 16:
        raise PseudonymKeyError(f"{p}: pseudonym key must be at least 16 bytes (32 hex digits)")
    return key


def create_key(path: str | os.PathLike[str]) -> bytes:
    """Create a new random key file with mode 0600 (fails if it already exists)."""
    key = secrets.token_bytes(KEY_BYTES)
    fd = os.open(Path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key.hex() + "\n")
    return key


def default_key_path(ledger_path: str | os.PathLike[str]) -> Path:
    """``<ledger file>.pseudonym-key``: beside the database file, never inside it."""
    return Path(str(ledger_path) + ".pseudonym-key")


def open_key(
    key_path: str | os.PathLike[str] | None,
    ledger_path: str | os.PathLike[str] | None,
    identity_map: str | os.PathLike[str] | None = None,
    *,
    announce: Callable[[str], None] | None = None,
) -> Pseudonymizer:
    """Resolve the key: explicit file, else ``$GRADLEDGER_PSEUDONYM_KEY``, else ``<ledger>.pseudonym-key``.

    The default key is created (mode 0600) on first use and announced, so the user knows to keep it out of
    anything they share. A ledger given by URL (no local file) needs an explicit key.
    """
    if key_path is None:
        env = os.environ.get("GRADLEDGER_PSEUDONYM_KEY")
        if env:
            key_path = env
    if key_path is not None:
        return Pseudonymizer.from_file(key_path, identity_map=identity_map)
    if ledger_path is None or "://" in str(ledger_path):
        raise PseudonymKeyError("this ledger has no local file: pass --pseudonym-key FILE")
    path = default_key_path(ledger_path)
    if path.exists():
        return Pseudonymizer.from_file(path, identity_map=identity_map)
    key = create_key(path)
    msg = (
        f"created pseudonym key {path} (mode 0600). Keep it: the same key keeps pseudonyms stable. "
        "Never ship it with the ledger."
    )
    (announce or (lambda m: print(m, file=sys.stderr)))(msg)
    return Pseudonymizer(key, identity_map=identity_map)
