"""Entry encoding: canonical JSON bodies, binary payloads and the leaf data that gets hashed.

Encoding, version 1 (``b"gradledger-entry/1\\n"``)
-------------------------------------------------
* **Bodies** are JSON objects serialised with RFC 8785 (JSON Canonicalization Scheme). The ``rfc8785``
  package is the reference. RFC 8785 has no NaN or infinities, so a float NaN / +Inf / -Inf is written as
  the object ``{"$float": "NaN" | "Infinity" | "-Infinity"}`` and decoded back by :func:`decode_body`.
  Object keys that start with ``$`` are reserved for such encodings and refused in user bodies.
  Other rules inherited from RFC 8785: ``-0.0`` and integral floats serialise as integers (``1.0`` reads back
  as ``1``); integers must lie in the IEEE-754 safe range ``|n| <= 2**53 - 1`` (store larger ones as
  strings); keys must be strings. Tuples encode as arrays; numpy scalars as the Python number they hold.
* **Payloads** are named numpy arrays of a fixed-width numeric or bool dtype, stored as raw little-endian
  C-order bytes. Names match ``[A-Za-z0-9_.-]{1,64}``. Each has a descriptor
  ``{"dtype": "<f4", "sha256": <hex of the stored bytes>, "shape": [256, 16], "size": <bytes>}``.
* **Leaf data** = ``b"gradledger-entry/1\\n"`` + RFC 8785 bytes of
  ``{"body": ..., "kind": ..., "payloads": {name: descriptor}, "prev": <hex>, "seq": n, "ts": ..., "v": n}``.
  The leaf hash is RFC 9162's ``SHA-256(0x00 || leaf data)`` and ``prev`` is the previous entry's leaf hash
  (32 zero bytes for seq 0). Because RFC 8785 output of a sub-object is byte-identical inside its parent,
  :func:`leaf_data` splices the stored canonical body bytes into the outer object instead of re-serialising
  it; ``tests/test_canonical.py`` checks the splice against ``rfc8785.dumps`` of the whole object.

Why a fast path: ``rfc8785`` is pure Python (about 300 us for a 256-example step body, more than the
whole per-entry append budget). :func:`canonical_json` therefore checks, while it walks the value, whether
the C ``json`` encoder provably produces the same bytes -- ASCII keys only (so code-point order equals
RFC 8785's UTF-16 order), integers in the safe range, and floats only where Python's ``repr`` equals the
ECMAScript number format (non-integral magnitudes in [1e-4, 1e16); integral floats below 2**53 become
ints) -- and otherwise falls back to ``rfc8785.dumps``. Hypothesis tests compare both paths byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import rfc8785

from .errors import CanonicalError

ENTRY_PREFIX = b"gradledger-entry/1\n"
ZERO_HASH = bytes(32)
MAX_SAFE_INT = 2**53 - 1

KIND_RE = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
PAYLOAD_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
DTYPE_RE = re.compile(r"[<|][biufc][0-9]{1,2}")
SHAPE_RE = re.compile(r"\[(?:0|[1-9][0-9]*)(?:,(?:0|[1-9][0-9]*))*\]|\[\]")
TS_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")

_FLOAT_NAMES = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _float_marker(x: float) -> dict[str, str]:
    if x != x:
        return {"$float": "NaN"}
    return {"$float": "Infinity" if x > 0 else "-Infinity"}


def _prep(x: Any, path: str, fast: list[bool]) -> Any:
    """Return a JSON-ready copy of ``x`` (markers for NaN/Inf); clear ``fast[0]`` if json != rfc8785."""
    t = type(x)
    if t is str or t is bool or x is None:
        return x
    if t is int:
        if -MAX_SAFE_INT <= x <= MAX_SAFE_INT:
            return x
        raise CanonicalError(
            f"{path}: integer {x} is outside the JSON safe range |n| <= 2**53-1; store it as a string"
        )
    if t is float:
        if math.isnan(x) or math.isinf(x):
            return _float_marker(x)
        ax = abs(x)
        if x.is_integer():
            if ax <= MAX_SAFE_INT:
                return int(x)
            fast[0] = False
            return x
        if not (1e-4 <= ax < 1e16):
            fast[0] = False
        return x
    if t is dict or isinstance(x, Mapping):
        out: dict[str, Any] = {}
        for k, v in x.items():
            if type(k) is not str:
                raise CanonicalError(f"{path}: object key {k!r} is not a string")
            if k.startswith("$"):
                raise CanonicalError(f"{path}: object key {k!r} starts with '$', which is reserved")
            if not k.isascii():
                fast[0] = False
            out[k] = _prep(v, f"{path}.{k}", fast)
        return out
    if t is list or t is tuple:
        if all(type(e) is str for e in x):
            return list(x)
        return [_prep(e, f"{path}[{i}]", fast) for i, e in enumerate(x)]
    if isinstance(x, np.generic):
        if isinstance(x, np.bool_):
            return bool(x)
        if isinstance(x, np.integer):
            return _prep(int(x), path, fast)
        if isinstance(x, np.floating):
            return _prep(float(x), path, fast)
    if isinstance(x, float):  # float subclasses
        return _prep(float(x), path, fast)
    if isinstance(x, int) and not isinstance(x, bool):
        return _prep(int(x), path, fast)
    if isinstance(x, np.ndarray):
        raise CanonicalError(f"{path}: numpy arrays belong in payloads, not in the JSON body")
    raise CanonicalError(f"{path}: unsupported type {type(x).__name__} in an entry body")


def canonical_json(value: Any, path: str = "body") -> bytes:
    """RFC 8785 bytes of ``value`` with the NaN/Inf extension (see module docstring)."""
    fast = [True]
    prepared = _prep(value, path, fast)
    if fast[0]:
        try:
            return json.dumps(
                prepared, ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False
            ).encode("utf-8")
        except UnicodeEncodeError:
            pass  # lone surrogates: let rfc8785 decide
    try:
        return rfc8785.dumps(prepared)
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalError(f"{path}: {exc}") from exc
    except UnicodeEncodeError as exc:
        raise CanonicalError(f"{path}: string is not valid Unicode ({exc.reason})") from exc


def canonical_body(body: Mapping[str, Any]) -> bytes:
    """Canonical bytes of an entry body, which must be a JSON object."""
    if not isinstance(body, Mapping):
        raise CanonicalError(f"body: must be a JSON object (dict), got {type(body).__name__}")
    return canonical_json(body, "body")


def _restore(x: Any) -> Any:
    if type(x) is dict:
        if len(x) == 1 and "$float" in x:
            name = x["$float"]
            if name in _FLOAT_NAMES:
                return _FLOAT_NAMES[name]
        return {k: _restore(v) for k, v in x.items()}
    if type(x) is list:
        return [_restore(e) for e in x]
    return x


def _has_marker(data: bytes) -> bool:
    return b'"$float"' in data


def decode_body(data: bytes) -> dict[str, Any]:
    """Parse stored canonical body bytes back to a dict (``$float`` markers become floats)."""
    obj = json.loads(data)
    if type(obj) is not dict:
        raise CanonicalError("body: stored body is not a JSON object")
    return _restore(obj) if _has_marker(data) else obj


def json_string(s: str) -> bytes:
    """RFC 8785 bytes of one string (fast path for plain printable ASCII, which needs no escaping)."""
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return b'"' + s.encode("ascii") + b'"'
    return rfc8785.dumps(s)


@dataclass(frozen=True)
class EncodedPayload:
    """One payload as stored: name, numpy dtype string, canonical shape JSON, raw bytes and their sha256."""

    name: str
    dtype: str
    shape: str
    data: bytes
    sha256: bytes

    def descriptor(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "sha256": self.sha256.hex(),
            "shape": json.loads(self.shape),
            "size": len(self.data),
        }

    def array(self) -> np.ndarray:
        return payload_array(self.dtype, self.shape, self.data)


def encode_payload(name: str, array: Any) -> EncodedPayload:
    """Validate and serialise one payload array (little-endian, C order)."""
    if not isinstance(name, str) or not PAYLOAD_NAME_RE.fullmatch(name):
        raise CanonicalError(f"payload name {name!r}: must match [A-Za-z0-9_.-]{{1,64}}")
    a = np.asarray(array)
    if a.dtype.kind not in "biufc":
        raise CanonicalError(f"payload {name!r}: dtype {a.dtype} is not a fixed-width numeric or bool dtype")
    a = a.astype(a.dtype.newbyteorder("<"), order="C", copy=False)
    dtype = a.dtype.str
    if not DTYPE_RE.fullmatch(dtype):
        raise CanonicalError(f"payload {name!r}: dtype {dtype} is not supported")
    data = a.tobytes()
    shape = "[" + ",".join(str(int(d)) for d in a.shape) + "]"
    return EncodedPayload(name, dtype, shape, data, hashlib.sha256(data).digest())


def payload_array(dtype: str, shape: str, data: bytes) -> np.ndarray:
    """A read-only numpy view of stored payload bytes."""
    dims = json.loads(shape)
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(dims)


def descriptors_json(items: list[tuple[str, str, str, bytes, int]]) -> bytes:
    """Canonical bytes of ``{name: descriptor}`` from ``(name, dtype, shape_json, sha256, size)`` tuples.

    Names, dtypes and shapes are checked against their strict patterns (ASCII, nothing to escape), so plain
    concatenation in sorted-name order is exactly RFC 8785. Raises ``CanonicalError`` on a malformed column.
    """
    if not items:
        return b"{}"
    parts = []
    for name, dtype, shape, sha, size in sorted(items):
        if (
            not PAYLOAD_NAME_RE.fullmatch(name)
            or not DTYPE_RE.fullmatch(dtype)
            or not SHAPE_RE.fullmatch(shape)
        ):
            raise CanonicalError(
                f"payload {name!r}: malformed descriptor columns (dtype {dtype!r}, shape {shape!r})"
            )
        parts.append(f'"{name}":{{"dtype":"{dtype}","sha256":"{sha.hex()}","shape":{shape},"size":{size}}}')
    return ("{" + ",".join(parts) + "}").encode("ascii")


def leaf_data(kind: str, v: int, seq: int, ts: str, prev: bytes, body: bytes, payloads: bytes) -> bytes:
    """Leaf data from stored columns: the prefix + RFC 8785 of the entry object (keys in sorted order).

    ``body`` and ``payloads`` are already-canonical bytes (``canonical_body`` / ``descriptors_json``).
    """
    return b"".join(
        (
            ENTRY_PREFIX,
            b'{"body":',
            body,
            b',"kind":',
            json_string(kind),
            b',"payloads":',
            payloads,
            b',"prev":"',
            prev.hex().encode("ascii"),
            b'","seq":',
            str(int(seq)).encode("ascii"),
            b',"ts":',
            json_string(ts),
            b',"v":',
            str(int(v)).encode("ascii"),
            b"}",
        )
    )
