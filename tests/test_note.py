"""C2SP signed notes, checkpoints and tlog proofs; Ed25519 key files.

Public vectors (tests/vectors/note.json, origins recorded there): golang.org/x/mod/sumdb/note's PeterNeumann
and EnochRoot keys and signatures, the c2sp.org/signed-note example, and two real sum.golang.org checkpoints.
"""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ledger import keys, merkle, note
from ledger.errors import LedgerInputError

V = json.loads((Path(__file__).parent / "vectors" / "note.json").read_text(encoding="utf-8"))
GO = V["go_sumdb_note"]
GO_NOTE = GO["text"] + "\n" + GO["signature_line"] + "\n"
ENOCH_LINE = GO["enoch_signature_line"] + "\n"


def _go_private_key() -> Ed25519PrivateKey:
    # PRIVATE+KEY+<name>+<hex id>+<base64(0x01 || 32-byte seed)>; the base64 itself may contain '+'.
    blob = base64.b64decode(GO["signer_key"].split("+", 4)[4])
    assert blob[0] == keys.ALG_ED25519
    return Ed25519PrivateKey.from_private_bytes(blob[1:])


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def other_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)
    return msg


# ------------------------------------------------------------------------------------------------------
# Public vectors
# ------------------------------------------------------------------------------------------------------


def test_go_vector_key_encoding_and_key_id() -> None:
    sk = _go_private_key()
    assert keys.verifier_key_line("PeterNeumann", sk.public_key()) == GO["verifier_key"]
    assert keys.key_id("PeterNeumann", sk.public_key()).hex() == "c74f20a3"
    vk = keys.parse_verifier_key(GO["verifier_key"])
    assert vk.name == "PeterNeumann" and vk.key_id.hex() == "c74f20a3" and vk.line == GO["verifier_key"]
    assert (
        keys.parse_verifier_key(GO["verifier_key"].replace("c74f20a3", "C74F20A3")).line == GO["verifier_key"]
    )
    # EnochRoot's published key is the all-zero seed: checks the whole derivation end to end.
    zero = Ed25519PrivateKey.from_private_bytes(bytes(32))
    assert keys.verifier_key_line("EnochRoot", zero.public_key()) == GO["enoch_verifier_key"]


def test_go_vector_signing_is_byte_identical() -> None:
    assert note.sign_note(GO["text"], _go_private_key(), "PeterNeumann") == GO_NOTE


@pytest.mark.parametrize("trusted", ["vkey line", "VerifierKey", "bare public key", "PEM bytes"])
def test_go_vector_verifies(trusted: str) -> None:
    vk = keys.parse_verifier_key(GO["verifier_key"])
    k = {
        "vkey line": GO["verifier_key"],
        "VerifierKey": vk,
        "bare public key": vk.public_key,
        "PEM bytes": keys.public_key_pem(vk.public_key),
    }[trusted]
    n = note.verify_note(GO_NOTE, k)
    assert n.text == GO["text"]
    assert [s.name for s in n.signatures] == ["PeterNeumann"]


def test_go_vector_two_signers_each_verified_separately() -> None:
    both = GO["text"] + "\n" + GO["signature_line"] + "\n" + ENOCH_LINE
    assert [s.name for s in note.verify_note(both, GO["enoch_verifier_key"]).signatures] == ["EnochRoot"]
    assert [s.name for s in note.verify_note(both, GO["verifier_key"]).signatures] == ["PeterNeumann"]
    got = note.verify_note(both, [GO["verifier_key"], GO["enoch_verifier_key"]])
    assert [s.name for s in got.signatures] == ["PeterNeumann", "EnochRoot"]


def test_c2sp_spec_example_verifies() -> None:
    ex = V["c2sp_example"]
    n = note.verify_note(ex["note"], ex["verifier_key"])
    assert n.text == "This is an example message.\n"


@pytest.mark.parametrize("cp", V["sum_golang_org"]["checkpoints"], ids=lambda c: str(c["size"]))
def test_real_sum_golang_org_checkpoints_verify(cp: dict) -> None:
    got = note.verify_checkpoint(
        cp["note"], V["sum_golang_org"]["verifier_key"], origin="go.sum database tree"
    )
    assert got.size == cp["size"] and len(got.root) == 32 and got.extensions == ()
    edited = cp["note"].replace(str(cp["size"]), str(cp["size"] + 1), 1)
    with pytest.raises(note.SignatureError, match="does not verify"):
        note.verify_checkpoint(edited, V["sum_golang_org"]["verifier_key"])


# ------------------------------------------------------------------------------------------------------
# Rejections
# ------------------------------------------------------------------------------------------------------


def test_note_signed_by_another_key_is_rejected(key: Ed25519PrivateKey, other_key: Ed25519PrivateKey) -> None:
    signed = note.sign_note("hello\n", other_key, "example.com/log")
    with pytest.raises(note.SignatureError, match="no signature by") as ei:
        note.verify_note(signed, key.public_key())
    _one_line(ei.value)
    with pytest.raises(note.SignatureError):
        note.verify_note(signed, keys.VerifierKey("example.com/log", key.public_key()))


def test_edited_body_is_rejected() -> None:
    edited = GO_NOTE.replace("answer", "answers")
    with pytest.raises(note.SignatureError, match="does not verify") as ei:
        note.verify_note(edited, GO["verifier_key"])
    _one_line(ei.value)


def test_wrong_key_name_is_rejected(key: Ed25519PrivateKey) -> None:
    signed = note.sign_note("hello\n", key, "alice.example")
    with pytest.raises(note.SignatureError, match="no signature by bob.example"):
        note.verify_note(signed, keys.VerifierKey("bob.example", key.public_key()))
    # Renaming the signature line breaks the key ID binding even for a bare public key.
    renamed = signed.replace("— alice.example ", "— bob.example ")
    with pytest.raises(note.SignatureError):
        note.verify_note(renamed, key.public_key())


def test_corrupted_signature_by_trusted_key_rejects_whole_note() -> None:
    blob = bytearray(base64.b64decode(GO["signature_line"].split(" ")[2]))
    blob[10] ^= 1
    bad = "— PeterNeumann " + base64.b64encode(bytes(blob)).decode()
    with pytest.raises(note.SignatureError, match="does not verify"):
        note.verify_note(GO["text"] + "\n" + bad + "\n", GO["verifier_key"])
    with pytest.raises(note.SignatureError, match="does not verify"):
        note.verify_note(GO["text"] + "\n" + GO["signature_line"] + "\n" + bad + "\n", GO["verifier_key"])


def test_unknown_signatures_are_ignored() -> None:
    unknown = "— someone.else " + base64.b64encode(b"\x01\x02\x03\x04" + b"x" * 64).decode()
    n = note.verify_note(GO["text"] + "\n" + unknown + "\n" + GO["signature_line"] + "\n", GO["verifier_key"])
    assert [s.name for s in n.signatures] == ["PeterNeumann"]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (GO_NOTE.replace("x08go/", "x08go*"), "base64"),
        (GO_NOTE.replace("JnAM=", "JnAM"), "base64"),
        (GO["text"] + GO["signature_line"] + "\n", "blank line"),
        (GO_NOTE[:-1], "newline"),
        (GO["text"] + "\n", "no signature lines"),
        (GO_NOTE.replace("—", "-"), "em dash"),
        (GO_NOTE.replace("— PeterNeumann", "—  PeterNeumann"), "expected"),
        (GO_NOTE.replace("— PeterNeumann", "— Peter+Neumann"), "'\\+'"),
        (GO_NOTE.replace("problem,", "problem,\r"), "control character"),
        (GO_NOTE.replace("problem,", "problem,\t"), "control character"),
        ("text\n\n— name " + base64.b64encode(b"abcd").decode() + "\n", "shorter"),
        (GO_NOTE.encode("utf-8").replace(b"If", b"I\xff"), "UTF-8"),
        ("a\n\n" + "".join(f"— k{i} AAAAAAA=\n" for i in range(100)), "limit"),
    ],
)
def test_malformed_notes_are_input_errors(data: str | bytes, reason: str) -> None:
    with pytest.raises(note.NoteError, match=reason) as ei:
        note.verify_note(data, GO["verifier_key"])
    assert isinstance(ei.value, LedgerInputError)
    _one_line(ei.value)


def test_error_types_separate_bad_input_from_failed_verification() -> None:
    assert issubclass(note.NoteError, LedgerInputError)
    assert not issubclass(note.SignatureError, LedgerInputError)
    assert issubclass(note.InclusionError, note.VerificationError)
    assert issubclass(keys.KeyFormatError, LedgerInputError)


def test_note_round_trip_with_blank_lines_in_text(key: Ed25519PrivateKey) -> None:
    text = "line one\n\nline three after a blank\n"
    signed = note.sign_note(text, key, "example.com/k")
    parsed = note.parse_note(signed)
    assert parsed.text == text and parsed.format() == signed
    assert note.verify_note(signed, key.public_key()).text == text
    with pytest.raises(note.NoteError, match="newline"):
        note.sign_note("no newline", key, "example.com/k")
    with pytest.raises(keys.KeyFormatError, match="spaces"):
        note.sign_note("x\n", key, "bad name")


# ------------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------------


def test_checkpoint_round_trip(key: Ed25519PrivateKey) -> None:
    root = merkle.root([b"a", b"b", b"c"])
    signed = note.sign_checkpoint("gradledger.local/abc", 3, root, key, "gradledger.local/abc")
    lines = signed.split("\n")
    assert lines[:4] == ["gradledger.local/abc", "3", base64.b64encode(root).decode(), ""]
    assert lines[4].startswith("— gradledger.local/abc ")
    cp = note.verify_checkpoint(signed, key.public_key(), origin="gradledger.local/abc")
    assert cp == note.Checkpoint("gradledger.local/abc", 3, root)
    assert note.parse_checkpoint_note(signed) == cp
    vk = keys.VerifierKey("gradledger.local/abc", key.public_key())
    assert note.verify_checkpoint(signed, vk.line) == cp
    empty = note.sign_checkpoint("o", 0, merkle.EMPTY_ROOT, key, "k")
    assert note.verify_checkpoint(empty, key.public_key()).size == 0
    ext = note.sign_checkpoint("o", 1, root, key, "k", extensions=["ext one", "ext two"])
    assert note.verify_checkpoint(ext, key.public_key()).extensions == ("ext one", "ext two")


def test_checkpoint_for_another_origin_is_rejected(key: Ed25519PrivateKey) -> None:
    signed = note.sign_checkpoint("log.a", 1, merkle.root([b"x"]), key, "k")
    with pytest.raises(note.OriginError, match="'log.a', expected 'log.b'"):
        note.verify_checkpoint(signed, key.public_key(), origin="log.b")


ROOT_B64 = base64.b64encode(bytes(range(32))).decode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (f"o\n012\n{ROOT_B64}\n", "leading zeroes"),
        (f"o\n-1\n{ROOT_B64}\n", "decimal"),
        (f"o\n+1\n{ROOT_B64}\n", "decimal"),
        (f"o\n\u0661\u0662\n{ROOT_B64}\n", "decimal"),  # Arabic-Indic digits: str.isdigit() would accept
        (f"o\n 1\n{ROOT_B64}\n", "decimal"),
        (f"o\n{2**64}\n{ROOT_B64}\n", "64 bits"),
        ("o\n1\n" + base64.b64encode(bytes(31)).decode() + "\n", "31 bytes"),
        ("o\n1\n" + ROOT_B64.rstrip("=") + "\n", "base64"),
        ("o\n1\n" + ROOT_B64[:-2] + "F=\n", "canonical"),
        (f"\n1\n{ROOT_B64}\n", "line 1: empty"),
        (f"o\n1\n{ROOT_B64}\n\next\n", "line 4: empty"),
        ("o\n1\n", "got 2 line"),
        (f"o\n1\n{ROOT_B64}", "newline"),
    ],
)
def test_checkpoint_body_strict_parse(body: str, reason: str) -> None:
    with pytest.raises(note.NoteError, match=reason) as ei:
        note.parse_checkpoint(body)
    _one_line(ei.value)


def test_malformed_checkpoint_body_is_not_signed(key: Ed25519PrivateKey) -> None:
    with pytest.raises(note.NoteError):
        note.sign_checkpoint("o", -1, merkle.EMPTY_ROOT, key, "k")
    with pytest.raises(note.NoteError):
        note.sign_checkpoint("o", 1, b"short", key, "k")
    with pytest.raises(note.NoteError):
        note.sign_checkpoint("", 1, merkle.EMPTY_ROOT, key, "k")


# ------------------------------------------------------------------------------------------------------
# tlog proofs
# ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tlog(key: Ed25519PrivateKey) -> tuple[list[bytes], str]:
    leaves = [f"entry {i}".encode() for i in range(13)]
    cp = note.sign_checkpoint("gradledger.local/t", 13, merkle.root(leaves), key, "gradledger.local/t")
    return leaves, cp


def test_tlog_proof_round_trip_and_verify(key: Ed25519PrivateKey, tlog: tuple[list[bytes], str]) -> None:
    leaves, cp = tlog
    for index in (0, 5, 12):
        proof = merkle.inclusion_proof(leaves, index)
        text = note.format_tlog_proof(index, proof, cp, extra=b"ctx" if index == 5 else None)
        lines = text.split("\n")
        assert lines[0] == "c2sp.org/tlog-proof@v1"
        assert (f"index {index}" in lines[1:3]) and text.endswith(cp)
        parsed = note.parse_tlog_proof(text)
        assert parsed.index == index and list(parsed.proof) == proof and parsed.checkpoint_note == cp
        assert parsed.extra == (b"ctx" if index == 5 else None) and parsed.format() == text
        got, _ = note.verify_tlog_proof(text, merkle.leaf_hash(leaves[index]), key.public_key())
        assert got.size == 13


def test_tampered_tlog_proof_is_rejected(
    key: Ed25519PrivateKey, other_key: Ed25519PrivateKey, tlog: tuple[list[bytes], str]
) -> None:
    leaves, cp = tlog
    proof = merkle.inclusion_proof(leaves, 5)
    text = note.format_tlog_proof(5, proof, cp)
    lh = merkle.leaf_hash(leaves[5])
    for k in range(len(proof)):
        bad = list(proof)
        bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
        with pytest.raises(note.InclusionError, match="does not lead"):
            note.verify_tlog_proof(note.format_tlog_proof(5, bad, cp), lh, key.public_key())
    with pytest.raises(note.InclusionError):
        note.verify_tlog_proof(text.replace("index 5", "index 6"), lh, key.public_key())
    with pytest.raises(note.InclusionError):
        note.verify_tlog_proof(text, merkle.leaf_hash(b"entry 5 edited"), key.public_key())
    with pytest.raises(note.InclusionError, match="outside"):
        note.verify_tlog_proof(note.format_tlog_proof(13, proof, cp), lh, key.public_key())
    with pytest.raises(note.SignatureError):
        note.verify_tlog_proof(text.replace("\n13\n", "\n14\n"), lh, key.public_key())
    with pytest.raises(note.SignatureError):
        note.verify_tlog_proof(text, lh, other_key.public_key())
    with pytest.raises(note.OriginError):
        note.verify_tlog_proof(text, lh, key.public_key(), origin="elsewhere")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t.replace("c2sp.org/tlog-proof@v1", "c2sp.org/tlog-proof@v2"), "line 1"),
        (lambda t: t.replace("index 5", "index 05"), "leading zeroes"),
        (lambda t: t.replace("index 5", "idx 5"), "index <n>"),
        (lambda t: t.replace("index 5\n", "index 5\nnot-base64!\n"), "base64"),
        (lambda t: t.replace("index 5\n", "index 5\nAAAA\n"), "3 bytes"),
        (lambda t: t.replace("\n\n", "\n", 1), "tlog proof line"),
        (lambda t: t.split("\n\n")[0], "no blank line"),
    ],
)
def test_malformed_tlog_proof_is_input_error(tlog: tuple[list[bytes], str], mutate, reason: str) -> None:
    leaves, cp = tlog
    text = note.format_tlog_proof(5, merkle.inclusion_proof(leaves, 5), cp)
    with pytest.raises(note.NoteError, match=reason) as ei:
        note.parse_tlog_proof(mutate(text))
    _one_line(ei.value)


# ------------------------------------------------------------------------------------------------------
# Key files
# ------------------------------------------------------------------------------------------------------


def test_save_and_load_keypair(tmp_path: Path) -> None:
    files = keys.save_keypair(tmp_path / "k", name="example.com/log")
    assert stat.S_IMODE(files.private.stat().st_mode) == 0o600
    assert files.private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert files.public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    line = files.verifier.read_text().strip()
    assert line == files.verifier_key.line and line.startswith("example.com/log+")
    sk = keys.load_private_key(files.private)
    assert keys.public_key_bytes(keys.load_public_key(files.public)) == keys.public_key_bytes(sk.public_key())
    vk = keys.load_verifier(files.verifier)
    assert isinstance(vk, keys.VerifierKey) and vk.name == "example.com/log"
    signed = note.sign_checkpoint(
        "example.com/log", 1, merkle.root([b"x"]), str(files.private), "example.com/log"
    )
    for trusted in (files.public, str(files.public), files.verifier, line):
        assert note.verify_checkpoint(signed, trusted).size == 1
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["ledger.key", "ledger.pub", "ledger.vkey"]
    with pytest.raises(keys.KeyFormatError, match="already exists"):
        keys.save_keypair(tmp_path / "k")
    assert keys.load_private_key(files.private).private_bytes_raw() == sk.private_bytes_raw()


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_bad_private_keys_are_one_line_errors(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    pkcs8 = serialization.PrivateFormat.PKCS8
    cases = {
        "garbage": (b"hello world\n", "not a PEM"),
        "garbled": (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "unreadable"),
        "rsa": (
            rsa_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()),
            "RSA",
        ),
        "ec": (ec_key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()), "EC"),
        "public": (keys.public_key_pem(key.public_key()), "public key"),
        "encrypted": (
            key.private_bytes(
                serialization.Encoding.PEM, pkcs8, serialization.BestAvailableEncryption(b"pw")
            ),
            "encrypted",
        ),
    }
    for name, (data, reason) in cases.items():
        p = _write(tmp_path, name, data)
        with pytest.raises(keys.KeyFormatError, match=reason) as ei:
            keys.load_private_key(p)
        assert str(p) in _one_line(ei.value), name
    with pytest.raises(keys.KeyFormatError, match="no such key file"):
        keys.load_private_key(tmp_path / "missing.key")
    with pytest.raises(keys.KeyFormatError, match="directory"):
        keys.load_private_key(tmp_path)
    with pytest.raises(keys.KeyFormatError):
        note.sign_checkpoint("o", 0, merkle.EMPTY_ROOT, tmp_path / "rsa", "k")


def test_bad_public_keys_are_one_line_errors(tmp_path: Path, key: Ed25519PrivateKey) -> None:
    rsa_pub = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    good = keys.VerifierKey("n", key.public_key()).line
    name, hex_id, b64 = good.split("+", 2)
    blob = base64.b64decode(b64)
    alg2 = base64.b64encode(bytes([2]) + blob[1:]).decode()
    cases = {
        "rsa.pub": (
            rsa_pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo),
            "RSA",
        ),
        "priv.pub": (keys.private_key_pem(key), "private key"),
        "junk.vkey": (b"not a key at all", "verifier key line"),
        "wrongid.vkey": (f"{name}+00000000+{b64}".encode(), "does not match"),
        "alg.vkey": (f"{name}+{hex_id}+{alg2}".encode(), "type 0x02"),
        "short.vkey": (f"{name}+{hex_id}+{base64.b64encode(blob[:20]).decode()}".encode(), "got 20 bytes"),
        "binary.vkey": (b"\xff\xfe\x00", "not UTF-8"),
    }
    for fname, (data, reason) in cases.items():
        p = _write(tmp_path, fname, data)
        with pytest.raises(keys.KeyFormatError, match=reason) as ei:
            keys.load_verifier(p)
        _one_line(ei.value)
    signed = note.sign_checkpoint("o", 0, merkle.EMPTY_ROOT, key, "k")
    with pytest.raises(keys.KeyFormatError):
        note.verify_checkpoint(signed, tmp_path / "rsa.pub")
    with pytest.raises(keys.KeyFormatError, match="not a private key"):
        note.verify_checkpoint(signed, key)


@pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\there", "nbsp\u00a0x", "ctl\x01"])
def test_invalid_key_names(name: str, key: Ed25519PrivateKey) -> None:
    with pytest.raises(keys.KeyFormatError):
        keys.verifier_key_line(name, key.public_key())
