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
A float outside that range (e.g. a DP ``delta`` of ``1e-05``, which Python prints as ``1e-05`` and ECMAScript
as ``0.00001``) does not send the whole body to the slow path: the walk puts a placeholder string
(``"\\x00<n>"``, which ``json`` writes as ``"\\u0000<n>"``) in its place and the placeholder is replaced by
``rfc8785.dumps`` of that one float. The output is accepted only if it holds exactly as many ``"\\u0000``
sequences as there are placeholders (so no user string can be mistaken for one); otherwise the whole value
goes to ``rfc8785``. The same placeholder carries long lists of plain printable-ASCII strings (a step's 256
example ids), which one ``str.join`` writes ~10x faster than the C encoder's per-string calls.
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


_NONE = type(None)
_PLAIN = frozenset({str, bool, _NONE})  # scalars the C json encoder writes exactly as RFC 8785 does


class _Walk:
    """State of one canonicalisation walk: ``fast`` stays True while json.dumps output == RFC 8785 output.

    ``specials`` are RFC 8785 texts written by the walk itself (floats whose Python repr differs from the
    ECMAScript format, long lists of plain strings); each was replaced by the placeholder string
    ``"\\x00<index>"`` in the prepared value (see the module docstring).
    """

    __slots__ = ("fast", "root", "specials", "place")

    def __init__(self, root: str, place: bool = True) -> None:
        self.fast = True
        self.root = root
        self.specials: list[str] = []
        self.place = place  # False: keep special floats as floats (for the rfc8785 fallback)

    def path(self, parts: tuple[object, ...]) -> str:
        return self.root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts)

    def number(self, x: Any, parts: tuple[object, ...]) -> Any:
        if type(x) is int:
            if -MAX_SAFE_INT <= x <= MAX_SAFE_INT:
                return x
            raise CanonicalError(
                f"{self.path(parts)}: integer {x} is outside the JSON safe range |n| <= 2**53-1; store it as a string"
            )
        if x != x or x in _INFINITIES:
            return _float_marker(x)
        ax = abs(x)
        if x.is_integer():
            if ax <= MAX_SAFE_INT:
                return int(x)
        elif 1e-4 <= ax < 1e16:
            return x
        if not self.place:
            self.fast = False
            return x
        return self.placeholder(rfc8785.dumps(x).decode("ascii"))

    def placeholder(self, raw_json: str) -> str:
        self.specials.append(raw_json)
        return f"\x00{len(self.specials) - 1}"

    def value(self, x: Any, parts: tuple[object, ...]) -> Any:
        """A JSON-ready version of ``x``; the same object when nothing needs to change."""
        t = type(x)
        if t in _PLAIN:
            return x
        if t is int or t is float:
            return self.number(x, parts)
        if t is list or t is tuple:
            if len(x) >= _STR_LIST_MIN and self.place:
                try:
                    joined = "".join(x)  # TypeError unless every element is a str
                except TypeError:
                    pass
                else:
                    # Plain printable ASCII without quote or backslash needs no escaping in either encoder:
                    # write the list here in one join instead of one C-encoder call per string.
                    if joined.isascii() and not joined.encode("ascii").translate(None, _NO_ESCAPE):
                        return self.placeholder('["' + '","'.join(x) + '"]')
                    return x
            types = set(map(type, x))
            if types <= _PLAIN:
                return x
            # Whole-list checks at C speed (map/min/max) before any per-element Python work.
            if types <= _INT_PLAIN:
                ints = [e for e in x if type(e) is int]
                if min(ints) >= -MAX_SAFE_INT and max(ints) <= MAX_SAFE_INT:
                    return x
            elif types == _FLOAT_ONLY and not any(map(math.isnan, x)):
                mags = list(map(abs, x))  # NaN excluded above, so min/max are exact
                if min(mags) >= 1e-4 and max(mags) < 1e16 and not any(map(float.is_integer, x)):
                    return x
            return [self.value(e, (*parts, i)) for i, e in enumerate(x)]
        if t is dict or isinstance(x, Mapping):
            changed = t is not dict
            out_d: dict[str, Any] = {}
            for k, v in x.items():
                if type(k) is not str:
                    raise CanonicalError(f"{self.path(parts)}: object key {k!r} is not a string")
                if k[:1] == "$":
                    raise CanonicalError(
                        f"{self.path(parts)}: object key {k!r} starts with '$', which is reserved"
                    )
                if not k.isascii():
                    self.fast = False
                v2 = self.value(v, (*parts, k))
                changed = changed or v2 is not v
                out_d[k] = v2
            return out_d if changed else x
        if isinstance(x, np.generic):
            if isinstance(x, np.bool_):
                return bool(x)
            if isinstance(x, np.integer):
                return self.number(int(x), parts)
            if isinstance(x, np.floating):
                return self.number(float(x), parts)
        if isinstance(x, bool):
            return bool(x)
        if isinstance(x, int):
            return self.number(int(x), parts)
        if isinstance(x, float):
            return self.number(float(x), parts)
        if isinstance(x, str):
            return str(x)
        if isinstance(x, np.ndarray):
            raise CanonicalError(f"{self.path(parts)}: numpy arrays belong in payloads, not in the JSON body")
        raise CanonicalError(f"{self.path(parts)}: unsupported type {type(x).__name__} in an entry body")


_INFINITIES = (math.inf, -math.inf)
# ASCII bytes that both encoders write verbatim inside a string (printable, not '"' or '\\')
_NO_ESCAPE = bytes(c for c in range(0x20, 0x7F) if c not in (0x22, 0x5C))
_STR_LIST_MIN = 16  # string lists at least this long are written by join (e.g. a step's example ids)
_INT_PLAIN = frozenset({int, str, bool, _NONE})
_FLOAT_ONLY = {float}
_PLACEHOLDER = re.compile(r'"\\u0000([0-9]+)"')
_dumps_fast = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), sort_keys=True, allow_nan=False, check_circular=False
).encode


def _with_specials(text: str, specials: list[str]) -> str | None:
    """Put each placeholder's RFC 8785 text in its place; None if a user string could be mistaken for one."""
    if text.count('"\\u0000') != len(specials):
        return None
    return _PLACEHOLDER.sub(lambda m: specials[int(m[1])], text)


def canonical_json(value: Any, path: str = "body") -> bytes:
    """RFC 8785 bytes of ``value`` with the NaN/Inf extension (see module docstring)."""
    walk = _Walk(path)
    prepared = walk.value(value, ())
    if walk.fast:
        try:
            text: str | None = _dumps_fast(prepared)
            if walk.specials:
                text = _with_specials(text, walk.specials)  # type: ignore[arg-type]
            if text is not None:
                return text.encode("utf-8")
        except UnicodeEncodeError:
            pass  # lone surrogates: let rfc8785 decide
    if walk.specials:
        prepared = _Walk(path, place=False).value(value, ())  # real floats: rfc8785 formats them itself
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


_CHECKED_DESCRIPTORS: set[tuple[str, str, str]] = set()  # (name, dtype, shape) already pattern-checked


def descriptors_json(items: list[tuple[str, str, str, bytes, int]]) -> bytes:
    """Canonical bytes of ``{name: descriptor}`` from ``(name, dtype, shape_json, sha256, size)`` tuples.

    Names, dtypes and shapes are checked against their strict patterns (ASCII, nothing to escape), so plain
    concatenation in sorted-name order is exactly RFC 8785. Raises ``CanonicalError`` on a malformed column.
    """
    if not items:
        return b"{}"
    parts = []
    for name, dtype, shape, sha, size in sorted(items) if len(items) > 1 else items:
        key = (name, dtype, shape)
        if key not in _CHECKED_DESCRIPTORS:
            if not (
                isinstance(name, str)
                and isinstance(dtype, str)
                and isinstance(shape, str)
                and PAYLOAD_NAME_RE.fullmatch(name)
                and DTYPE_RE.fullmatch(dtype)
                and SHAPE_RE.fullmatch(shape)
            ):
                raise CanonicalError(
                    f"payload {name!r}: malformed descriptor columns (dtype {dtype!r}, shape {shape!r})"
                )
            if len(_CHECKED_DESCRIPTORS) < 4096:
                _CHECKED_DESCRIPTORS.add(key)
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
