"""The tracker's optional wiring: gradient sketches in step entries, weights in a state store, and the query
aggregates maintained from the very first step (not back-filled later by a query)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
from torch import nn

import instrument
from instrument.sketch import Sketcher, StateMismatch, StateStore
from ledger.records import checkpoints, run_record
from ledger.store import Ledger

ROOT = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_sketches_and_states_are_recorded_by_the_tracker(tmp_path: Path) -> None:
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    ids = [f"e{i}" for i in range(8)]
    led = Ledger.open(tmp_path / "l.db", create=True)
    model, crit = _model(), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sk = Sketcher(model, ["0", "2"], k=16, seed=3, methods={"2": "rank1"})
    store = StateStore(StateStore.beside(tmp_path / "l.db"))
    tr = instrument.attach(model, opt, ledger=led, run="r", criterion=crit, sketch=sk, states=store)
    with tr.batch(ids):
        crit(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    tr.close()
    assert not sk._handles, "close() removes the sketcher's hooks"

    # an independent sketch of the same first batch from the same initial weights
    ref_model = _model()
    ref = Sketcher(ref_model, ["0", "2"], k=16, seed=3, methods={"2": "rank1"})
    crit(ref_model(x), y).backward()
    want = ref.collect(expected_rows=8)
    step = next(e for e in led.entries(kind="step"))
    assert set(want) <= set(step.payloads)
    for key, arr in want.items():
        np.testing.assert_array_equal(step.payloads[key], arr)
    assert run_record(led, "r").body["sketch"] == ref.body()

    (final,) = checkpoints(led, "r")
    state = store.load(final)  # re-hashed against the checkpoint entry
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v)
    path = store.path(final.state_dict_sha256)
    altered = dict(state)
    altered["0.bias"] = altered["0.bias"] + 1
    torch.save(altered, path)
    try:
        store.load(final)
    except StateMismatch as exc:
        assert "0.bias" in str(exc)
    else:
        raise AssertionError("an altered state file must be refused")


def test_query_aggregates_are_maintained_from_the_first_step(tmp_path: Path) -> None:
    """In a fresh interpreter that never imports audit itself, the first step entry already updates the
    aggregate tables in its own transaction (the meta row records the indexer before any query runs)."""
    db = tmp_path / "l.db"
    script = textwrap.dedent(
        f"""
        import sys, torch
        from torch import nn
        import instrument
        from ledger.store import Ledger
        led = Ledger.open({str(db)!r}, create=True)
        model = nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = instrument.attach(model, opt, ledger=led, run="r", max_pending=0)
        with tr.batch(["a", "b"]):
            model(torch.randn(2, 4)).sum().backward(); opt.step(); opt.zero_grad()
        tr.flush()
        assert "audit.query" not in sys.modules
        """
    )
    subprocess.run([sys.executable, "-c", script], cwd=ROOT, check=True, timeout=120)
    led = Ledger.open(db)
    with led.engine.connect() as conn:
        meta = dict(conn.exec_driver_sql("SELECT key, value FROM meta WHERE key LIKE 'indexer:%'").fetchall())
        steps = conn.exec_driver_sql("SELECT count(*) FROM qa_steps").scalar()
    assert meta.get("indexer:query_aggregates") == "audit.aggregates"
    assert steps == 1
    assert led.verify(deep=True).ok
