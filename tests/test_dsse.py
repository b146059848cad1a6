"""DSSE v1: the spec's PAE test vector and signature, byte lengths for non-ASCII types, tampering."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from audit import dsse
from ledger.errors import LedgerInputError
from ledger.keys import VerifierKey, public_key_pem
from ledger.note import VerificationError

# secure-systems-lab/dsse protocol.md, "Test Vectors".
SPEC_TYPE = "http://example.com/HelloWorld"
SPEC_BODY = b"hello world"
SPEC_PAE = b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
SPEC_ENVELOPE = {
    "payload": "aGVsbG8gd29ybGQ=",
    "payloadType": "http://example.com/HelloWorld",
    "signatures": [
        {"sig": "A3JqsQGtVsJ2O2xqrI5IcnXip5GToJ3F+FnZ+O88SjtR6rDAajabZKciJTfUiHqJPcIAriEGAHTVeCUjW2JIZA=="}
    ],
}
SPEC_X = 46950820868899156662930047687818585632848591499744589407958293238635476079160
SPEC_Y = 5640078356564379163099075877009565129882514886557779369047442380624545832820


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def test_spec_pae_vector() -> None:
    assert dsse.pae(SPEC_TYPE, SPEC_BODY) == SPEC_PAE


def test_spec_envelope_signature_verifies_over_our_pae() -> None:
    """The spec's ECDSA P-256 signature (raw r||s) verifies over exactly our PAE bytes."""
    env = dsse.parse_envelope(json.dumps(SPEC_ENVELOPE))
    assert env.payload == SPEC_BODY and env.payload_type == SPEC_TYPE and env.signatures[0].keyid == ""
    pub = ec.EllipticCurvePublicNumbers(SPEC_X, SPEC_Y, ec.SECP256R1()).public_key()
    raw = env.signatures[0].sig
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    pub.verify(der, dsse.pae(env.payload_type, env.payload), ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        pub.verify(der, dsse.pae(env.payload_type, b"hello world!"), ec.ECDSA(hashes.SHA256()))


def test_non_ascii_payload_type_uses_byte_lengths(key: Ed25519PrivateKey) -> None:
    ptype = "application/vnd.gradledger.prüfung+json"  # 'ü' is 2 bytes in UTF-8
    body = "größe".encode()
    assert len(ptype.encode()) == len(ptype) + 1 and len(body) == 7
    assert dsse.pae(ptype, body) == b"DSSEv1 %d %s 7 %s" % (len(ptype) + 1, ptype.encode(), body)
    assert dsse.pae(ptype, body).startswith(b"DSSEv1 40 application/vnd.gradledger.pr\xc3\xbcfung+json 7 ")
    env = dsse.sign(body, ptype, key)
    assert dsse.verify(env.dumps(), key.public_key(), payload_type=ptype) == body
    # The signature covers the byte-length encoding, not a character-length one.
    char_len_pae = b"DSSEv1 %d %s %d %s" % (len(ptype), ptype.encode(), len(body.decode()), body)
    with pytest.raises(InvalidSignature):
        key.public_key().verify(env.signatures[0].sig, char_len_pae)


def test_round_trip_returns_payload(key: Ed25519PrivateKey) -> None:
    payload = json.dumps({"_type": "https://in-toto.io/Statement/v1", "subject": []}).encode()
    env = dsse.sign(payload, dsse.INTOTO_PAYLOAD_TYPE, key)
    text = env.dumps()
    obj = json.loads(text)
    assert set(obj) == {"payload", "payloadType", "signatures"}
    assert base64.b64decode(obj["payload"]) == payload
    assert obj["signatures"][0]["keyid"] == dsse.keyid_for(key.public_key())
    assert dsse.parse_envelope(text) == env
    for trusted in (
        key.public_key(),
        public_key_pem(key.public_key()),
        VerifierKey("k", key.public_key()).line,
    ):
        assert dsse.verify(text, trusted, payload_type=dsse.INTOTO_PAYLOAD_TYPE) == payload


def _tampered(obj: dict, **changes: object) -> dict:
    out = json.loads(json.dumps(obj))
    out.update(changes)
    return out


def test_tampering_and_other_key_rejected(key: Ed25519PrivateKey) -> None:
    payload = b'{"a": 1}'
    obj = dsse.sign(payload, dsse.INTOTO_PAYLOAD_TYPE, key).to_json()
    sig = base64.b64decode(obj["signatures"][0]["sig"])
    bad_payloads = [bytes([payload[0] ^ 1]) + payload[1:], payload + b" ", payload[:-1]]
    cases = [_tampered(obj, payload=base64.b64encode(p).decode()) for p in bad_payloads]
    cases.append(_tampered(obj, payloadType="application/vnd.in-toto+jsoN"))
    for i in range(0, len(sig), 7):
        flipped = bytearray(sig)
        flipped[i] ^= 0x01
        cases.append(
            _tampered(obj, signatures=[{"keyid": "", "sig": base64.b64encode(bytes(flipped)).decode()}])
        )
    for case in cases:
        with pytest.raises(dsse.DSSEVerificationError, match="signature") as ei:
            dsse.verify(case, key.public_key())
        assert "\n" not in str(ei.value)
    with pytest.raises(dsse.DSSEVerificationError, match="another key"):
        dsse.verify(obj, Ed25519PrivateKey.generate().public_key())
    with pytest.raises(dsse.DSSEVerificationError, match="expected 'text/plain'"):
        dsse.verify(obj, key.public_key(), payload_type="text/plain")
    assert issubclass(dsse.DSSEVerificationError, VerificationError)
    assert not issubclass(dsse.DSSEVerificationError, LedgerInputError)


def test_keyid_is_only_a_hint_and_any_valid_signature_suffices(key: Ed25519PrivateKey) -> None:
    obj = dsse.sign(b"x", "t/x", key, keyid="misleading").to_json()
    junk = {"keyid": dsse.keyid_for(key.public_key()), "sig": base64.b64encode(bytes(64)).decode()}
    obj["signatures"] = [junk, *obj["signatures"]]
    assert dsse.verify(obj, key.public_key()) == b"x"


def test_url_safe_and_unpadded_base64_accepted(key: Ed25519PrivateKey) -> None:
    payload = bytes(range(250, 256)) * 3  # encodes with '+' and '/' in standard base64
    obj = dsse.sign(payload, "t/x", key).to_json()
    assert "/" in obj["payload"] or "+" in obj["payload"]
    url = _tampered(
        obj,
        payload=base64.urlsafe_b64encode(payload).decode().rstrip("="),
        signatures=[
            {"sig": base64.urlsafe_b64encode(base64.b64decode(obj["signatures"][0]["sig"])).decode()}
        ],
    )
    assert dsse.verify(url, key.public_key()) == payload


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        ({"payloadType": "t", "signatures": [{"sig": "AA=="}]}, "missing field 'payload'"),
        ({"payload": "AA==", "signatures": [{"sig": "AA=="}]}, "missing field 'payloadType'"),
        ({"payload": "AA==", "payloadType": "t"}, "missing field 'signatures'"),
        ({"payload": "A A=", "payloadType": "t", "signatures": [{"sig": "AA=="}]}, "payload: not base64"),
        ({"payload": "AAA", "payloadType": 3, "signatures": [{"sig": "AA=="}]}, "payloadType"),
        ({"payload": "AA==", "payloadType": "t", "signatures": []}, "non-empty list"),
        ({"payload": "AA==", "payloadType": "t", "signatures": [{"keyid": "k"}]}, r"signatures\[0\]"),
        ({"payload": "AA==", "payloadType": "t", "signatures": [{"sig": "!!"}]}, r"signatures\[0\]\.sig"),
        ({"payload": "AA==", "payloadType": "t", "signatures": [{"sig": "AA==", "keyid": 1}]}, "keyid"),
        ({"payload": "A", "payloadType": "t", "signatures": [{"sig": "AA=="}]}, "payload: not valid base64"),
    ],
)
def test_malformed_envelopes_are_input_errors(envelope: object, reason: str, key: Ed25519PrivateKey) -> None:
    with pytest.raises(dsse.EnvelopeError, match=reason) as ei:
        dsse.verify(envelope, key.public_key())
    assert isinstance(ei.value, LedgerInputError) and "\n" not in str(ei.value)
