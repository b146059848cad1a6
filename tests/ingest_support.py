"""Shared helpers for the ingest tests: fixture paths, a fixed pseudonym key, e-mail extraction."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from pathlib import Path

import pytest

from ledger.ingest.pseudonym import Pseudonymizer

REPO = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
FIXTURES = REPO / "tests" / "fixtures" / "ingest"
KEY = bytes(range(32))
EMAIL = re.compile(rb"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")


def samples() -> Path:
    """The platforms' verbatim SDK fixtures (../shared/samples); skip locally if absent, fail under CI."""
    if not SAMPLES.is_dir():
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(f"{SAMPLES} missing under CI=true")
        pytest.skip(f"{SAMPLES} not present")
    return SAMPLES


def pseud() -> Pseudonymizer:
    return Pseudonymizer(KEY)


def expected_pseudonym(identity: str, key: bytes = KEY) -> str:
    """Independent statement of the pseudonym spec: HMAC-SHA256(key, domain || casefolded e-mail)[:16 bytes]."""
    norm = identity.strip().casefold() if "@" in identity else identity.strip()
    return (
        "anon:" + hmac.new(key, b"gradledger-pseudonym/1\n" + norm.encode(), hashlib.sha256).hexdigest()[:32]
    )


def emails_in(*paths: Path) -> set[bytes]:
    out: set[bytes] = set()
    for p in paths:
        out.update(EMAIL.findall(p.read_bytes()))
    return out


def wrap_v2_label(label_path: Path, out: Path) -> Path:
    """The SDK notebook sample is one label object; a real Export v2 line is a data row holding it."""
    label = json.loads(label_path.read_text())
    row = {
        "data_row": {
            "id": "clx23dr000000000000000001",
            "global_key": "sample.jpg",
            "external_id": "sample.jpg",
        },
        "projects": {
            "clx23proj0000000000000001": {"labels": [label], "project_details": {"workflow_status": "DONE"}}
        },
    }
    out.write_text(json.dumps(row) + "\n")
    return out
