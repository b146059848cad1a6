"""Where the engine's step overhead goes: each kernel type's own thread CPU per training step.

    .venv/bin/python benchmarks/engine_kernels.py --models transformer --batches 64
    .venv/bin/python benchmarks/engine_kernels.py --baseline-engine /tmp/base/instrument   # old vs new, per kernel
    .venv/bin/python benchmarks/engine_kernels.py --quick        # seconds; exercised by tests/test_step_overhead.py

Whole-step ratios (``step_overhead.py``) move by ±0.05-0.1 between runs on a shared machine, more than most
single changes; a kernel's own time inside the step moves much less. Variants, one copy of the engine package
each (so their kernel tables are independent), run round-robin with ``plain`` in one process, the order
reversed on odd rounds:

  norms        the engine as it is (``instrument/``)
  norms_base   the engine from ``--baseline-engine DIR`` (engine.py + kernels/, e.g. ``git archive REV
               instrument/engine.py instrument/kernels | tar -x -C /tmp/base``)
  gemm_only    the engine with the kernels named by ``--plain-kernels`` (default Linear,LayerNorm) replaced by
               ones that compute only what plain autograd computes for those layers (the weight GEMM and bias
               sum; dγ, dβ) and zero norms: the difference to ``norms`` is what the exact per-sample norms of
               those layers cost, the rest of the difference to ``plain`` is everything else

For each variant: the median step CPU time (``time.thread_time``, ``--threads 1``) as a ratio to ``plain``, and
per kernel type the thread CPU per step spent in its kernel and gradient maker (timers around each call: they
add ~1 µs per call, identical for every variant). Not a substitute for ``step_overhead.py``'s ratios: time saved
in a kernel can reappear in the next op that touches the same data (cold caches move), so check a change in the
whole step too (``step_overhead.py --baseline-engine`` prints same-round paired differences).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_overhead import VARIANTS, Workload, _engine_step, load_baseline_engine  # noqa: E402

INSTRUMENT = Path(__file__).resolve().parent.parent / "instrument"


def _plain_linear(kernels: Any) -> Any:
    def kernel(module: nn.Module, calls: list[Any], req: Any) -> Any:
        xs = [c.input.reshape(-1, c.input.shape[-1]) for c in calls]
        gs = [c.grad_output.reshape(-1, c.grad_output.shape[-1]) for c in calls]
        x, g = (xs[0], gs[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(gs))
        params = kernels.trainable(module)

        def grads(scale: Tensor | None) -> dict[str, Tensor]:
            out = {"weight": g.t().mm(x)} if "weight" in params else {}
            if "bias" in params:
                out["bias"] = g.sum(0)
            return out

        b = calls[0].grad_output.shape[0]
        return kernels.LayerGrads(torch.zeros(b, dtype=g.dtype, device=g.device), grads)

    return kernel


def _plain_layer_norm(kernels: Any) -> Any:
    import torch.nn.functional as F

    def kernel(module: nn.Module, calls: list[Any], req: Any) -> Any:
        assert isinstance(module, nn.LayerNorm)
        n = len(module.normalized_shape)
        parts: dict[str, Tensor] = {}
        for c in calls:
            x, g = c.input, c.grad_output
            if c.saved is not None:  # the statistics the layer's own autograd node saved (as the real kernel)
                mean, rstd = c.saved
                xhat = (x - mean).mul_(rstd)
            else:
                xhat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
            lead = tuple(range(g.dim() - n))
            for name, t in (("weight", xhat.mul_(g).sum(lead)), ("bias", g.sum(lead))):
                parts[name] = t if name not in parts else parts[name] + t
        params = kernels.trainable(module)
        b = calls[0].grad_output.shape[0]
        zeros = torch.zeros(b, dtype=calls[0].grad_output.dtype, device=calls[0].grad_output.device)
        return kernels.LayerGrads(zeros, lambda scale: {k: v for k, v in parts.items() if k in params})

    return kernel


PLAIN_KERNELS = {"Linear": (nn.Linear, _plain_linear), "LayerNorm": (nn.LayerNorm, _plain_layer_norm)}


def _timed_engine(path: Path, name: str, acc: dict[str, float], plain: list[str]) -> Any:
    """``GradNormEngine`` from a private copy of the package at ``path``, its kernels wrapped in timers (and
    the types in ``plain`` swapped for the plain-autograd kernels first)."""
    cls = load_baseline_engine(str(path), name=name)
    engine_mod = sys.modules[name + ".engine"]
    kernels = sys.modules[name + ".kernels"]
    for kind in plain:
        t, make = PLAIN_KERNELS[kind]
        engine_mod.KERNELS[t] = make(kernels)
    for t, k in list(engine_mod.KERNELS.items()):

        def wrapped(module: nn.Module, calls: list[Any], req: Any, k: Any = k, key: str = t.__name__) -> Any:
            t0 = time.thread_time()
            res = k(module, calls, req)
            acc[key] += time.thread_time() - t0
            make = res.grads

            def grads(scale: Tensor | None, make: Any = make, key: str = key) -> dict[str, Tensor]:
                t1 = time.thread_time()
                out = make(scale)
                acc[key] += time.thread_time() - t1
                return out

            return kernels.LayerGrads(res.norm_sq, grads)

        engine_mod.KERNELS[t] = wrapped
    return cls


def measure(wl: Workload, rounds: int, baseline: str | None, plain_kernels: list[str]) -> dict[str, Any]:
    base, x, y = wl.build()
    accs: dict[str, collections.defaultdict[str, float]] = {}
    fns = {"plain": VARIANTS["plain"](copy.deepcopy(base), x, y)}
    sources = {"norms": INSTRUMENT, "gemm_only": INSTRUMENT}
    if baseline:
        sources["norms_base"] = Path(baseline)
    for v, path in sources.items():
        accs[v] = collections.defaultdict(float)
        cls = _timed_engine(path, f"_engine_kernels_{v}", accs[v], plain_kernels if v == "gemm_only" else [])
        fns[v] = _engine_step(copy.deepcopy(base), x, y, False, cls)
    for fn in fns.values():  # warm-up
        fn()
        fn()
    for a in accs.values():
        a.clear()
    names = list(fns)
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            t0 = time.thread_time()
            fns[n]()
            cpu[n].append(time.thread_time() - t0)
    plain_s = statistics.median(cpu["plain"])
    return {
        "model": wl.model,
        "batch": wl.batch,
        "plain_ms": plain_s * 1e3,
        "x_plain": {n: statistics.median(cpu[n]) / plain_s for n in names},
        "kernel_ms": {v: {k: s / rounds * 1e3 for k, s in sorted(a.items())} for v, a in accs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, 2 rounds: seconds")
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; quick 8)")
    ap.add_argument("--rounds", type=int, default=None, help="steps per variant (default 41; quick 2)")
    ap.add_argument("--baseline-engine", metavar="DIR", help="add norms_base: the engine from DIR")
    ap.add_argument("--plain-kernels", default="Linear,LayerNorm", help=f"of {','.join(PLAIN_KERNELS)}")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    plain = [k for k in args.plain_kernels.split(",") if k]
    unknown = [k for k in plain if k not in PLAIN_KERNELS]
    if unknown:
        print(f"unknown --plain-kernels {unknown} (known: {list(PLAIN_KERNELS)})", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 41)
    batches = [int(v) for v in (args.batches or ("8" if args.quick else "64,256")).split(",")]
    out = [
        measure(Workload(m, b, args.quick), rounds, args.baseline_engine, plain)
        for m in args.models.split(",")
        for b in batches
    ]
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"threads=1 rounds={rounds}; medians of step CPU; kernel CPU per step (mean); gemm_only: {plain} plain"
    )
    for r in out:
        ratios = "  ".join(f"{n} {v:.3f}" for n, v in r["x_plain"].items() if n != "plain")
        print(f"{r['model']} B={r['batch']}: plain {r['plain_ms']:.2f} ms; x plain: {ratios}")
        for v, ks in r["kernel_ms"].items():
            print(f"  {v:<11}" + "  ".join(f"{k} {ms:.3f}" for k, ms in ks.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
