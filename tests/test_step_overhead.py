"""benchmarks/step_overhead.py --quick runs every variant and reports sane numbers (speed is not tested)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

pytestmark = pytest.mark.filterwarnings("ignore")


def test_quick_benchmark_runs_all_variants(capsys: pytest.CaptureFixture[str]) -> None:
    import step_overhead

    assert step_overhead.main(["--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    variants = set(step_overhead.VARIANTS)
    assert {"plain", "norms", "routing", "opacus_hooks", "opacus_ghost"} <= variants
    for model in ("mlp", "cnn", "transformer"):
        got = {r["variant"] for r in rows if r["model"] == model}
        assert got == variants, model
    for r in rows:
        assert r["cpu_ms"] > 0 and r["wall_ms"] > 0 and r["cpu_x_plain"] > 0
        if r["variant"] == "plain":
            assert r["cpu_x_plain"] == 1.0
    mem = [r for r in rows if r["peak_extra_mib"] is not None]
    assert {r["variant"] for r in mem} == {"plain", "norms"} and all(r["peak_extra_mib"] > 0 for r in mem)


def test_quick_benchmark_pairs_against_a_baseline_engine(capsys: pytest.CaptureFixture[str]) -> None:
    """--baseline-engine adds norms_base and, per variant, the same-round CPU difference against it."""
    import step_overhead

    engine_dir = str(Path(__file__).resolve().parent.parent / "instrument")
    argv = ["--quick", "--json", "--no-memory", "--models", "mlp", "--rounds", "3"]
    argv += ["--variants", "plain,norms_base,norms", "--baseline-engine", engine_dir]
    assert step_overhead.main(argv) == 0
    rows = {r["variant"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"plain", "norms_base", "norms"}
    assert rows["norms_base"]["paired_ms_vs_base"] == 0.0 and rows["norms_base"]["faster_than_base"] == 0
    assert rows["norms"]["rounds"] == 3 and 0 <= rows["norms"]["faster_than_base"] <= 3
    assert isinstance(rows["norms"]["paired_ms_vs_base"], float)
    # the text report prints the paired line for every variant but the baseline itself
    argv.remove("--json")
    assert step_overhead.main(argv) == 0
    out = capsys.readouterr().out
    assert "same-round CPU difference vs norms_base" in out and out.count("/3") == 2


def test_engine_kernels_quick_reports_every_kernel_type(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/engine_kernels.py --quick: per-kernel CPU for the engine, a baseline copy and gemm_only."""
    import engine_kernels

    engine_dir = str(Path(__file__).resolve().parent.parent / "instrument")
    argv = ["--quick", "--json", "--models", "transformer", "--baseline-engine", engine_dir]
    assert engine_kernels.main(argv) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (
        set(row["x_plain"]) == {"plain", "norms", "norms_base", "gemm_only"}
        and row["x_plain"]["plain"] == 1.0
    )
    for v in ("norms", "norms_base", "gemm_only"):
        assert set(row["kernel_ms"][v]) == {"Embedding", "LayerNorm", "Linear"}
        assert all(ms > 0 for ms in row["kernel_ms"][v].values())
    assert engine_kernels.main(["--quick", "--plain-kernels", "Conv2d"]) == 2
    assert "unknown --plain-kernels ['Conv2d']" in capsys.readouterr().err


def test_unknown_variant_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    import step_overhead

    assert step_overhead.main(["--quick", "--variants", "plain,nope", "--no-memory"]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err


def test_device_check_exactness_part_runs_on_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/engine_device_check.py (meant for a GPU machine): its exactness part, dry-run on the CPU."""
    import engine_device_check

    argv = ["engine_device_check.py", "--quick", "--exact-device", "cpu", "--skip", "cpu,gpu"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", argv)
        assert engine_device_check.main() == 0
    out = capsys.readouterr().out
    assert out.count("cpu exact:") == 5 and "match torch.func" in out
