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

It also times the background writer's transactions (``Ledger.append_many`` on the writer thread): thread CPU
per transaction and per step, for the group size that ``--max-pending`` gives (default: attach's). ``--impl
DIR`` imports ``instrument``, ``ledger`` and ``audit`` from another checkout (e.g. ``git archive REV
instrument ledger audit | tar -x -C DIR``), for a before/after of the ledger side: run the command once with
and once without it, alternating.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
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


def _writer_appends(store: Any, into: list[tuple[int, float]], undo: list[Callable[[], None]]) -> None:
    """Record (entries, thread CPU seconds) of every ``Ledger.append_many`` the step writer's thread makes."""
    orig = store.Ledger.__dict__["append_many"]

    def wrapper(self: Any, entries: Any) -> Any:
        if threading.current_thread().name != "gradledger-step-writer":
            return orig(self, entries)
        entries = list(entries)
        t0 = time.thread_time()
        try:
            return orig(self, entries)
        finally:
            into.append((len(entries), time.thread_time() - t0))

    store.Ledger.append_many = wrapper
    undo.append(lambda: setattr(store.Ledger, "append_many", orig))


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    impl = next((a.split("=", 1)[1] for a in args_list if a.startswith("--impl=")), None)
    if "--impl" in args_list[:-1]:
        impl = args_list[args_list.index("--impl") + 1]
    if impl is not None:  # before anything imports the packages
        if any(m in sys.modules for m in ("instrument", "ledger", "audit")):
            raise SystemExit(
                "--impl: instrument/ledger/audit are already imported; run this file as a script"
            )
        sys.path.insert(0, impl)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tracker_variants

    from instrument import tracker
    from ledger import store

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mlp", choices=("mlp", "cnn", "transformer"))
    ap.add_argument("--batch", type=int, default=None, help="default 64 (quick: 8)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of 8 steps (default 50; quick 2)")
    ap.add_argument("--baseline-tracker", metavar="FILE", help="also time the tracker module from FILE")
    ap.add_argument("--max-pending", type=int, default=None, help="attach's max_pending (default: its own)")
    ap.add_argument(
        "--impl", metavar="DIR", help="import instrument/ledger/audit from DIR (write --impl=DIR)"
    )
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
    appends: list[tuple[int, float]] = []
    try:
        hook_times = {name: _instrumented(mod, undo) for name, mod in modules.items()}
        _writer_appends(store, appends, undo)
        batch = args.batch or (8 if args.quick else 64)
        out = _run(
            args.model, batch, args.quick, rounds, steps, modules, hook_times, args.max_pending, appends
        )
    finally:
        for restore in undo:  # the classes as they were (this may run inside a test session)
            restore()
    n_steps = sum(n for n, _ in appends)
    writer = {
        "transactions": len(appends),
        "steps": n_steps,
        "cpu_ms_per_transaction": statistics.median(t for _, t in appends) * 1e3 if appends else None,
        "cpu_ms_per_step": sum(t for _, t in appends) / n_steps * 1e3 if n_steps else None,
    }
    if args.json:
        print(
            json.dumps(
                {"model": args.model, "rounds": rounds, "steps": steps, "trackers": out, "writer": writer},
                indent=1,
            )
        )
        return 0
    print(
        f"{args.model}, {rounds} rounds x {steps} steps, thread CPU medians (step in ms, hooks in us per call)"
    )
    print(f"{'hook':<18}" + "".join(f"{n:>12}" for n in out))
    print(f"{'step (ms)':<18}" + "".join(f"{o['step_ms']:12.2f}" for o in out.values()))
    for h in (*HOOKS, "submit_lazy"):
        print(f"{h:<18}" + "".join(f"{o['hooks_us'].get(h, float('nan')):12.1f}" for o in out.values()))
    if n_steps:
        print(
            f"writer (all trackers): {writer['transactions']} transactions, {n_steps} steps; append_many thread "
            f"CPU {writer['cpu_ms_per_transaction']:.2f} ms per transaction (median), "
            f"{writer['cpu_ms_per_step']:.3f} ms per step"
        )
    return 0


def _run(
    model: str,
    batch: int,
    quick: bool,
    rounds: int,
    steps: int,
    modules: dict[str, Any],
    hook_times: dict[str, dict[str, list[float]]],
    max_pending: int | None,
    appends: list[tuple[int, float]],
) -> dict[str, Any]:
    import tracker_variants
    from step_overhead import Workload

    base, x, y = Workload(model, batch, quick).build()
    loops: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
        name: tracker_variants._tracked_pair(copy.deepcopy(base), x, y, False, max_pending, attach=mod.attach)
        for name, mod in modules.items()
    }
    for step, flush in loops.values():  # warm-up
        for _ in range(2):
            step()
        flush()
    for t in hook_times.values():
        t.clear()
    appends.clear()
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
