"""DSSE v1 envelopes (secure-systems-lab/dsse) signed with Ed25519.

``PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`` where LEN is the ASCII decimal
*byte* length (the type is UTF-8 encoded first, so a non-ASCII payloadType's length is its byte count, not
its character count). The signature is Ed25519 over the PAE bytes. The JSON envelope is
``{"payload": base64(body), "payloadType": type, "signatures": [{"keyid": ..., "sig": base64(sig)}]}``.

Why hand-written: the reference implementation (securesystemslib / the dsse repo's signing_spec.py) is an
example, not a maintained package for this use, and PAE is four lines; signatures are ``cryptography``'s.

Verification returns the payload or raises a typed error (sigstore-python style): :class:`EnvelopeError`
for a malformed envelope (unusable input, exit 2), :class:`DSSEVerificationError` when no signature
verifies with the trusted key or the payloadType is not the expected one (verification failed, exit 1).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ledger.errors import LedgerInputError
from ledger.keys import VerifierKey, as_signer, as_verifier, public_key_bytes
from ledger.note import VerificationError

INTOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
_B64_RE = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


class EnvelopeError(LedgerInputError, ValueError):
    """The envelope is not a well-formed DSSE JSON envelope (the message names the field)."""


class DSSEVerificationError(VerificationError):
    """No signature verifies over PAE(payloadType, payload) with the trusted key, or the type is wrong."""


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 Pre-Authentication Encoding, with lengths in bytes."""
    t = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def keyid_for(public_key: Ed25519PublicKey) -> str:
    """An (unauthenticated) key hint: hex SHA-256 of the raw 32-byte Ed25519 public key."""
    return hashlib.sha256(public_key_bytes(public_key)).hexdigest()


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes


@dataclass(frozen=True)
class Envelope:
    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "payload": base64.b64encode(self.payload).decode("ascii"),
            "payloadType": self.payload_type,
            "signatures": [
                {"keyid": s.keyid, "sig": base64.b64encode(s.sig).decode("ascii")} for s in self.signatures
            ],
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n"


def sign(payload: bytes, payload_type: str, private_key: object, keyid: str | None = None) -> Envelope:
    """Sign ``payload`` under ``payload_type``. ``private_key``: Ed25519 key object, PEM, or key file path."""
    if not isinstance(payload, bytes):
        raise EnvelopeError(f"payload must be bytes, got {type(payload).__name__}")
    if not isinstance(payload_type, str) or not payload_type:
        raise EnvelopeError("payloadType must be a non-empty string")
    key = as_signer(private_key)
    sig = key.sign(pae(payload_type, payload))
    return Envelope(payload, payload_type, (Signature(keyid or keyid_for(key.public_key()), sig),))


def _b64decode(value: object, field: str) -> bytes:
    """Standard or URL-safe base64 (the spec requires verifiers to accept either)."""
    if not isinstance(value, str):
        raise EnvelopeError(f"{field}: expected a base64 string, got {type(value).__name__}")
    if not _B64_RE.match(value):
        raise EnvelopeError(f"{field}: not base64")
    s = value.replace("-", "+").replace("_", "/")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EnvelopeError(f"{field}: not valid base64 ({exc})") from exc


def parse_envelope(data: object) -> Envelope:
    """Parse a DSSE JSON envelope (dict, JSON text or bytes), strictly checking every field."""
    obj = data
    if isinstance(data, (bytes, str)):
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise EnvelopeError(f"envelope is not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise EnvelopeError("envelope must be a JSON object")
    for name in ("payload", "payloadType", "signatures"):
        if name not in obj:
            raise EnvelopeError(f"envelope: missing field {name!r}")
    payload = _b64decode(obj["payload"], "envelope.payload")
    ptype = obj["payloadType"]
    if not isinstance(ptype, str) or not ptype:
        raise EnvelopeError("envelope.payloadType: must be a non-empty string")
    sigs_in = obj["signatures"]
    if not isinstance(sigs_in, list) or not sigs_in:
        raise EnvelopeError("envelope.signatures: must be a non-empty list")
    sigs = []
    for i, s in enumerate(sigs_in):
        where = f"envelope.signatures[{i}]"
        if not isinstance(s, dict) or "sig" not in s:
            raise EnvelopeError(f"{where}: must be an object with a 'sig' field")
        keyid = s.get("keyid", "")
        if not isinstance(keyid, str):
            raise EnvelopeError(f"{where}.keyid: must be a string")
        sigs.append(Signature(keyid, _b64decode(s["sig"], f"{where}.sig")))
    return Envelope(payload, ptype, tuple(sigs))


def verify(envelope: object, public_key: object, payload_type: str | None = None) -> bytes:
    """Verify a DSSE envelope with ``public_key`` and return its payload bytes.

    ``envelope``: :class:`Envelope`, dict, or JSON text. ``public_key``: Ed25519 public key, PEM, verifier key
    line, or key file path. Every signature is tried (keyids are unauthenticated hints and are not trusted);
    one valid signature suffices. With ``payload_type``, the envelope's type must equal it.
    """
    env = envelope if isinstance(envelope, Envelope) else parse_envelope(envelope)
    v = as_verifier(public_key)
    pub = v.public_key if isinstance(v, VerifierKey) else v
    message = pae(env.payload_type, env.payload)
    for s in env.signatures:
        try:
            pub.verify(s.sig, message)
        except InvalidSignature:
            continue
        break
    else:
        raise DSSEVerificationError(
            f"none of the {len(env.signatures)} signature(s) verifies with the given key: the payload, "
            "payloadType or signature was changed, or it was signed by another key"
        )
    if payload_type is not None and env.payload_type != payload_type:
        raise DSSEVerificationError(f"payloadType is {env.payload_type!r}, expected {payload_type!r}")
    return env.payload
