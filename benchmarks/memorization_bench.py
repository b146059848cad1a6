"""Memorisation / label-disagreement ranking on digits with planted label flips (issue 6), several seeds.

For each seed and scenario (``uniform``: 10% of training labels flipped to a uniformly chosen other class;
``confusable``: 10% flipped to the class a clean cross-fitted model confuses most), trains the MLP
64-128-128-10 with SGD (tests/support_digits.py), ranks every example with ``audit.memorization``, and
prints AUROC and precision@k (k = number flipped) of:
  self_influence  the whole-run per-layer self-influence score
  final_epoch     the same score from the last epoch's records only (final-checkpoint comparison)
  mean_loss, aum  the baselines (mean training loss; negated area under the margin)
plus a shuffled flip mask (one permutation, and the mean of 20) as a null check.
Targets (uniform): AUROC >= 0.98, p@k >= 0.85, whole-run minus final-epoch AUROC >= 0.05, shuffled in
[0.45, 0.55]; (confusable): AUROC >= 0.97. Baselines are reported as measured, whichever wins.

    .venv/bin/python benchmarks/memorization_bench.py            # full: 5 seeds x 2 scenarios
    .venv/bin/python benchmarks/memorization_bench.py --quick    # 1 seed, uniform only (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import support_digits as sd  # noqa: E402

from audit.memorization import final_epoch_ranking, rank_memorization  # noqa: E402
from audit.metrics import auroc  # noqa: E402

TRAIN = dict(epochs=60, batch_size=64, lr=0.05, momentum=0.9)
EPS = 0.3


def one_run(scenario: str, seed: int, repeats: int) -> dict[str, Any]:
    data = sd.load_data(seed, eps=EPS)
    if scenario == "uniform":
        y, mask = sd.flip_uniform(data.y_train, 0.1, seed)
    else:
        y, mask = sd.flip_confusable(
            data.y_train, 0.1, seed, sd.confusable_pairing(data.x_train, data.y_train)
        )
    t0 = time.perf_counter()
    model, recs = sd.train(data.x_train, y, data.ids, seed=seed, **TRAIN)
    train_s = time.perf_counter() - t0
    rank_times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = rank_memorization(recs)
        rank_times.append(time.perf_counter() - t0)
    final = final_epoch_ranking(recs)
    flipped = {data.ids[i] for i in np.flatnonzero(mask)}
    ev = res.evaluate(flipped)
    ev["final_epoch"] = final.evaluate(flipped)["self_influence"]
    labels = np.array([e in flipped for e in res.example_ids])
    rng = np.random.default_rng(1000 + seed)
    null = [auroc(rng.permutation(labels), res.arrays["self_influence"]) for _ in range(20)]
    with torch.no_grad():
        fit = (model(torch.as_tensor(data.x_train)).argmax(1).numpy() == y)[mask].mean()
        test_acc = (model(torch.as_tensor(data.x_test)).argmax(1).numpy() == data.y_test).mean()
    return {
        "scenario": scenario,
        "seed": seed,
        "flipped": int(mask.sum()),
        "examples": len(res.example_ids),
        "auroc": {k: v["auroc"] for k, v in ev.items()},
        "precision_at_k": {k: v["precision_at_k"] for k, v in ev.items()},
        "gap_vs_final": ev["self_influence"]["auroc"] - ev["final_epoch"]["auroc"],
        "shuffled_auroc": null[0],
        "shuffled_auroc_mean20": float(np.mean(null)),
        "classes_of_flipped": {
            c: sum(res.row(e).category == c for e in flipped) for c in ("memorised", "unresolved", "easy")
        },
        "flipped_fit_at_end": float(fit),
        "test_accuracy": float(test_acc),
        "train_s": train_s,
        "rank_s_median": statistics.median(rank_times),
        "steps": len(recs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, uniform flips only")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [0] if args.quick else list(range(args.seeds))
    scenarios = ["uniform"] if args.quick else ["uniform", "confusable"]
    runs = [one_run(sc, s, 1 if args.quick else 3) for sc in scenarios for s in seeds]
    report: dict[str, Any] = {"mode": "quick" if args.quick else "full", "train": TRAIN, "runs": runs}
    summary = {}
    for sc in scenarios:
        rs = [r for r in runs if r["scenario"] == sc]
        summary[sc] = {
            "auroc_median": {k: statistics.median(r["auroc"][k] for r in rs) for k in rs[0]["auroc"]},
            "auroc_min": {k: min(r["auroc"][k] for r in rs) for k in rs[0]["auroc"]},
            "p_at_k_median": {
                k: statistics.median(r["precision_at_k"][k] for r in rs) for k in rs[0]["precision_at_k"]
            },
            "p_at_k_min": {k: min(r["precision_at_k"][k] for r in rs) for k in rs[0]["precision_at_k"]},
            "gap_vs_final_min": min(r["gap_vs_final"] for r in rs),
            "shuffled_range": [min(r["shuffled_auroc"] for r in rs), max(r["shuffled_auroc"] for r in rs)],
            "rank_s_median": statistics.median(r["rank_s_median"] for r in rs),
            "train_s_median": statistics.median(r["train_s"] for r in rs),
        }
    report["summary"] = summary
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    cols = ["self_influence", "final_epoch", "mean_loss", "aum"]
    print(
        f"{'scenario':<11}{'seed':>5}  "
        + "  ".join(f"{c + ' AUROC/p@k':>24}" for c in cols)
        + f"{'gap':>8}{'shuffled':>10}{'fit':>6}"
    )
    for r in runs:
        cells = "  ".join(f"{r['auroc'][c]:>15.4f} / {r['precision_at_k'][c]:.3f}" for c in cols)
        print(
            f"{r['scenario']:<11}{r['seed']:>5}  {cells}{r['gap_vs_final']:>8.4f}"
            f"{r['shuffled_auroc']:>10.4f}{r['flipped_fit_at_end']:>6.2f}"
        )
    for sc, s in summary.items():
        print(f"\n{sc}: median AUROC " + ", ".join(f"{k} {v:.4f}" for k, v in s["auroc_median"].items()))
        print(f"{sc}: min AUROC    " + ", ".join(f"{k} {v:.4f}" for k, v in s["auroc_min"].items()))
        print(f"{sc}: median p@k   " + ", ".join(f"{k} {v:.3f}" for k, v in s["p_at_k_median"].items()))
        print(f"{sc}: min p@k      " + ", ".join(f"{k} {v:.3f}" for k, v in s["p_at_k_min"].items()))
        print(
            f"{sc}: min gap vs final {s['gap_vs_final_min']:.4f}; shuffled AUROC range "
            f"[{s['shuffled_range'][0]:.4f}, {s['shuffled_range'][1]:.4f}]; ranking "
            f"{s['rank_s_median'] * 1000:.0f} ms (median), training {s['train_s_median']:.1f} s (median)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
