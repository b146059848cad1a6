"""The influence benchmark's --quick mode runs and reports every figure it promises."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch


def test_influence_bench_quick(capsys) -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "influence_bench.py"
    spec = importlib.util.spec_from_file_location("influence_bench", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    try:
        rows = mod.main(["--quick"])
    finally:
        torch.set_num_threads(threads)
    steps = [r for r in rows if r["part"] == "step"]
    assert {(r["model"], r["variant"]) for r in steps} == {
        (m, v) for m in ("mlp", "seq") for v in ("plain", "kron128", "kron+rank1")
    }
    assert all(r["wall_ms"] > 0 and r["cpu_ms"] > 0 for r in steps)
    assert all(r["ratio_cpu"] == 1.0 for r in steps if r["variant"] == "plain")
    (query,) = [r for r in rows if r["part"] == "query"]
    assert query["sample_steps"] == 4_000 and query["windows"] == 10 and query["influence_s"] > 0
    assert "sample-steps" in capsys.readouterr().out
