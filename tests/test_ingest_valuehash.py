"""Label values and record bodies: the fast encoders equal the reference ones (RFC 8785, json.dumps)."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import canonical_json
from ledger.errors import CanonicalError
from ledger.ingest.errors import FieldError
from ledger.ingest.record import (
    LabelRecord,
    Review,
    Score,
    Seed,
    SuggestionRecord,
    Workflow,
    WorkflowEvent,
    _plain,
    json_number,
    record_digest,
)
from ledger.ingest.valuehash import canonical_value, value_sha256

REPO = Path(__file__).resolve().parents[1]

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
_keys = st.text(max_size=6).filter(lambda k: not k.startswith("$"))
_json = st.recursive(
    _scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_keys, kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_matches_reference_canonicaliser(value: object) -> None:
    # values reach the hasher after json.loads, so round-trip them the same way
    value = json.loads(json.dumps(value))
    assert canonical_value(value) == canonical_json(value, "value")
    assert value_sha256(value) == hashlib.sha256(canonical_json(value, "value")).hexdigest()


def test_known_vector() -> None:
    # RFC 8785 prints integral floats as integers and sorts keys
    assert canonical_value({"b": 40.0, "a": [1.5, "x", None, True]}) == b'{"a":[1.5,"x",null,true],"b":40}'


@pytest.mark.parametrize("bulk", ["auto", "on"])
def test_benchmark_quick_runs(bulk: str) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ingest_bench.py"), "--quick", "--bulk", bulk],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["labels"] == 2000 and res["median_labels_per_s"] > 0 and res["peak_rss_mib"] > 0
    assert res["bulk"] == bulk


# -- record bodies and digests: msgspec fast path vs the reference encoders -----------------------------------
# ``record._encode`` writes record bodies with msgspec when every number is ``_plain``; ``record._digest``
# writes the record_sha256 text the same way. References: ``rfc8785`` / ``canonical_json`` (bodies) and
# ``json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`` (the digest text, which must not
# change across versions).

_encode_sorted = msgspec.json.Encoder(order="sorted").encode


def _ref_digest(content: dict) -> str:
    text = json.dumps(
        {k: v for k, v in content.items() if k not in ("value", "export", "line", "record_sha256")},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@settings(max_examples=3000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False) | st.integers(min_value=-(2**60), max_value=2**60))
def test_plain_numbers_print_alike(x: float) -> None:
    if _plain(x):
        assert _encode_sorted(x) == json.dumps(x).encode()  # the digest text
        assert _encode_sorted(json_number(x)) == rfc8785.dumps(x)  # the body


def test_plain_number_edges() -> None:
    edges = [0.0, -0.0, 1e-4, -1e-4, math.nextafter(1e-4, 1), math.nextafter(1e15, 0), 1e15 - 1.0,
             math.nextafter(1e16, 0), 0.1 + 0.2, 123456789012345.6, 5e-324, 1e16, 1e21, 2.0**53]  # fmt: skip
    for e in range(-8, 17):
        edges += [1.5 * 10.0**e, -(10.0**e), 1.2345678901234567 * 10.0**e]
    for x in edges:
        if _plain(x):
            assert _encode_sorted(x) == json.dumps(x).encode(), x
            assert _encode_sorted(json_number(x)) == rfc8785.dumps(x), x
    assert not _plain(math.nan) and not _plain(math.inf) and not _plain(1e-5) and not _plain(2**53)


def test_integral_floats_inside_containers_take_the_reference_path() -> None:
    """``json_number`` rewrites top-level numbers only: a nested 40.0 must not be written by msgspec as 40.0."""
    assert _plain(40.0) and _plain({"accepted": True, "score": 0.5}) and _plain([1, "a", 2.5])
    assert not _plain({"score": 40.0}) and not _plain([1, 40.0]) and not _plain({"a": [0.0]})


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_strings_escape_alike(s: str) -> None:
    try:
        fast = _encode_sorted(s)
    except UnicodeEncodeError:  # lone surrogates: the record encoders fall back to json / canonical_json
        return
    assert fast == json.dumps(s, ensure_ascii=False).encode() == rfc8785.dumps(s)


_opt_text = st.none() | st.text(max_size=6)
# Label values for record tests: floats below 2**53 (canonical_json's rfc8785 fallback refuses an integral
# float of 2**53 or more inside a body it cannot take the fast path for, while encoding the same value alone)
_record_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(-(2.0**52), 2.0**52)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(_keys, kids, max_size=4),
    max_leaves=20,
)
_num = (
    st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(min_value=-(2**54), max_value=2**54)
    | st.sampled_from([0.0, -0.0, 1.0, 40.0, 0.5, 1e-5, 1e16])
)
_fin = st.floats(min_value=0, max_value=1e17, allow_nan=False) | st.sampled_from([0.0, 1.0, 15.0, 1e-6])
_records = st.builds(
    LabelRecord,
    source=st.sampled_from(["labelbox", "labelstudio", "jsonl"]),
    format=st.text(max_size=4),
    label_id=st.text(min_size=1, max_size=6),
    item_id=st.text(max_size=6),
    value=_record_values,
    producer_kind=st.sampled_from(["human", "model"]),
    producer=_opt_text,
    global_key=_opt_text,
    project=_opt_text,
    created_at=_opt_text,
    effort_seconds=st.none() | _fin,
    status=st.sampled_from(["submitted", "skipped"]),
    gold=st.booleans(),
    scores=st.lists(st.builds(Score, st.text(max_size=3), _num, _num, _num, st.text(max_size=3)), max_size=2),
    reviews=st.lists(
        st.builds(Review, _opt_text, _opt_text, _opt_text, st.none() | st.text(max_size=3) | _num | st.fixed_dictionaries({"accepted": st.booleans()})),
        max_size=2,
    ),
    workflow=st.none()
    | st.builds(Workflow, _opt_text, _opt_text, st.lists(st.builds(WorkflowEvent, st.text(max_size=3), _opt_text, _opt_text, _opt_text)).map(tuple)),
    seeded_from=st.lists(st.builds(Seed, _opt_text, st.just("prediction"), st.none() | st.integers(0, 10**6)), max_size=2),
    line=st.none() | st.integers(min_value=1, max_value=10**7),
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(_records)
def test_label_record_encode_matches_reference(r: LabelRecord) -> None:
    r.value = json.loads(json.dumps(r.value))
    ref = {"sha256": "ab" * 32, "size": 7, "name": "x.ndjson"}
    try:
        plain_body = r.body(ref)
    except FieldError:  # a value without an RFC 8785 form (e.g. the float 2**53): encode refuses it too
        with pytest.raises(FieldError):
            r.encode(ref)
        return
    assert (
        plain_body["record_sha256"]
        == _ref_digest(plain_body)
        == record_digest(
            {k: v for k, v in plain_body.items() if k not in ("export", "line", "record_sha256")}
        )
    )
    _encodes_like_reference(r, plain_body, ref)  # e.g. an integer beyond 2**53 must be refused by both


def _encodes_like_reference(r: LabelRecord | SuggestionRecord, plain_body: dict, ref: dict | None) -> None:
    """``r.encode`` (the fast path) writes ``canonical_json`` of the reference body with the same
    ``record_sha256``, or refuses exactly when the reference encoder does."""
    try:
        want = canonical_json(plain_body)
    except CanonicalError:
        with pytest.raises(CanonicalError):
            r.encode(ref)
        return
    body, digest = r.encode(ref)
    assert digest == plain_body["record_sha256"]
    assert bytes(body) == want


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=6),
    _record_values,
    st.none() | _num,
    st.none() | st.integers(0, 2**60),
    _opt_text,
)
def test_suggestion_record_encode_matches_reference(
    sid: str, value: object, conf: float | None, cseq: int | None, mv: str | None
) -> None:
    value = json.loads(json.dumps(value))
    r = SuggestionRecord("labelbox", "labelbox.mal", sid, "item", value, confidence=conf, checkpoint_seq=cseq,
                         model_version=mv, line=3)  # fmt: skip
    plain_body = r.body(None)
    assert plain_body["record_sha256"] == _ref_digest(plain_body)
    _encodes_like_reference(r, plain_body, None)  # checkpoint_seq beyond 2**53 must be refused by both
