"""The tracker's variants for ``benchmarks/step_overhead.py``, and the tracker's own benchmark (this file's main).

Variants (``register(variant)`` adds them to ``step_overhead.py``'s table):

    ledger          instrument.attach: per-sample per-layer norms, per-sample losses and margins, update
                    norms, and one step entry appended to a SQLite ledger inside the step (``max_pending=0``),
                    so the step's CPU time includes all the append's work (canonical JSON, hashing, SQL,
                    query-aggregates indexer) and its wall time the commit's fsync
    ledger_routing  the same under a routing policy: provenance looked up in a manifest of ingested labels,
                    weights [B, L] from the demo's consensus/review/rights/gold rules, routed .grad
    ledger_async    the tracker's default: the background writer builds, encodes and appends the step entries
                    (group commit, see ``instrument.tracker.StepWriter``). The training thread's CPU time
                    leaves out the writer thread: read the main benchmark below for both.

The main benchmark (the figures in BENCHMARKS.md, "Training tracker")::

    .venv/bin/python benchmarks/tracker_variants.py                      # MLP, transformer, CNN; B = 64, 256
    .venv/bin/python benchmarks/tracker_variants.py --baseline-tracker /tmp/base/tracker.py
    .venv/bin/python benchmarks/tracker_variants.py --quick              # seconds; tests/test_tracker_bench.py

runs plain, norms (engine only), ledger, ledger_async, routing_async (ledger_async under the routing policy; and ``base_ledger`` / ``base_async``: the same with the
tracker module from another file, e.g. ``git show REV:instrument/tracker.py > /tmp/base/tracker.py``; the
tracker before the group-commit writer, ccf6db7, writes step v 2 bodies, so BENCHMARKS.md's baseline is that
file with ``benchmarks/tracker_base_v3.patch`` applied: the step v 3 encoder lines, nothing else) round-
robin in one process with ``--threads 1`` and reports, per variant, the medians over rounds of: the training
thread's CPU time (``time.thread_time``), the whole process's CPU time (``time.process_time``: training thread
plus the background writer), and wall time, each as a ratio to ``plain`` from the same run. Each timed round
ends with ``tracker.flush()``, so the writer's work for that round's steps is inside that round's clocks.

``--decompose`` adds cumulative variants that switch the tracker's features on one at a time, to show where
its cost above the engine goes (the same tracker, the same hooks; only what each step does changes):

    d_structure     attach with no criterion and ``update_norms=False``, into a ledger stub that drops the step
                    entries unbuilt: the engine plus the tracker's hooks and per-batch bookkeeping
    d_losses        + the criterion (per-sample losses and margins)
    d_updates       + the exact update norms (parameter snapshot, subtraction, norms)
    d_entries       + building each step entry on the writer thread (numpy, flags, canonical JSON, payload
                    encoding), still not stored
    ledger_async    + the SQLite append (hashing, SQL, Merkle, the query-aggregates indexer, commit)
    async_pending8  ledger_async with ``max_pending=8`` (groups of 4 steps per transaction; the default
                    before 2026-11-28 was 8, now 16)

Variants run in reverse order on odd rounds, so no variant always follows the same other one.

The ledgers live in a temporary directory removed at exit.
"""

from __future__ import annotations

import argparse
import atexit
import copy
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

Step = Callable[[], None]
Maker = Callable[[nn.Module, Tensor, Tensor], Step]

_TMP: list[Path] = []


def _tmpdir() -> Path:
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="gradledger-bench-")))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _manifest(led: Any, ids: list[str]) -> Any:
    """Ingest one synthetic label per example (a spread of consensus / review / rights / gold) and pin them."""
    from ledger import ingest
    from ledger.ingest.pseudonym import Pseudonymizer
    from ledger.provenance import Manifest

    g = torch.Generator().manual_seed(3)
    rows = []
    for k, ex in enumerate(ids):
        row: dict[str, Any] = {
            "item_id": ex,
            "label_id": f"lab-{ex}",
            "value": "c",
            "producer": f"ann{k % 7}@x.org",
        }
        row["consensus"] = round(float(torch.rand(1, generator=g)), 3)
        if k % 11 == 0:
            row.update(review="reject", reviewer="rev@x.org")
        if k % 13 == 0:
            row["rights"] = "withdrawn"
        if k % 17 == 0:
            row["gold"] = True
        rows.append(row)
    path = _tmpdir() / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest.ingest("jsonl", path, led, pseudonym_key=Pseudonymizer(bytes(32)))
    return Manifest.create(led, "bench", {ex: f"lab-{ex}" for ex in ids})


def _policy(layers: list[str]) -> Any:
    from instrument import Policy, Rule

    half = max(1, len(layers) // 2)
    return Policy(
        name="bench-consensus-depth",
        groups={"shallow": layers[:half], "deep": layers[half:]} if layers[half:] else {"shallow": layers},
        rules=[
            Rule("excluded", {"*": 0.0}, {"any": [{"review": "reject"}, {"rights": "withdrawn"}]}),
            Rule("gold", {"*": 1.0}, {"gold": True}),
            Rule("low-consensus", {"shallow": 1.0, "*": 0.0}, {"consensus": {"lt": 0.7}}),
        ],
        default={"*": 1.0},
    )


def _flat(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return out.reshape(-1, out.shape[-1]), y.reshape(-1)


class _StepSink:
    """A ledger stub for the decomposition variants: ``append`` (run, policy, checkpoint entries) goes to the real
    ledger; ``append_many`` (the step writer's groups) builds each step entry and drops it (``build=True``) or
    drops the items unbuilt. Never used outside this benchmark."""

    def __init__(self, ledger: Any, build: bool) -> None:
        self._ledger, self._build = ledger, build

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def append_many(self, items: list[Any]) -> list[Any]:
        if self._build:
            for item in items:
                if callable(item):
                    item()
        return []


def _tracked_pair(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    routed: bool,
    max_pending: int | None,
    attach: Callable[..., Any] | None = None,
    *,
    sink: str | None = None,
    losses: bool = True,
    update_norms: bool = True,
) -> tuple[Step, Step]:
    """(step, flush) of a tracked training loop; ``attach`` defaults to ``instrument.attach``.

    ``max_pending``: as attach's (None: attach's default). ``sink``: None appends to a SQLite ledger; "build" /
    "drop" use :class:`_StepSink`. ``losses``: pass the criterion to attach (per-sample losses and margins).
    ``update_norms``: as attach's."""
    from instrument import GradNormEngine
    from instrument import attach as default_attach
    from ledger.store import Ledger

    led: Any = Ledger.open(_tmpdir() / f"{uuid.uuid4().hex}.ledger", create=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    ids = [f"ex{i}" for i in range(x.shape[0])]
    kwargs: dict[str, Any] = {}
    if routed:
        kwargs["labels"] = _manifest(led, ids)
        kwargs["policy"] = _policy(GradNormEngine(model).layer_names)
    if sink is not None:
        led = _StepSink(led, build=sink == "build")
    if not update_norms:
        kwargs["update_norms"] = False
    if max_pending is not None:
        kwargs["max_pending"] = max_pending
    tr = (attach or default_attach)(
        model,
        opt,
        ledger=led,
        run="bench",
        criterion=crit if losses else None,
        **kwargs,
    )

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with tr.batch(ids):
            crit(*_flat(model(x), y)).backward()  # no reference to the logits outlives the loss, as in plain
            opt.step()

    return step, tr.flush


def _tracked(model: nn.Module, x: Tensor, y: Tensor, routed: bool, max_pending: int | None) -> Step:
    return _tracked_pair(model, x, y, routed, max_pending)[0]


def register(variant: Callable[[str], Callable[[Maker], Maker]]) -> None:
    """Add the tracker's variants to a benchmark's ``@variant(name)`` table."""

    @variant("ledger")
    def make_ledger(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        return _tracked(model, x, y, routed=False, max_pending=0)

    @variant("ledger_routing")
    def make_ledger_routing(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        return _tracked(model, x, y, routed=True, max_pending=0)

    @variant("ledger_async")
    def make_ledger_async(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        return _tracked(model, x, y, routed=False, max_pending=None)


# --------------------------------------------------------------------------- the tracker benchmark

Pair = Callable[[nn.Module, Tensor, Tensor], tuple[Step, Step | None]]


def _load_tracker(path: str) -> Any:
    """``attach`` from another copy of ``instrument/tracker.py`` (imported as a module of the ``instrument``
    package, so its relative imports resolve to this checkout's engine, DP and policy modules)."""
    import instrument

    name = "instrument._baseline_tracker"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = instrument.__name__
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod.attach


def pairs(baseline_attach: Any = None, decompose: bool = False) -> dict[str, Pair]:
    """The variants of the tracker benchmark: name -> make(model, x, y) -> (step, flush or None)."""
    from step_overhead import VARIANTS

    out: dict[str, Pair] = {
        "plain": lambda m, x, y: (VARIANTS["plain"](m, x, y), None),
        "norms": lambda m, x, y: (VARIANTS["norms"](m, x, y), None),
        "ledger": lambda m, x, y: _tracked_pair(m, x, y, routed=False, max_pending=0),
        "ledger_async": lambda m, x, y: _tracked_pair(m, x, y, routed=False, max_pending=None),
        "routing_async": lambda m, x, y: _tracked_pair(m, x, y, routed=True, max_pending=None),
    }
    if baseline_attach is not None:
        a = baseline_attach
        out["base_ledger"] = lambda m, x, y: _tracked_pair(m, x, y, routed=False, max_pending=0, attach=a)
        out["base_async"] = lambda m, x, y: _tracked_pair(m, x, y, routed=False, max_pending=None, attach=a)
    if decompose:  # cumulative: each adds one feature to the one before; ledger_async adds the SQLite append
        out["d_structure"] = lambda m, x, y: _tracked_pair(
            m, x, y, False, None, sink="drop", losses=False, update_norms=False
        )
        out["d_losses"] = lambda m, x, y: _tracked_pair(m, x, y, False, None, sink="drop", update_norms=False)
        out["d_updates"] = lambda m, x, y: _tracked_pair(m, x, y, False, None, sink="drop")
        out["d_entries"] = lambda m, x, y: _tracked_pair(m, x, y, False, None, sink="build")
        # the writer's group size: ledger_async with max_pending=8 (groups of 4), the default before 2026-11-28
        out["async_pending8"] = lambda m, x, y: _tracked_pair(m, x, y, False, 8)
    return out


def time_pairs(wl: Any, makers: dict[str, Pair], rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Median seconds per step (thread CPU, process CPU, wall) of each variant, round-robin in one process."""
    base, x, y = wl.build()
    fns = {n: make(copy.deepcopy(base), x, y) for n, make in makers.items()}
    for step, flush in fns.values():  # warm-up
        step()
        step()
        if flush is not None:
            flush()
    got: dict[str, dict[str, list[float]]] = {n: {"thread": [], "process": [], "wall": []} for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:  # no variant always runs right after the same one
            step, flush = fns[n]
            t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
            for _ in range(steps):
                step()
            if flush is not None:
                flush()  # the writer's work for these steps belongs to this round
            got[n]["wall"].append((time.perf_counter() - t0) / steps)
            got[n]["thread"].append((time.thread_time() - c0) / steps)
            got[n]["process"].append((time.process_time() - p0) / steps)
    return {n: {k: statistics.median(v) for k, v in d.items()} for n, d in got.items()}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from step_overhead import Workload

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 rounds of 2 steps: seconds")
    ap.add_argument("--models", default="mlp,transformer,cnn")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="round-robin rounds (default 9; quick 2)")
    ap.add_argument(
        "--steps", type=int, default=None, help="steps per variant per round (default 8; quick 2)"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--baseline-tracker", metavar="FILE", help="add base_ledger / base_async from FILE")
    ap.add_argument(
        "--decompose",
        action="store_true",
        help="add d_structure / d_losses / d_updates / d_entries / async_pending8",
    )
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    makers = pairs(_load_tracker(args.baseline_tracker) if args.baseline_tracker else None, args.decompose)
    batches = [int(v) for v in (args.batches or ("8" if args.quick else "64,256")).split(",")]
    rounds = args.rounds or (2 if args.quick else 9)
    steps = args.steps or (2 if args.quick else 8)
    load0 = os.getloadavg()
    results: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for b in batches:
            t = time_pairs(Workload(model, b, args.quick), makers, rounds, steps)
            p = t["plain"]
            for n, m in t.items():
                results.append(
                    {"model": model, "batch": b, "variant": n}
                    | {f"{k}_ms": v * 1e3 for k, v in m.items()}
                    | {f"{k}_x_plain": v / p[k] for k, v in m.items()}
                )
    load1 = os.getloadavg()
    if args.json:
        print(
            json.dumps({"load": [load0, load1], "rounds": rounds, "steps": steps, "rows": results}, indent=1)
        )
        return 0
    print(
        f"threads={args.threads} rounds={rounds} x {steps} steps; medians; ratios against plain from this run; "
        f"load average {load0[0]:.2f} -> {load1[0]:.2f}"
    )
    print(
        f"{'model':<12}{'B':>5}  {'variant':<14}{'thread ms':>10}{'x plain':>9}{'process ms':>11}{'x plain':>9}"
        f"{'wall ms':>9}{'x plain':>9}"
    )
    for r in results:
        print(
            f"{r['model']:<12}{r['batch']:>5}  {r['variant']:<14}{r['thread_ms']:10.2f}{r['thread_x_plain']:9.2f}"
            f"{r['process_ms']:11.2f}{r['process_x_plain']:9.2f}{r['wall_ms']:9.2f}{r['wall_x_plain']:9.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
