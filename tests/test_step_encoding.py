"""Step entries v2 store routing weights as distinct rows (body) + a per-sample row index (u1/u2 payload):
the [B, L] float32 array comes back bit for bit, v1 entries (a ``weights`` payload) still read, malformed
encodings are refused; and the scale benchmark's quick mode runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ledger import Ledger
from ledger.records import STEP_VERSION, StepRecord, encode_weights, step_weights

ROOT = Path(__file__).resolve().parents[1]


def _body(b: int, n_l: int, **extra: object) -> dict[str, object]:
    return {
        "run": "r", "run_seq": 1, "step": 0, "epoch": 0, "example_ids": [f"e{i}" for i in range(b)],
        "layers": [f"l{j}" for j in range(n_l)], "micro_batches": [b], "lr": [0.1] * n_l,
        "update_norms": None, "policy_seq": None, "flags": {}, **extra,
    }  # fmt: skip


@pytest.mark.parametrize(("rows", "dtype"), [(1, None), (5, "uint8"), (256, "uint8"), (300, "uint16")])
def test_weights_round_trip_bit_exact(rows: int, dtype: str | None) -> None:
    rng = np.random.default_rng(rows)
    table = rng.random((rows, 7)).astype(np.float32)
    table[0] = [1 / 3, 0.1, 0.0, 1.0, 2e-38, 0.7, 1e-45]  # awkward float32 values (incl. subnormals)
    pick = np.concatenate([np.arange(rows), rng.integers(0, rows, 400)])
    w = table[pick]
    body_rows, index = encode_weights(w)
    assert len(body_rows) == rows
    assert (index is None) == (dtype is None) and (index is None or index.dtype == np.dtype(dtype))
    # through canonical JSON and the ledger's payload bytes, as a reader sees it
    body = json.loads(json.dumps(_body(len(pick), 7, weight_rows=body_rows)))
    payloads = {} if index is None else {"weight_index": np.frombuffer(index.tobytes(), index.dtype)}
    got = step_weights(body, payloads)
    assert got is not None and got.dtype == np.float32
    assert got.tobytes() == w.tobytes()


def test_v1_and_v2_entries_read_the_same(tmp_path: Path) -> None:
    w = np.array([[1, 1, 0], [1, 0.5, 0], [1, 1, 0], [0, 0, 0]], np.float32)
    norms = np.arange(12, dtype=np.float32).reshape(4, 3)
    rows, index = encode_weights(w)
    with Ledger.open(tmp_path / "l.db", create=True) as led:
        s1 = led.append("step", _body(4, 3), {"grad_norms": norms, "weights": w})
        s2 = led.append(
            "step",
            _body(4, 3, weight_rows=rows),
            {"grad_norms": norms, "weight_index": index},
            v=STEP_VERSION,
        )
        r1, r2 = StepRecord.from_entry(led.entry(s1)), StepRecord.from_entry(led.entry(s2))
        np.testing.assert_array_equal(r1.weights, w)
        assert r2.weights.tobytes() == w.tobytes()
        assert led.entry(s2).descriptors["weight_index"]["size"] == 4  # one byte per sample, not 4·L
        assert led.verify().ok


@pytest.mark.parametrize(
    ("rows", "index"),
    [
        ([[1.0, 1.0]], np.zeros(3, np.uint8)),  # wrong number of layers
        ([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], None),  # two rows but no index
        ([[1.0, 1.0, 1.0]], np.array([0, 1, 0, 0], np.uint8)),  # index past the table
        ([[1.0, 1.0, 1.0]], np.zeros(3, np.uint8)),  # index shorter than the batch
        ([[1.0, 1.0, 1.0]], np.zeros(4, np.int8)),  # signed index type
        ([], None),  # no rows
        ("1,1,1", None),  # not a list
    ],
)
def test_malformed_weight_encodings_are_refused(rows: object, index: np.ndarray | None) -> None:
    body = _body(4, 3, weight_rows=rows)
    assert step_weights(body, {} if index is None else {"weight_index": index}) is None


def test_scale_benchmark_quick() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--quick", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    res = json.loads(out.stdout)["sqlite"]
    assert res["steps"] == res["full_run_steps"] == 2 * (8192 // 64)
    assert res["append_over_hash"] > 1
    # the grad_norms alone are 4 bytes per sample-layer-step; the stored ledger holds at least that
    assert res["logical_bytes_per_step"]["grad_norms"] == 64 * 16 * 4
    assert res["core_bytes_per_sample_layer_step"] >= 4.0
    assert (
        res["verify_s"] > 0
        and res["query_layer_ms"]
        and res["inclusion_proof_ms"]["entries"] == res["steps"] + 2
    )
