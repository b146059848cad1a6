"""Influence benchmarks: gradient-sketch cost per training step, and query time against a large ledger.

    .venv/bin/python benchmarks/influence_bench.py            # full mode (figures quoted in BENCHMARKS.md)
    .venv/bin/python benchmarks/influence_bench.py --quick    # seconds; exercised by tests/test_influence_bench.py

Part 1, step overhead (CPU, one thread). One step = zero_grad, forward, mean cross-entropy, backward, SGD
step. Variants, run round-robin in one process on the same data, medians over rounds, ratios against
``plain`` from the same run:
  plain        plain PyTorch
  kron128      + ``instrument.sketch.Sketcher`` on the last two Linear layers, Kronecker sketches at k = 128,
               with ``collect()`` to numpy (what a step entry would carry)
  kron+rank1   the second-to-last layer as kron128, the head as exact rank-1 factors
Models: the MLP 64-512-512-512-10 of the step-overhead benchmark, and a sequence model (token features
[B, T=32, 64] -> Linear 64-256 -> GELU -> Linear 256-256 -> GELU -> mean over T -> Linear 256-10), whose
second-to-last sketched layer sees T = 32 positions per sample. Both wall-clock and per-thread CPU time
(``time.thread_time``, robust to other jobs on the shared machine) are reported.

Part 2, query time. A SQLite ledger with a synthetic run: N sample-steps (full: 1,000,000 = 10 epochs x
100,000 examples, B = 256) whose step entries carry *synthetic* (random) k = 128 Kronecker sketches of a
256x256 layer, one checkpoint (with a saved, verified state) per epoch. Timed: ``audit.influence`` for 100
query inputs through all 10 checkpoint windows (read every step entry, decode, score, rank, split the
top rows by window) -- the end-to-end figure -- and the scoring kernel alone over in-memory steps.
The sketches are random, so only the time is meaningful, not the rankings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audit.influence import TrainingStep, influence, tracin_scores  # noqa: E402
from instrument.sketch import Sketcher, StateStore  # noqa: E402


# ------------------------------------------------------------------------------------------ step overhead
class SeqNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.head = nn.Linear(64, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.mid(F.gelu(self.inp(x)))).mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Any, tuple[int, ...], list[str]]] = {
    "mlp": (mlp, (64,), ["4", "6"]),
    "seq": (SeqNet, (32, 64), ["mid", "head"]),
}


def step_overhead(batches: list[int], rounds: int, steps: int) -> list[dict[str, Any]]:
    out = []
    for name, (factory, shape, layers) in MODELS.items():
        for b in batches:
            torch.manual_seed(0)
            x = torch.randn(b, *shape)
            y = torch.randint(0, 10, (b,))
            runs: dict[str, tuple[nn.Module, torch.optim.Optimizer, Sketcher | None]] = {}
            for variant in ("plain", "kron128", "kron+rank1"):
                model = factory()
                opt = torch.optim.SGD(model.parameters(), lr=0.01)
                sk = None
                if variant != "plain":
                    methods = {layers[1]: "rank1"} if variant == "kron+rank1" else {}
                    sk = Sketcher(model, layers, k=128, seed=0, methods=methods)
                runs[variant] = (model, opt, sk)
            wall: dict[str, list[float]] = {v: [] for v in runs}
            cpu: dict[str, list[float]] = {v: [] for v in runs}
            for r in range(rounds + 1):  # round 0 is warm-up
                for variant, (model, opt, sk) in runs.items():
                    t0, c0 = time.perf_counter(), time.thread_time()
                    for _ in range(steps):
                        opt.zero_grad()
                        F.cross_entropy(model(x), y).backward()
                        if sk is not None:
                            sk.collect(expected_rows=b)
                        opt.step()
                    if r:
                        wall[variant].append((time.perf_counter() - t0) / steps)
                        cpu[variant].append((time.thread_time() - c0) / steps)
            base_w, base_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
            for variant in runs:
                w, c = statistics.median(wall[variant]), statistics.median(cpu[variant])
                out.append({
                    "part": "step", "model": name, "B": b, "variant": variant, "wall_ms": w * 1e3,
                    "cpu_ms": c * 1e3, "ratio_wall": w / base_w, "ratio_cpu": c / base_c,
                })  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------- query time
def query_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def build_ledger(path: Path, n_examples: int, epochs: int, batch: int) -> dict[str, Any]:
    """A synthetic run: random k=128 sketches of layer '2' in every step, a checkpoint + state per epoch."""
    from instrument.tracker import model_digests
    from ledger.store import Ledger, NewEntry

    torch.manual_seed(0)
    model = query_model()
    layers = ["0", "2", "4"]
    sk = Sketcher(model, ["2"], k=128, seed=1)
    sk.remove()
    spec = sk.specs["2"]
    store = StateStore(StateStore.beside(path))
    rng = np.random.default_rng(0)
    ids = [f"ex-{i:06d}" for i in range(n_examples)]
    t0 = time.perf_counter()
    with Ledger.open(path, create=True) as led:
        run_body = {
            "run": "synthetic", "architecture": {"layers": [{"name": n} for n in layers]},
            "optimizer": {"name": "SGD"}, "loss_reduction": "mean", "sketch": sk.body(),
        }  # fmt: skip
        run_seq = led.append("run", run_body)
        run_seq = run_seq if isinstance(run_seq, int) else run_seq.seq
        step = 0
        for epoch in range(epochs):
            perm = rng.permutation(n_examples)
            pending = []
            for lo in range(0, n_examples, batch):
                rows = perm[lo : lo + batch]
                b = len(rows)
                body = {
                    "run": "synthetic", "run_seq": run_seq, "step": step, "epoch": epoch,
                    "example_ids": [ids[i] for i in rows], "layers": layers, "lr": [0.1, 0.1, 0.1],
                }  # fmt: skip
                payloads = {
                    "grad_norms": np.ones((b, 3), np.float32),
                    "weights": np.ones((b, 3), np.float32),
                    "sketch.2": rng.standard_normal((b, spec.k), dtype=np.float32),
                }
                pending.append(NewEntry("step", body, payloads))
                step += 1
                if len(pending) == 64:
                    led.append_many(pending)
                    pending = []
            if pending:
                led.append_many(pending)
            with torch.no_grad():  # a different state per epoch
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
            store.put(model.state_dict())
            led.append("checkpoint", {"run": "synthetic", "run_seq": run_seq, "tag": f"epoch{epoch}",
                                      "step": step, **model_digests(model, layers)})  # fmt: skip
    return {"build_s": time.perf_counter() - t0, "steps": step}


def query_time(sample_steps: int, queries: int, repeats: int) -> list[dict[str, Any]]:
    epochs = 10
    n_examples = sample_steps // epochs
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "synthetic.db"
        built = build_ledger(path, n_examples, epochs, batch=256)
        size_mb = path.stat().st_size / 2**20
        torch.manual_seed(1)
        x = torch.randn(queries, 64).numpy()
        y = torch.randint(0, 10, (queries,)).numpy()
        from ledger.store import Ledger

        with Ledger.open(path) as led:
            times, cpu = [], []
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                res = influence(led, "synthetic", query_model, x, y, top=10)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
            assert res.sample_steps == n_examples * epochs and len(res.rows) == 10 * queries
            # the scoring kernel alone: steps already decoded in memory
            steps = [TrainingStep.from_entry(e) for e in led.entries(kind="step")]
            ck = [e.seq for e in led.entries(kind="checkpoint", payloads=False)]
        rng = np.random.default_rng(2)
        qp = {w: {"sketch.2": rng.standard_normal((queries, 128))} for w in range(epochs)}
        from audit.influence import sketch_specs
        from ledger.records import run_record

        with Ledger.open(path) as led:
            specs = list(sketch_specs(run_record(led, "synthetic").body, "synthetic").values())
        kernel = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            tracin_scores(lambda: steps, ck, list(range(epochs)), qp.__getitem__, specs, 10)
            kernel.append(time.perf_counter() - t0)
        out.append({
            "part": "query", "sample_steps": n_examples * epochs, "examples": n_examples, "steps": built["steps"],
            "queries": queries, "k": 128, "windows": epochs, "ledger_mb": size_mb, "build_s": built["build_s"],
            "influence_s": statistics.median(times), "influence_cpu_s": statistics.median(cpu), "kernel_s": statistics.median(kernel),
        })  # fmt: skip
    return out


def _print(r: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(r), flush=True)
    elif r["part"] == "step":
        print(
            f"step  {r['model']:<4} B={r['B']:<4} {r['variant']:<11} wall {r['wall_ms']:8.2f} ms "
            f"(x{r['ratio_wall']:.2f})  cpu {r['cpu_ms']:8.2f} ms (x{r['ratio_cpu']:.2f})",
            flush=True,
        )
    else:
        print(
            f"query {r['queries']} inputs vs {r['sample_steps']:,} sample-steps ({r['examples']:,} examples, "
            f"{r['steps']} steps, {r['windows']} checkpoints, k={r['k']}, ledger {r['ledger_mb']:.0f} MiB): "
            f"influence() {r['influence_s']:.2f} s wall / {r['influence_cpu_s']:.2f} s cpu, scoring kernel "
            f"alone {r['kernel_s']:.2f} s (build {r['build_s']:.1f} s)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes; finishes in seconds")
    ap.add_argument("--part", choices=["all", "step", "query"], default="all")
    ap.add_argument("--repeats", type=int, default=3, help="influence() repetitions (median)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true", help="print one JSON object per figure")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    if args.part in ("all", "step"):
        for r in step_overhead([16], 2, 2) if args.quick else step_overhead([64, 256], rounds=7, steps=5):
            _print(r, args.json)
            rows.append(r)
    if args.part in ("all", "query"):
        qs = query_time(4_000, 5, 1) if args.quick else query_time(1_000_000, 100, args.repeats)
        for r in qs:
            _print(r, args.json)
            rows.append(r)
    return rows


if __name__ == "__main__":
    main()
