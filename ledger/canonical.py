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
a plain JSON encoder (``msgspec``'s, sorted keys; it writes what ``json.dumps(..., ensure_ascii=False)``
writes, ~5x faster than the C ``json`` encoder) provably produces the same bytes -- ASCII keys only (so
code-point order equals RFC 8785's UTF-16 order), integers in the safe range, and floats only where the
shortest round-trip repr equals the ECMAScript number format (non-integral magnitudes in [1e-4, 1e16);
integral floats below 2**53 become ints) -- and otherwise falls back to ``rfc8785.dumps``. Hypothesis
tests compare both paths byte for byte.
A float outside that range (e.g. a DP ``delta`` of ``1e-05``, which Python prints as ``1e-05`` and ECMAScript
as ``0.00001``) does not send the whole body to the slow path: the walk puts a placeholder string
(``"\\x00<n>"``, which the encoder writes as ``"\\u0000<n>"``) in its place and the placeholder is replaced by
``rfc8785.dumps`` of that one float. The output is accepted only if it holds exactly as many ``"\\u0000``
sequences as there are placeholders (so no user string can be mistaken for one); otherwise the whole value
goes to ``rfc8785``. The same placeholder carries long lists of plain printable-ASCII strings (a step's 256
example ids), which one ``str.join`` writes faster than the encoder's per-string work.
"""

from __future__ import annotations

import binascii
import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
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
_PLAIN = frozenset({str, bool, _NONE})  # scalars the plain encoder writes exactly as RFC 8785 does


class CanonicalJSON(bytes):
    """RFC 8785 bytes of a JSON value that the caller already produced, to be placed verbatim.

    Put one anywhere in an entry body (or pass one as the whole body) to avoid encoding the same value
    twice -- ingest hashes a label's canonical value (``value_sha256``) and splices the same bytes into the
    body. The bytes are trusted; with ``GRADLEDGER_CHECK_CANONICAL=1`` in the environment (the test suite
    sets it) each one is decoded and re-encoded and a mismatch raises ``CanonicalError``. A wrong splice
    could not hide anything anyway: the leaf hash covers the stored bytes, and ``verify --deep`` re-checks
    that every stored body is canonical.
    """

    __slots__ = ()


CHECK_CANONICAL = os.environ.get("GRADLEDGER_CHECK_CANONICAL", "") not in ("", "0")


def _trusted_text(raw: CanonicalJSON, path: str) -> str:
    if CHECK_CANONICAL:
        try:
            again = canonical_json(_restore(json.loads(raw)), path)
        except ValueError as exc:
            raise CanonicalError(f"{path}: pre-canonicalised bytes are not JSON ({exc})") from exc
        if again != raw:
            raise CanonicalError(f"{path}: pre-canonicalised bytes are not in RFC 8785 form")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CanonicalError(f"{path}: pre-canonicalised bytes are not UTF-8") from exc


class _Slow(Exception):
    """The lean walk met something it does not handle; the full walk takes over."""


_GOOD_KEYS: set[str] = set()  # keys already seen to be ASCII and not reserved (bodies repeat their keys)


def _lean(x: Any, specials: list[str]) -> Any:
    """The common case of ``_Walk.value`` without paths: JSON-native values whose json.dumps is RFC 8785.

    Raises ``_Slow`` for anything else (numpy scalars, tuples, mappings other than dict, large ints,
    non-ASCII or reserved keys, bad input); ``_Walk`` then redoes the value with full checks
    and error paths. About 3x fewer Python operations per node than ``_Walk``.
    """
    t = type(x)
    if t is str or t is bool or x is None:
        return x
    if t is int:
        if -MAX_SAFE_INT <= x <= MAX_SAFE_INT:
            return x
        raise _Slow
    if t is float:
        if x.is_integer():
            if -MAX_SAFE_INT <= x <= MAX_SAFE_INT:
                return int(x)
        elif 1e-4 <= abs(x) < 1e16:
            return x
        elif x != x or x in _INFINITIES:
            return _float_marker(x)
        specials.append(rfc8785.dumps(x).decode("ascii"))
        return f"\x00{len(specials) - 1}"
    if t is dict:
        out = None
        for k, v in x.items():
            if k not in _GOOD_KEYS:
                if type(k) is not str or not k.isascii() or k[:1] == "$":
                    raise _Slow
                if len(_GOOD_KEYS) < 4096:
                    _GOOD_KEYS.add(k)
            nv = _lean(v, specials)
            if nv is not v:
                if out is None:
                    out = dict(x)
                out[k] = nv
        return x if out is None else out
    if t is list:
        if len(x) >= _STR_LIST_MIN:
            try:
                joined = "".join(x)
            except TypeError:
                pass
            else:
                if joined.isascii() and not joined.encode("ascii").translate(None, _NO_ESCAPE):
                    specials.append('["' + '","'.join(x) + '"]')
                    return f"\x00{len(specials) - 1}"
                return x
        lout = None
        for i, v in enumerate(x):
            nv = _lean(v, specials)
            if nv is not v:
                if lout is None:
                    lout = list(x)
                lout[i] = nv
        return x if lout is None else lout
    if t is CanonicalJSON:
        specials.append(_trusted_text(x, "body"))
        return f"\x00{len(specials) - 1}"
    raise _Slow


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
        if t is CanonicalJSON:
            if self.place:
                return self.placeholder(_trusted_text(x, self.path(parts)))
            self.fast = False
            return json.loads(x)  # canonical already: rfc8785 writes it back unchanged
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
_PLACEHOLDER = re.compile(rb'"\\u0000([0-9]+)"')
# Sorted keys, compact, no ASCII escaping: for what the walks prepare (str keys, ASCII-only on the fast
# path, safe ints, floats Python's repr writes the ECMAScript way) the same bytes as
# ``json.dumps(..., ensure_ascii=False, separators=(",", ":"), sort_keys=True)``, ~5x faster (the C json
# encoder builds and joins a str per token). Lone surrogates raise UnicodeEncodeError, as json's output did
# when encoded to UTF-8.
_dumps_fast = msgspec.json.Encoder(order="sorted").encode


def _with_specials(text: bytes, specials: list[str]) -> bytes | None:
    """Put each placeholder's RFC 8785 text in its place; None if a user string could be mistaken for one."""
    if text.count(b'"\\u0000') != len(specials):
        return None
    return _PLACEHOLDER.sub(lambda m: specials[int(m[1])].encode("utf-8"), text)


def canonical_json(value: Any, path: str = "body") -> bytes:
    """RFC 8785 bytes of ``value`` with the NaN/Inf extension (see module docstring)."""
    specials: list[str] = []
    text: bytes | None
    try:
        text = _dumps_fast(_lean(value, specials))
        if specials:
            text = _with_specials(text, specials)
        if text is not None:
            return text
    except (_Slow, UnicodeEncodeError):
        pass
    walk = _Walk(path)
    prepared = walk.value(value, ())
    if walk.fast:
        try:
            text = _dumps_fast(prepared)
            if walk.specials:
                text = _with_specials(text, walk.specials)
            if text is not None:
                return text
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
    """Canonical bytes of an entry body, which must be a JSON object (or ``CanonicalJSON`` of one).

    A ``CanonicalJSON`` body is returned as it is (it is ``bytes``): no copy and, for ASCII text, no UTF-8
    decode, as an ingest appends ~1.7 KB of them per label (the two cost ~1-2 us per label).
    """
    if type(body) is CanonicalJSON:
        if body[:1] != b"{":
            raise CanonicalError("body: pre-canonicalised body is not a JSON object")
        if CHECK_CANONICAL or not body.isascii():
            _trusted_text(body, "body")
        return body
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


_JSON_STRINGS: dict[str, bytes] = {}  # kinds and batch timestamps repeat from entry to entry


def json_string(s: str) -> bytes:
    """RFC 8785 bytes of one string (fast path for plain printable ASCII, which needs no escaping)."""
    hit = _JSON_STRINGS.get(s)
    if hit is not None:
        return hit
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        out = b'"' + s.encode("ascii") + b'"'
    else:
        out = rfc8785.dumps(s)
    if len(_JSON_STRINGS) >= 4096:
        _JSON_STRINGS.clear()
    _JSON_STRINGS[s] = out
    return out


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


# (name, dtype, shape) already pattern-checked -> the descriptor's bytes before and after the sha256 hex
_CHECKED_DESCRIPTORS: dict[tuple[str, str, str], tuple[bytes, bytes]] = {}


def descriptor_frame(name: str, dtype: str, shape: str) -> tuple[bytes, bytes]:
    """The descriptor bytes around the sha256 hex: ``head + hex + tail + b"%d}" % size`` (validated, cached)."""
    frame = _CHECKED_DESCRIPTORS.get((name, dtype, shape))
    if frame is None:
        descriptors_json([(name, dtype, shape, ZERO_HASH, 0)])  # validates and caches the frame
        frame = _CHECKED_DESCRIPTORS.get((name, dtype, shape))
        if frame is None:  # cache full
            frame = (
                f'"{name}":{{"dtype":"{dtype}","sha256":"'.encode("ascii"),
                f'","shape":{shape},"size":'.encode("ascii"),
            )
    return frame


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
        frame = _CHECKED_DESCRIPTORS.get(key)
        if frame is None:
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
            frame = (
                f'"{name}":{{"dtype":"{dtype}","sha256":"'.encode("ascii"),
                f'","shape":{shape},"size":'.encode("ascii"),
            )
            if len(_CHECKED_DESCRIPTORS) < 4096:
                _CHECKED_DESCRIPTORS[key] = frame
        parts.append(b"%s%s%s%d}" % (frame[0], binascii.hexlify(sha), frame[1], size))
    return b"{" + b",".join(parts) + b"}"


_LEAF_FORMAT = ENTRY_PREFIX + b'{"body":%s,"kind":%s,"payloads":%s,"prev":"%s","seq":%d,"ts":%s,"v":%d}'


def leaf_data(kind: str, v: int, seq: int, ts: str, prev: bytes, body: bytes, payloads: bytes) -> bytes:
    """Leaf data from stored columns: the prefix + RFC 8785 of the entry object (keys in sorted order).

    ``body`` and ``payloads`` are already-canonical bytes (``canonical_body`` / ``descriptors_json``).
    A column of the wrong type (str where bytes belong, a non-number seq or v) raises TypeError.
    """
    return _LEAF_FORMAT % (
        body,
        json_string(kind),
        payloads,
        binascii.hexlify(prev),
        int(seq),
        json_string(ts),
        int(v),
    )


# RFC 9162 leaf prefix + leaf data, formatted in one go: % (body, json kind, descriptors, hex prev, seq, json ts, v)
LEAF_HASH_INPUT = b"\x00" + _LEAF_FORMAT


def leaf_hash_of(kind: str, v: int, seq: int, ts: str, prev: bytes, body: bytes, payloads: bytes) -> bytes:
    """RFC 9162 leaf hash ``SHA-256(0x00 || leaf_data(...))`` without building the leaf data twice."""
    return hashlib.sha256(
        LEAF_HASH_INPUT
        % (body, json_string(kind), payloads, binascii.hexlify(prev), int(seq), json_string(ts), int(v))
    ).digest()
