"""benchmarks/tracker_variants.py --quick runs every variant, with a baseline tracker module loaded from a file,
and reports sane numbers (speed is not tested)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore")


def test_quick_tracker_benchmark_with_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    import tracker_variants

    baseline = str(ROOT / "instrument" / "tracker.py")  # any copy of the module; here the current one
    assert (
        tracker_variants.main(["--quick", "--json", "--models", "mlp,cnn", "--baseline-tracker", baseline])
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    rows = out["rows"]
    names = {"plain", "norms", "ledger", "ledger_async", "routing_async", "base_ledger", "base_async"}
    for model in ("mlp", "cnn"):
        assert {r["variant"] for r in rows if r["model"] == model} == names
    for r in rows:
        for clock in ("thread", "process", "wall"):
            assert r[f"{clock}_ms"] > 0 and r[f"{clock}_x_plain"] > 0
        if r["variant"] == "plain":
            assert r["thread_x_plain"] == r["process_x_plain"] == r["wall_x_plain"] == 1.0
    assert len(out["load"]) == 2 and out["rounds"] == 2


def test_quick_decomposition_variants(capsys: pytest.CaptureFixture[str]) -> None:
    import tracker_variants

    assert tracker_variants.main(["--quick", "--json", "--models", "mlp", "--decompose"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    decomposed = {"d_structure", "d_losses", "d_updates", "d_entries", "async_pending8"}
    assert decomposed <= {r["variant"] for r in rows}
    for r in rows:
        assert r["thread_ms"] > 0 and r["process_ms"] > 0


def test_step_sink_builds_or_drops_the_step_entries() -> None:
    import tracker_variants

    class Real:
        def append(self, *args: object) -> str:
            return "real"

    built: list[int] = []
    items = [lambda: built.append(1), lambda: built.append(2)]
    drop = tracker_variants._StepSink(Real(), build=False)
    assert drop.append("run") == "real"  # everything but append_many reaches the real ledger
    assert drop.append_many(items) == [] and built == []
    assert tracker_variants._StepSink(Real(), build=True).append_many(items) == [] and built == [1, 2]


def test_quick_hook_timings_with_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    import tracker_hooks

    from instrument import tracker

    before = {h: tracker.Tracker.__dict__[h] for h in tracker_hooks.HOOKS}
    baseline = str(ROOT / "instrument" / "tracker.py")
    assert tracker_hooks.main(["--quick", "--json", "--baseline-tracker", baseline]) == 0
    assert {h: tracker.Tracker.__dict__[h] for h in tracker_hooks.HOOKS} == before  # the wrappers are gone
    out = json.loads(capsys.readouterr().out)
    assert set(out["trackers"]) == {"current", "baseline"}
    steps = out["rounds"] * out["steps"]
    for got in out["trackers"].values():
        assert got["step_ms"] > 0
        # every hook ran in every timed step (one micro-batch per optimizer step), and was timed
        assert got["calls"] == {h: steps for h in (*tracker_hooks.HOOKS, "submit_lazy")}
        assert all(v >= 0 for v in got["hooks_us"].values())
    # the writer's transactions were timed: every timed step of both trackers was appended by one of them
    writer = out["writer"]
    assert writer["steps"] == 2 * steps and writer["transactions"] >= 2
    assert writer["cpu_ms_per_step"] > 0 and writer["cpu_ms_per_transaction"] > 0
