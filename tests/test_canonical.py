"""Entry encoding: the fast canonical path equals ``rfc8785``; NaN/Inf round trip; leaf data splice; payloads."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import (
    ENTRY_PREFIX,
    CanonicalError,
    canonical_body,
    canonical_json,
    decode_body,
    descriptors_json,
    encode_payload,
    leaf_data,
)

SAFE = 2**53 - 1
floats = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.none() | st.booleans() | st.integers(-SAFE, SAFE) | floats | st.text()
keys = st.text().filter(lambda k: not k.startswith("$"))
json_values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(keys, kids, max_size=5),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_canonical_json_equals_rfc8785(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


@settings(max_examples=150, deadline=None)
@given(st.lists(floats, max_size=20))
def test_float_lists_equal_rfc8785(values: list[float]) -> None:
    # floats are where Python's repr and ECMAScript's number format differ (1e-05 vs 1e-5, 100.0 vs 100)
    assert canonical_json({"x": values}) == rfc8785.dumps({"x": values})


@pytest.mark.parametrize(
    "value",
    [
        1e-7,
        1e-5,
        1e21,
        1e16,
        123456789012345680.0,
        2.0**53,
        2.0**60,
        5e-324,
        -0.0,
        1.0,
        0.1,
        1e-4,
        9999999999999998.0,
    ],
)
def test_float_edge_cases_equal_rfc8785(value: float) -> None:
    assert canonical_json([value]) == rfc8785.dumps([value])


def test_non_ascii_keys_sort_by_utf16_like_rfc8785() -> None:
    body = {"\U0001f600": 1, "\ue000": 2, "a": 3, "é": 4}
    assert canonical_json(body) == rfc8785.dumps(body)


def test_nan_and_infinities_round_trip() -> None:
    body = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": {"d": np.float32("nan")}}
    data = canonical_body(body)
    assert data == (
        b'{"a":{"$float":"NaN"},"b":[{"$float":"Infinity"},{"$float":"-Infinity"},1.5],"c":{"d":{"$float":"NaN"}}}'
    )
    back = decode_body(data)
    assert math.isnan(back["a"]) and math.isnan(back["c"]["d"])
    assert back["b"] == [math.inf, -math.inf, 1.5]


def test_rfc8785_rules_inherited() -> None:
    assert canonical_body({"z": 1.0, "a": -0.0}) == b'{"a":0,"z":1}'
    assert decode_body(canonical_body({"n": np.int64(7), "t": (1, "x"), "b": np.bool_(True)})) == {
        "n": 7,
        "t": [1, "x"],
        "b": True,
    }


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"$float": "NaN"}, "reserved"),
        ({"a": {"$ref": 1}}, "body.a: object key '$ref'"),
        ({"a": [1, 2**60]}, "body.a[1]: integer"),
        ({1: "x"}, "not a string"),
        ({"a": np.zeros(3)}, "payloads"),
        ({"a": object()}, "unsupported type object"),
        ([1, 2], "must be a JSON object"),
    ],
)
def test_bad_bodies_rejected_with_path(body: object, fragment: str) -> None:
    with pytest.raises(CanonicalError, match=None) as info:
        canonical_body(body)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(keys, json_values, max_size=6),
    st.sampled_from(["step", "ledger", "annotation"]),
    st.integers(0, 2**40),
    st.integers(0, 5),
)
def test_leaf_data_splice_equals_whole_object_rfc8785(body: dict, kind: str, seq: int, v: int) -> None:
    prev = hashlib.sha256(str(seq).encode()).digest()
    ts = "2026-11-27T20:01:02.123456Z"
    p = encode_payload("grad_norms", np.arange(6, dtype=np.float32).reshape(2, 3))
    desc = descriptors_json([(p.name, p.dtype, p.shape, p.sha256, len(p.data))])
    whole = {
        "kind": kind,
        "v": v,
        "seq": seq,
        "ts": ts,
        "prev": prev.hex(),
        "body": body,
        "payloads": {"grad_norms": p.descriptor()},
    }
    assert leaf_data(kind, v, seq, ts, prev, canonical_body(body), desc) == ENTRY_PREFIX + rfc8785.dumps(
        whole
    )


def test_descriptors_sorted_and_equal_rfc8785() -> None:
    ps = [encode_payload(n, np.ones(k, dtype=np.int32)) for n, k in [("w", 2), ("B", 1), ("a_1", 3)]]
    got = descriptors_json([(p.name, p.dtype, p.shape, p.sha256, len(p.data)) for p in ps])
    assert got == rfc8785.dumps({p.name: p.descriptor() for p in ps})


def test_payloads_little_endian_c_order_round_trip() -> None:
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    p = encode_payload("x", big)
    assert p.dtype == "<f4" and p.shape == "[2,3]"
    assert p.data == np.arange(6, dtype="<f4").tobytes()
    assert p.sha256 == hashlib.sha256(p.data).digest()
    np.testing.assert_array_equal(p.array(), big)
    fortran = np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3))
    np.testing.assert_array_equal(encode_payload("f", fortran).array(), fortran)
    scalar = encode_payload("s", np.float32(2.5))
    assert scalar.shape == "[]" and scalar.array() == np.float32(2.5)
    for name, arr in [("b", np.array([True, False])), ("u", np.arange(3, dtype=np.uint8))]:
        np.testing.assert_array_equal(encode_payload(name, arr).array(), arr)


@pytest.mark.parametrize(
    "name, array, fragment",
    [
        ("bad name", np.zeros(2), "must match"),
        ("", np.zeros(2), "must match"),
        ("x", np.array(["a", "b"]), "not a fixed-width numeric"),
        ("x", np.array([object()]), "not a fixed-width numeric"),
    ],
)
def test_bad_payloads_rejected(name: str, array: np.ndarray, fragment: str) -> None:
    with pytest.raises(CanonicalError) as info:
        encode_payload(name, array)
    assert fragment in str(info.value)


def test_malformed_descriptor_columns_rejected() -> None:
    with pytest.raises(CanonicalError):
        descriptors_json([("x", '<f4","size":1', "[1]", bytes(32), 4)])
    with pytest.raises(CanonicalError):
        descriptors_json([("x", "<f4", "[1, 2]", bytes(32), 8)])


# Floats outside [1e-4, 1e16) take the placeholder path; strings made of NULs, quotes, backslashes and digits
# are the ones that could be mistaken for a placeholder, so mix the two.
special_floats = st.sampled_from([1e-5, -1e-7, 5e-324, 1e16, 1e21, 2.0**60, 3e-9, 1e300]) | floats
clash_text = st.text(alphabet=st.sampled_from(["\x00", '"', "\\", "u", "0", "1", "2", "a", "é"]), max_size=8)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | special_floats | clash_text | st.integers(-SAFE, SAFE),
        lambda kids: (
            st.lists(kids, max_size=5)
            | st.dictionaries(clash_text.filter(lambda k: not k.startswith("$")), kids, max_size=5)
        ),
        max_leaves=20,
    )
)
def test_special_float_placeholders_equal_rfc8785(value: object) -> None:
    assert canonical_json(value) == rfc8785.dumps(value)


def test_small_floats_stay_on_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    # a DP step body (delta 1e-05) must not send the whole 256-id body through pure-Python rfc8785
    import ledger.canonical as canonical

    seen: list[type] = []
    real = rfc8785.dumps
    monkeypatch.setattr(canonical.rfc8785, "dumps", lambda v: seen.append(type(v)) or real(v))
    body = {
        "example_ids": [f"ex-{i}" for i in range(256)],
        "dp": {"delta": 1e-05, "eps": 0.25},
        "lr": [1e-5] * 4,
    }
    assert canonical_json(body) == real(body)
    assert seen and set(seen) == {float}


def test_precanonical_values_are_spliced_verbatim() -> None:
    from ledger.canonical import CanonicalJSON

    value = {"b": [1.0, 1e-5, "x"], "a": {"$float": "NaN"}}
    raw = CanonicalJSON(rfc8785.dumps(value))
    body = {"value": raw, "z": 1, "ids": [f"i{i}" for i in range(20)], "é": 1e-7}  # non-ASCII key: slow path
    expect = rfc8785.dumps({"value": value, "z": 1, "ids": body["ids"], "é": 1e-7})
    assert canonical_json(body) == expect
    assert canonical_json({k: v for k, v in body.items() if k != "é"}) == rfc8785.dumps(
        {"value": value, "z": 1, "ids": body["ids"]}
    )
    whole = CanonicalJSON(rfc8785.dumps({"a": 1, "b": "c"}))
    assert canonical_body(whole) == bytes(whole)
    with pytest.raises(CanonicalError, match="not a JSON object"):
        canonical_body(CanonicalJSON(b"[1]"))
    # a whole body is taken as it is (no copy); non-ASCII bytes must still be UTF-8
    accented = CanonicalJSON('{"name":"Zoë"}'.encode())
    assert canonical_body(accented) is accented
    with pytest.raises(CanonicalError, match="not UTF-8"):
        canonical_body(CanonicalJSON(b'{"name":"Zo\xeb"}'))


def test_precanonical_bytes_checked_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import ledger.canonical as canonical

    monkeypatch.setattr(canonical, "CHECK_CANONICAL", True)
    with pytest.raises(CanonicalError, match="not in RFC 8785 form"):
        canonical_json({"value": canonical.CanonicalJSON(b'{"b":1,"a":2}')})
    with pytest.raises(CanonicalError, match="not in RFC 8785 form"):
        canonical_body(canonical.CanonicalJSON(b'{"a": 1}'))
    with pytest.raises(CanonicalError, match="not JSON"):
        canonical_json({"value": canonical.CanonicalJSON(b"{")})
    assert canonical_json({"value": canonical.CanonicalJSON(b'{"a":2,"b":1}')}) == b'{"value":{"a":2,"b":1}}'
