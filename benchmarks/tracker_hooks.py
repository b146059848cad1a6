"""Thread CPU time of each of the tracker's hooks inside a training loop (the table in BENCHMARKS.md, "where
the tracker's cost goes").

    .venv/bin/python benchmarks/tracker_hooks.py --model mlp --batch 64 --rounds 100
    .venv/bin/python benchmarks/tracker_hooks.py --model transformer --batch 64 --rounds 15 \
        --baseline-tracker /tmp/exp/tracker_before.py     # paired: old and new tracker alternate
    .venv/bin/python benchmarks/tracker_hooks.py --quick  # seconds; tests/test_tracker_bench.py

Each hook of ``instrument.tracker.Tracker`` (and ``StepWriter.submit_lazy``) is wrapped to add its own
``time.thread_time`` to a list; the loop is the benchmark's (``tracker_variants``: zero_grad, forward, mean
cross-entropy, backward, SGD step, background writer into a SQLite ledger), 8 steps per round plus a flush.
Small hooks cost 3-5x their warm micro-benchmark time here (the step's kernels have just evicted the
interpreter's caches), which is why they are timed in the loop. ``--baseline-tracker FILE`` runs the tracker
module from FILE too, alternating with the current one round by round (the order swaps every round), and
prints both, with each one's median step time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HOOKS = (
    "_route",
    "_on_model_input",
    "_on_criterion",
    "_end_micro",
    "_snapshot",
    "_on_step_pre",
    "_on_step_post",
)


def _timed(cls: type, name: str, into: dict[str, list[float]], undo: list[Callable[[], None]]) -> None:
    orig = cls.__dict__[name]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.thread_time()
        try:
            return orig(*args, **kwargs)
        finally:
            into.setdefault(name, []).append(time.thread_time() - t0)

    setattr(cls, name, wrapper)
    undo.append(lambda: setattr(cls, name, orig))


def _instrumented(module: Any, undo: list[Callable[[], None]]) -> dict[str, list[float]]:
    """Wrap the hooks of one tracker module (``undo`` gets what restores them); returns where times go."""
    times: dict[str, list[float]] = {}
    for name in HOOKS:
        _timed(module.Tracker, name, times, undo)
    _timed(module.StepWriter, "submit_lazy", times, undo)
    return times


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tracker_variants

    from instrument import tracker

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"))
    ap.add_argument("--batch", type=int, default=None, help="default 64 (quick: 8)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of 8 steps (default 50; quick 2)")
    ap.add_argument("--baseline-tracker", metavar="FILE", help="also time the tracker module from FILE")
    ap.add_argument("--quick", action="store_true", help="a tiny model, 2 rounds: seconds")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rounds = args.rounds or (2 if args.quick else 50)
    steps = 2 if args.quick else 8
    modules: dict[str, Any] = {"current": tracker}
    if args.baseline_tracker:
        modules["baseline"] = sys.modules[tracker_variants._load_tracker(args.baseline_tracker).__module__]
    undo: list[Callable[[], None]] = []
    try:
        hook_times = {name: _instrumented(mod, undo) for name, mod in modules.items()}
        out = _run(
            args.model,
            args.batch or (8 if args.quick else 64),
            args.quick,
            rounds,
            steps,
            modules,
            hook_times,
        )
    finally:
        for restore in undo:  # the tracker classes as they were (this may run inside a test session)
            restore()
    if args.json:
        print(json.dumps({"model": args.model, "rounds": rounds, "steps": steps, "trackers": out}, indent=1))
        return 0
    print(
        f"{args.model}, {rounds} rounds x {steps} steps, thread CPU medians (step in ms, hooks in us per call)"
    )
    print(f"{'hook':<18}" + "".join(f"{n:>12}" for n in out))
    print(f"{'step (ms)':<18}" + "".join(f"{o['step_ms']:12.2f}" for o in out.values()))
    for h in (*HOOKS, "submit_lazy"):
        print(f"{h:<18}" + "".join(f"{o['hooks_us'].get(h, float('nan')):12.1f}" for o in out.values()))
    return 0


def _run(
    model: str,
    batch: int,
    quick: bool,
    rounds: int,
    steps: int,
    modules: dict[str, Any],
    hook_times: dict[str, dict[str, list[float]]],
) -> dict[str, Any]:
    import tracker_variants
    from step_overhead import Workload

    base, x, y = Workload(model, batch, quick).build()
    loops: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        name: tracker_variants._tracked_pair(copy.deepcopy(base), x, y, False, None, attach=mod.attach)
        for name, mod in modules.items()
    }
    for step, flush in loops.values():  # warm-up
        for _ in range(2):
            step()
        flush()
    for t in hook_times.values():
        t.clear()
    step_times: dict[str, list[float]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            step, flush = loops[name]
            t0 = time.thread_time()
            for _ in range(steps):
                step()
            flush()
            step_times[name].append((time.thread_time() - t0) / steps)
    return {
        name: {
            "step_ms": statistics.median(step_times[name]) * 1e3,
            "hooks_us": {h: statistics.median(v) * 1e6 for h, v in hook_times[name].items()},
            "calls": {h: len(v) for h, v in hook_times[name].items()},
        }
        for name in loops
    }


if __name__ == "__main__":
    sys.exit(main())
