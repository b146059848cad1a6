"""Training-step overhead of the instrument engine vs a plain step and Opacus, on CPU.

    .venv/bin/python benchmarks/step_overhead.py            # full mode (figures quoted in BENCHMARKS.md)
    .venv/bin/python benchmarks/step_overhead.py --quick    # seconds; exercised by tests/test_step_overhead.py

Models: an MLP (64-512-512-512-10), a small CNN (3 conv + pool blocks on 3x32x32, then a Linear) and a
small transformer (2 pre-LN blocks, d=64, 4 heads, T=32, vocab 512, attention from Linear layers), at
B = 64 and 256. One step = zero_grad, forward, loss (mean cross-entropy), backward, SGD step.

Variants (the ``VARIANTS`` table; adding one is one ``@variant`` function):
  plain         plain PyTorch
  norms         GradNormEngine: per-sample per-layer norms, .grad as plain
  routing       GradNormEngine with a random [B, L] routing-weight matrix (zeros, halves, ones)
  ledger, ledger_routing, ledger_async: instrument.attach + SQLite ledger (see tracker_variants.py)
  opacus_hooks  Opacus GradSampleModule (materialises every per-sample gradient) + per-layer norms
  opacus_ghost  Opacus ghost clipping (GradSampleModuleFastGradientClipping, noise 0): two backwards

Time: every variant runs round-robin in one process (same threads, same data), warm-up first; the figures
are median step times over the rounds, ratios against ``plain`` from the same run. Both wall-clock and CPU
time are reported: the development machine is shared (2 cores, other jobs), so with ``--threads 1`` (the
default) the per-thread CPU time (``time.thread_time``) is the load-robust measure of the work done.
Memory: torch's CPU allocator keeps no peak statistics, so every tensor allocation and free of one step is
recorded with ``torch.profiler`` (``profile_memory=True``) in a fresh process per (model, B, variant), from
before the model is built, and replayed in order; "peak MiB" is the highest live tensor memory during the third step (parameters, gradients, activations, temporaries, leftovers of
the previous step such as Opacus's per-sample gradients), "mem x" its ratio to plain's, and "extra x" the
same ratio for the part above parameters + buffers + batch (activations, gradients, temporaries). An earlier
version measured the resident-set high-water mark (VmHWM) in a fresh process instead; that figure was
dominated by one-time costs of the first steps (library pages, allocator arenas: 12 MiB "extra" for the plain
MLP at B=64, 0.13 MiB once warmed up), not by the step's tensors.

Before/after comparisons: ``--baseline-engine DIR`` adds a variant ``norms_base`` that runs the engine from
another copy of ``engine.py`` + ``kernels/`` (e.g. ``git archive <rev> instrument/engine.py
instrument/kernels | tar -x -C /tmp/base`` then ``--baseline-engine /tmp/base/instrument``), interleaved with
the others in the same process, so old and new are measured under the same load.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.machinery
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

try:
    from instrument import GradNormEngine
except ImportError:  # e.g. a GPU image without the ledger's packages: the engine itself needs only torch

    def _engine_alone() -> Any:
        import importlib.machinery as _m
        import importlib.util as _u

        pkg = _u.module_from_spec(_m.ModuleSpec("_engine_alone", None, is_package=True))
        pkg.__path__ = [str(Path(__file__).resolve().parent.parent / "instrument")]
        sys.modules["_engine_alone"] = pkg
        return importlib.import_module("_engine_alone.engine").GradNormEngine

    GradNormEngine = _engine_alone()  # type: ignore[misc]

# --------------------------------------------------------------------------- models and workloads


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.heads = heads

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return h + self.ff2(F.gelu(self.ff1(self.ln2(h))))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, d: int = 64, heads: int = 4, t: int = 32, layers: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(t, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.lnf, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device).repeat(b, 1))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.lnf(h))


def mlp(width: int = 512) -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10),
    )  # fmt: skip


def cnn(c: int = 16) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(2 * c, 4 * c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * c * 16, 10),
    )  # fmt: skip


@dataclass
class Workload:
    model: str
    batch: int
    quick: bool

    def build(self) -> tuple[nn.Module, Tensor, Tensor]:
        torch.manual_seed(0)
        b = self.batch
        if self.model == "mlp":
            return mlp(64 if self.quick else 512), torch.randn(b, 64), torch.randint(0, 10, (b,))
        if self.model == "cnn":
            s = 8 if self.quick else 32
            m = cnn(4 if self.quick else 16)
            if self.quick:
                m[-1] = nn.Linear(4 * 4, 10)
            return m, torch.randn(b, 3, s, s), torch.randint(0, 10, (b,))
        if self.model == "transformer":
            t, v = (8, 32) if self.quick else (32, 512)
            gpt = TinyGPT(vocab=v, d=16 if self.quick else 64, t=t)
            return gpt, torch.randint(0, v, (b, t)), torch.randint(0, v, (b, t))
        raise ValueError(self.model)


def loss_of(out: Tensor, y: Tensor, reduction: str = "mean") -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction=reduction)


# --------------------------------------------------------------------------- variants

Step = Callable[[], None]
VARIANTS: dict[str, Callable[[nn.Module, Tensor, Tensor], Step]] = {}


def variant(
    name: str,
) -> Callable[[Callable[[nn.Module, Tensor, Tensor], Step]], Callable[[nn.Module, Tensor, Tensor], Step]]:
    """Register ``make(model, x, y) -> step``; ``model`` is a fresh copy owned by the variant."""

    def deco(fn: Callable[[nn.Module, Tensor, Tensor], Step]) -> Callable[[nn.Module, Tensor, Tensor], Step]:
        VARIANTS[name] = fn
        return fn

    return deco


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3)


@variant("plain")
def make_plain(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    opt = _sgd(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_of(model(x), y).backward()
        opt.step()

    return step


def _engine_step(
    model: nn.Module, x: Tensor, y: Tensor, routed: bool, engine_cls: Any = GradNormEngine
) -> Step:
    opt = _sgd(model)
    engine = engine_cls(model, loss_reduction="mean")
    b, L = x.shape[0], len(engine.layer_names)
    weights = None
    if routed:
        g = torch.Generator().manual_seed(1)
        weights = torch.randint(0, 3, (b, L), generator=g).float() / 2  # 0, 0.5, 1

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        engine.begin(b, weights=weights)
        loss_of(model(x), y).backward()
        opt.step()
        engine.end()

    return step


@variant("norms")
def make_norms(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    return _engine_step(model, x, y, routed=False)


@variant("routing")
def make_routing(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    return _engine_step(model, x, y, routed=True)


# The tracker's variants (ledger, ledger_routing, ledger_async): the whole product path, in their own module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tracker_variants import register as _register_tracker_variants  # noqa: E402

_register_tracker_variants(variant)


@variant("opacus_hooks")
def make_opacus_hooks(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, loss_reduction="mean")
    opt = _sgd(gsm)
    params = [p for p in gsm.parameters() if p.requires_grad]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        for p in params:
            p.grad_sample = None
        loss_of(gsm(x), y).backward()
        b = x.shape[0]
        torch.stack([p.grad_sample.reshape(b, -1).norm(dim=1) for p in params], 1)  # the same norms
        opt.step()

    return step


@variant("opacus_ghost")
def make_opacus_ghost(model: nn.Module, x: Tensor, y: Tensor) -> Step:
    from opacus.grad_sample import GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    gsm = GradSampleModuleFastGradientClipping(model, max_grad_norm=1.0, use_ghost_clipping=True)
    opt = DPOptimizerFastGradientClipping(
        _sgd(gsm), noise_multiplier=0.0, max_grad_norm=1.0, expected_batch_size=x.shape[0]
    )
    crit = DPLossFastGradientClipping(gsm, opt, nn.CrossEntropyLoss(), loss_reduction="mean")

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = gsm(x)
        crit(
            out.reshape(-1, out.shape[-1]), y.reshape(-1), shape=out.shape if out.dim() == 3 else None
        ).backward()
        opt.step()

    return step


# --------------------------------------------------------------------------- timing and memory


def time_variants(
    wl: Workload, names: list[str], rounds: int, steps: int, per_round: dict[str, list[float]] | None = None
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per step of each variant, round-robin in one process.

    Odd rounds run the variants in reverse order, so no variant always runs right after the same other one
    (a step runs with the caches its predecessor left: a fixed order biased A/B pairs by up to ~0.5 ms at
    ~40 ms per step). ``per_round`` (if given) receives each variant's CPU seconds per step, round by round.
    """
    base, x, y = wl.build()
    steps_fn = {n: VARIANTS[n](copy.deepcopy(base), x, y) for n in names}
    for fn in steps_fn.values():  # warm-up
        fn()
        fn()
    cpu_clock = time.thread_time if torch.get_num_threads() == 1 else time.process_time
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            fn = steps_fn[n]
            t0, c0 = time.perf_counter(), cpu_clock()
            for _ in range(steps):
                fn()
            wall[n].append((time.perf_counter() - t0) / steps)
            cpu[n].append((cpu_clock() - c0) / steps)
    if per_round is not None:
        per_round.update(cpu)
    return {n: (statistics.median(wall[n]), statistics.median(cpu[n])) for n in names}


def paired_vs(per_round: dict[str, list[float]], name: str, base: str) -> tuple[float, int]:
    """(median over rounds of ``name``'s CPU minus ``base``'s in the same round, in ms; rounds where ``name``
    was faster): a same-round difference cancels the load drifting between rounds, which moves both."""
    diffs = [a - b for a, b in zip(per_round[name], per_round[base], strict=True)]
    return statistics.median(diffs) * 1e3, sum(d < 0 for d in diffs)


def peak_memory(wl: Workload, name: str) -> tuple[float, float]:
    """(peak live tensor MiB during one step of ``name``, MiB of parameters + buffers + batch).

    The profiler runs from before the model is built, so every allocation and free is recorded and the
    running sum of recorded bytes is the live tensor memory at each moment (a profile started later misses
    the frees of earlier blocks, differently for different allocation paths). The third step is measured.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        base, x, y = wl.build()
        fn = VARIANTS[name](base, x, y)
        fn()
        fn()
        with record_function("## measured step ##"):
            fn()
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "## measured step ##")
    t0, t1 = window.start_ns(), window.end_ns()
    live = peak = 0
    for start, nbytes in sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]"):
        live += nbytes
        if t0 <= start <= t1:
            peak = max(peak, live)
    static = sum(t.numel() * t.element_size() for t in (*base.parameters(), *base.buffers(), x, y))
    return peak / 2**20, static / 2**20


def measure_memory(wl: Workload, name: str, args: argparse.Namespace) -> tuple[float, float] | None:
    """``peak_memory`` in a fresh process (no blocks of earlier variants whose frees the profiler misses)."""
    cmd = [
        sys.executable,
        __file__,
        "--mem-child",
        wl.model,
        str(wl.batch),
        name,
        "--threads",
        str(args.threads),
    ]
    if wl.quick:
        cmd.append("--quick")
    if args.baseline_engine:
        cmd += ["--baseline-engine", args.baseline_engine]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(
            f"memory child failed for {wl.model}/{wl.batch}/{name}: {out.stderr.strip()[-500:]}",
            file=sys.stderr,
        )
        return None
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return float(got["peak_mib"]), float(got["static_mib"])


def load_baseline_engine(path: str, name: str = "_baseline_engine_pkg") -> Any:
    """``GradNormEngine`` from another copy of ``engine.py`` + ``kernels/`` (a directory holding both)."""
    pkg = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    pkg.__path__ = [str(Path(path).resolve())]
    sys.modules[name] = pkg
    return importlib.import_module(name + ".engine").GradNormEngine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny models, few rounds: seconds")
    ap.add_argument("--models", default="mlp,cnn,transformer")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 64,256; quick 8)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time is per-thread, robust to load)"
    )
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument(
        "--baseline-engine",
        metavar="DIR",
        help="add variant norms_base: the engine from DIR (engine.py + kernels/)",
    )
    ap.add_argument("--mem-child", nargs=3, metavar=("MODEL", "B", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.baseline_engine:
        base_cls = load_baseline_engine(args.baseline_engine)
        VARIANTS["norms_base"] = lambda m, x, y: _engine_step(m, x, y, routed=False, engine_cls=base_cls)
    if args.mem_child:
        m, b, n = args.mem_child
        peak, static = peak_memory(Workload(m, int(b), args.quick), n)
        print(json.dumps({"peak_mib": peak, "static_mib": static}))
        return 0
    batches = [int(v) for v in (args.batches or ("8" if args.quick else "64,256")).split(",")]
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "plain" not in names:
        print(f"unknown variants {unknown} (known: {list(VARIANTS)}); 'plain' is required", file=sys.stderr)
        return 2
    rounds = args.rounds or (2 if args.quick else 7)
    results: list[dict[str, Any]] = []
    for model in args.models.split(","):
        for b in batches:
            wl = Workload(model, b, args.quick)
            per_round: dict[str, list[float]] = {}
            times = time_variants(wl, names, rounds, steps=1 if args.quick else 2, per_round=per_round)
            mem: dict[str, tuple[float, float] | None] = {}
            if not args.no_memory and not (args.quick and results):  # quick: first workload only
                mem_names = [n for n in names if n in ("plain", "norms")] if args.quick else names
                mem = {n: measure_memory(wl, n, args) for n in mem_names}
            for n in names:
                mp, mn = mem.get("plain"), mem.get(n)
                results.append(
                    {
                        "model": model, "batch": b, "variant": n,
                        "wall_ms": times[n][0] * 1e3, "wall_x_plain": times[n][0] / times["plain"][0],
                        "cpu_ms": times[n][1] * 1e3, "cpu_x_plain": times[n][1] / times["plain"][1],
                        "peak_mib": mn[0] if mn else None, "static_mib": mn[1] if mn else None,
                        "peak_extra_mib": mn[0] - mn[1] if mn else None,
                        "mem_x_plain": mn[0] / mp[0] if mn and mp else None,
                        "extra_x_plain": (mn[0] - mn[1]) / (mp[0] - mp[1]) if mn and mp else None,
                        "rounds": rounds,
                    }
                )  # fmt: skip
                if "norms_base" in names:  # same-round difference against the baseline engine
                    results[-1]["paired_ms_vs_base"], results[-1]["faster_than_base"] = paired_vs(
                        per_round, n, "norms_base"
                    )
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"threads={args.threads} rounds={rounds}; medians; ratios against plain from this run")
    head = f"{'model':<12}{'B':>5}  {'variant':<14}{'CPU ms':>9}{'x plain':>9}{'wall ms':>9}{'x plain':>9}"
    print(head + f"{'peak MiB':>10}{'mem x':>7}{'extra x':>8}")
    paired = [r for r in results if "paired_ms_vs_base" in r and r["variant"] != "norms_base"]
    for r in results:
        mem_s = (
            f"{r['peak_mib']:10.2f}{r['mem_x_plain']:7.2f}{r['extra_x_plain']:8.2f}"
            if r["peak_extra_mib"] is not None
            else ""
        )
        print(
            f"{r['model']:<12}{r['batch']:>5}  {r['variant']:<14}{r['cpu_ms']:9.1f}{r['cpu_x_plain']:9.2f}"
            f"{r['wall_ms']:9.1f}{r['wall_x_plain']:9.2f}{mem_s}"
        )
    if paired:
        print("same-round CPU difference vs norms_base (median over rounds; rounds faster):")
        for r in paired:
            print(
                f"  {r['model']:<12}{r['batch']:>5}  {r['variant']:<14}{r['paired_ms_vs_base']:+9.3f} ms"
                f"  {r['faster_than_base']}/{r['rounds']}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
