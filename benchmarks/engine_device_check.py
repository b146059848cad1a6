"""The engine on a machine with a GPU: exactness on CUDA, and step overhead on a quiet CPU and on the GPU.

    python benchmarks/engine_device_check.py [--baseline-engine DIR] [--quick]

Meant for the lent GPU machine, whose image has PyTorch but not the ledger's dependencies: ``instrument``'s
``__init__`` (tracker, ledger) is not imported; ``instrument/engine.py`` + ``kernels/`` are loaded on their own.

1. CUDA exactness: per-sample per-layer norms and ``.grad`` vs the torch.func oracle (``tests/support_engine``,
   float64) for an MLP, a CNN (conv + GroupNorm), a small transformer (embeddings with padding, LayerNorm,
   sequence Linear) and routed gradients; everything must stay on the GPU.
2. CPU step overhead (``benchmarks/step_overhead.py``, one thread) on that machine's idle cores: plain, the
   baseline engine (if given), norms, routing; CPU time medians and allocation-accounted peak memory.
3. GPU step overhead: plain vs norms vs routing, CUDA-synchronised wall time, medians.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent


def _load_engine() -> type:
    """``GradNormEngine``: from ``instrument`` where its dependencies are installed, else ``instrument/engine.py``
    + ``kernels/`` alone (the GPU image lacks the ledger's packages), published as a stub ``instrument``."""
    sys.path.insert(0, str(ROOT))
    try:
        from instrument import GradNormEngine

        return GradNormEngine
    except ImportError:
        pass
    name = "_engine_only"
    pkg = importlib.util.module_from_spec(importlib.machinery.ModuleSpec(name, None, is_package=True))
    pkg.__path__ = [str(ROOT / "instrument")]
    sys.modules[name] = pkg
    cls = importlib.import_module(name + ".engine").GradNormEngine
    stub = types.ModuleType("instrument")
    stub.GradNormEngine = cls  # type: ignore[attr-defined]
    sys.modules["instrument"] = stub
    return cls


def cuda_exactness(device: str = "cuda") -> None:
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from step_overhead import TinyGPT, Workload, mlp

    from tests.support_engine import assert_rel_close, layer_of, oracle_grads, plain_grads, run_engine

    def _check(model: nn.Module, x: torch.Tensor, red: str) -> Any:
        """support_engine.check_model, with the oracle's norms formed on the model's device."""
        with torch.no_grad():
            target = torch.randn_like(model(x))
        eng, norms, _, grads = run_engine(model, x, target, red)
        per = oracle_grads(model, x, target)
        ref = torch.zeros_like(norms)
        for n, g in per.items():
            ref[:, eng.layer_names.index(layer_of(n, eng.layer_names))] += (
                g.reshape(g.shape[0], -1).square().sum(1)
            )
        assert_rel_close(norms, ref.sqrt(), 1e-6, "norms")
        plain = plain_grads(model, x, target, red)
        for n in plain:
            assert_rel_close(grads[n], plain[n], 1e-6, f".grad of {n}")
        return eng

    dev = torch.device(device)
    torch.manual_seed(0)
    cases: list[tuple[str, nn.Module, torch.Tensor]] = [
        ("mlp", mlp(32), torch.randn(6, 64)),
        ("cnn+groupnorm", nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                        nn.Conv2d(8, 16, 3, stride=2), nn.Flatten(), nn.LazyLinear(4)),
         torch.randn(5, 3, 9, 9)),
        ("cnn (benchmark, quick)", *Workload("cnn", 4, True).build()[:2]),
        ("transformer (benchmark, quick)", *Workload("transformer", 5, True).build()[:2]),
        ("transformer d=16 vocab=17", TinyGPT(vocab=17, d=16, t=8), torch.randint(0, 17, (5, 8))),
    ]  # fmt: skip
    for name, model, x in cases:
        model, x = model.to(dev), x.to(dev)
        if x.is_floating_point():
            model(x)  # materialise lazy layers
            model, x = model.double(), x.double()
        else:
            model = model.double()
        for red in ("mean", "sum"):
            eng = _check(model, x, red)
        with torch.no_grad():
            target = torch.randn_like(model(x))
        w = torch.rand(x.shape[0], len(eng.layer_names), dtype=torch.float64, device=dev)
        eng, norms, _, grads = run_engine(model, x, target, "sum", weights=w)
        assert norms.device.type == dev.type and all(g.device.type == dev.type for g in grads.values())
        per = oracle_grads(model, x, target)
        for n, g in per.items():
            wl = w[:, eng.layer_names.index(layer_of(n, eng.layer_names))]
            assert_rel_close(grads[n], torch.einsum("b,b...->...", wl, g), 1e-9, f"routed {n}")
        print(
            f"{dev.type} exact: {name}: norms, .grad (mean/sum) and routed .grad match torch.func (f64)",
            flush=True,
        )


def gpu_overhead(batches: list[int], rounds: int) -> None:
    """Plain vs norms (and routing) on the GPU, under each chunking setting of the kernels."""
    import step_overhead as so

    pkg = "_engine_only" if "_engine_only" in sys.modules else "instrument"
    base_mod: Any = sys.modules[pkg + ".kernels.base"]
    conv_mod: Any = sys.modules[pkg + ".kernels.conv"]
    configs = [("budget x1 (CPU chunks)", 1, "auto"), ("budget x64 (default)", 64, "auto"),
               ("budget x64, conv by groups", 64, "groups")]  # fmt: skip
    dev = torch.device("cuda")
    print("GPU step time (CUDA-synchronised wall, median of rounds of 10 steps)")
    for label, scale, mode in configs:
        base_mod.ACCELERATOR_BUDGET_SCALE = scale
        conv_mod.PER_SAMPLE_MODE = mode
        names = ("plain", "norms", "routing") if scale == 64 and mode == "auto" else ("plain", "norms")
        print(f" {label}")
        for model in ("mlp", "cnn", "transformer"):
            if mode == "groups" and model != "cnn":
                continue
            for b in batches:
                base, x, y = so.Workload(model, b, False).build()
                x, y = x.to(dev), y.to(dev)
                fns = {n: so.VARIANTS[n](_copy(base).to(dev), x, y) for n in names}
                times: dict[str, list[float]] = {n: [] for n in fns}
                for fn in fns.values():
                    for _ in range(3):
                        fn()
                for _ in range(rounds):
                    for n, fn in fns.items():
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        for _ in range(10):
                            fn()
                        torch.cuda.synchronize()
                        times[n].append((time.perf_counter() - t0) / 10)
                med = {n: statistics.median(v) for n, v in times.items()}
                ratios = "  ".join(f"{n} x{med[n] / med['plain']:.2f}" for n in names[1:])
                print(f"  {model:<12}{b:>5}  plain {med['plain'] * 1e3:7.2f} ms  {ratios}", flush=True)


def _copy(m: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(m)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline-engine", metavar="DIR")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: cuda,cpu,gpu")
    ap.add_argument("--exact-device", default="cuda", help="device of the exactness part (cpu: a dry run)")
    args = ap.parse_args()
    _load_engine()
    skip = set(args.skip.split(","))
    if "cuda" not in skip:
        cuda_exactness(args.exact_device)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_overhead as so

    if "cpu" not in skip:
        argv = ["--threads", "1", "--variants", "plain,norms,routing"]
        if args.baseline_engine:
            argv = [*argv[:3], "plain,norms_base,norms,routing", "--baseline-engine", args.baseline_engine]
        argv += ["--quick"] if args.quick else ["--rounds", "9"]
        so.main(argv)
    if "gpu" not in skip:
        gpu_overhead([8] if args.quick else [64, 256], 3 if args.quick else 7)
    return 0


if __name__ == "__main__":
    sys.exit(main())
