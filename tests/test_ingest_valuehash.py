"""The lean value canonicaliser equals ledger.canonical.canonical_json (the RFC 8785 reference path)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from ledger.canonical import canonical_json
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


def test_benchmark_quick_runs() -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "ingest_bench.py"), "--quick"],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    assert res["labels"] == 2000 and res["median_labels_per_s"] > 0 and res["peak_rss_mib"] > 0
