"""sha256 of a label value's RFC 8785 bytes, fast for values that came out of ``json.loads``.

Why not only ``ledger.canonical.canonical_json``: that walk carries a path for error messages and handles
numpy and NaN, which costs ~3x more per node than a value parsed from strict JSON needs. This lean walk
turns integral floats into ints (RFC 8785 prints ``40.0`` as ``40``) and checks that ``json.dumps`` will
print every other float and key exactly as RFC 8785 does (ASCII keys, floats in [1e-4, 1e16)); anything
else goes to ``canonical_json``. ``tests/test_ingest_valuehash.py`` compares the two on generated values.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ledger.canonical import canonical_json

_MAX_SAFE = 2**53 - 1
_dumps = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, check_circular=False
).encode


class _Slow(Exception):
    pass


def _prep(x: Any) -> Any:
    t = type(x)
    if t is str or t is bool or x is None:
        return x
    if t is float:
        if x.is_integer():
            if -_MAX_SAFE <= x <= _MAX_SAFE:
                return int(x)
            raise _Slow
        if 1e-4 <= abs(x) < 1e16:
            return x
        raise _Slow
    if t is int:
        if -_MAX_SAFE <= x <= _MAX_SAFE:
            return x
        raise _Slow
    if t is dict:
        out = None
        for k, v in x.items():
            if not k.isascii() or k[:1] == "$":
                raise _Slow
            nv = _prep(v)
            if nv is not v:
                if out is None:
                    out = dict(x)
                out[k] = nv
        return x if out is None else out
    if t is list:
        lout = None
        for i, v in enumerate(x):
            nv = _prep(v)
            if nv is not v:
                if lout is None:
                    lout = list(x)
                lout[i] = nv
        return x if lout is None else lout
    raise _Slow


def canonical_value(value: Any) -> bytes:
    """RFC 8785 bytes of ``value`` (identical to ``ledger.canonical.canonical_json(value)``)."""
    try:
        return _dumps(_prep(value)).encode("utf-8")
    except (_Slow, UnicodeEncodeError):
        return canonical_json(value, "value")


def value_sha256(value: Any) -> str:
    return hashlib.sha256(canonical_value(value)).hexdigest()
