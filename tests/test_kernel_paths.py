"""Every speed path of the kernels is exact: each way of computing a layer's norms and gradients is forced in
turn and checked against the torch.func oracle (float64), so a path the cost model does not pick for the
shapes in test_norms_oracle.py is still covered."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from instrument.kernels import conv as conv_mod
from instrument.kernels import linear as linear_mod
from tests.support_engine import (
    assert_rel_close,
    check_model,
    layer_of,
    oracle_grads,
    run_engine,
)

torch.set_num_threads(1)

CONV_KW = [
    dict(padding=1),
    dict(stride=2, padding=1),
    dict(padding=2, dilation=2, groups=2),
    dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False),
    dict(padding="same"),
    dict(padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("kw", CONV_KW, ids=[str(k) for k in CONV_KW])
def test_fast_unfold_equals_f_unfold(kw: dict) -> None:
    conv = nn.Conv2d(4, 6, 3, **kw)
    x = torch.randn(3, 4, 7, 6, dtype=torch.float64)
    xp, pad = conv_mod._padded(conv, x)
    k, s, d = conv_mod._as_2d(conv)
    ref = F.unfold(xp, k, dilation=d, padding=tuple(pad), stride=s)
    assert torch.equal(conv_mod._unfold(xp, False, k, s, d, tuple(pad)), ref)


def test_fast_unfold_conv1d() -> None:
    conv = nn.Conv1d(3, 4, 3, stride=2, padding=1, dilation=2)
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    k, s, d = conv_mod._as_2d(conv)
    ref = F.unfold(x.unsqueeze(2), k, dilation=d, padding=(0, 1), stride=s)
    assert torch.equal(conv_mod._unfold(x, True, k, s, d, (1,)), ref)


def _routed_reference(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor, w: torch.Tensor, layers: list[str]
) -> dict[str, torch.Tensor]:
    """Σ_i w_il ∇ℓ_i per parameter from the oracle's per-sample gradients (sum reduction)."""
    per = oracle_grads(model, x, target)
    return {
        n: torch.einsum("b,b...->...", w[:, layers.index(layer_of(n, layers))], g) for n, g in per.items()
    }


def check_routed(model: nn.Module, x: torch.Tensor, seed: int, what: str) -> None:
    """Routed .grad (random weights in [0, 1) per example and layer, sum reduction) against the reference."""
    with torch.no_grad():
        target = torch.randn_like(model(x))
    torch.manual_seed(seed)
    n_layers = sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False)))
    w = torch.rand(x.shape[0], n_layers, dtype=torch.float64)
    eng, _, _, grads = run_engine(model, x, target, "sum", weights=w)
    ref = _routed_reference(model, x, target, w, eng.layer_names)
    for n, g in ref.items():
        assert_rel_close(grads[n], g, 1e-9, f"routed .grad of {n} ({what})")


@pytest.mark.parametrize("mode", ["groups", "unfold"])
def test_conv_per_sample_modes_exact(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """Both ways of materialising per-sample conv gradients, with 8+ channels (groups by default) and 3."""
    monkeypatch.setattr(conv_mod, "PER_SAMPLE_MODE", mode)
    monkeypatch.setattr(conv_mod, "MATERIALISE_BUDGET", 3000)  # several chunks
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.Tanh(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 3),
    ).double()  # fmt: skip
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    check_model(model, x, "mean")
    check_model(model, x, "sum")
    # routed gradients on the same path: Σ_i w_il ∇ℓ_i (sum reduction)
    check_routed(model, x, seed=0, what=mode)


def test_default_conv_mode_by_channels() -> None:
    assert not conv_mod._grouped_backward_is_faster(nn.Conv2d(3, 16, 3), 1024)
    assert conv_mod._grouped_backward_is_faster(nn.Conv2d(16, 32, 3), 256)
    assert not conv_mod._grouped_backward_is_faster(nn.Conv2d(16, 32, 3, groups=4), 256)


@pytest.mark.parametrize("gram", [True, False])
def test_linear_sequence_both_paths_exact(monkeypatch: pytest.MonkeyPatch, gram: bool) -> None:
    monkeypatch.setattr(linear_mod, "use_gram", lambda t, d_in, d_out, deferred=False: gram)
    monkeypatch.setattr(linear_mod, "MATERIALISE_BUDGET", 50)  # several chunks when materialising
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3, bias=False)).double()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    check_model(model, x, "mean")
    check_routed(model, x, seed=1, what=f"gram={gram}")


def test_cost_model_measured_choices() -> None:
    """The measured model's choices at T=32 (BENCHMARKS.md): materialise the transformer's layers, Gram for
    wide square ones; long sequences materialise; per-sample clipping (no kept gradients) favours Gram."""
    assert not linear_mod.use_gram(32, 64, 512) and not linear_mod.use_gram(32, 64, 64)
    assert linear_mod.use_gram(32, 512, 512) and linear_mod.use_gram(16, 64, 256)
    assert not linear_mod.use_gram(128, 512, 512)
    assert not linear_mod.use_gram(128, 64, 192)
    assert linear_mod.use_gram(32, 64, 512, deferred=True)
    assert linear_mod.use_gram(1, 3, 3)


def test_embedding_repeats_in_some_rows_only() -> None:
    """Rows with repeated tokens and rows without, in one batch (the grouping and the no-repeat shortcut)."""
    emb = nn.Embedding(6, 3).double()
    model = nn.Sequential(emb, nn.Flatten(), nn.Linear(12, 2)).double()
    idx = torch.tensor([[0, 1, 2, 3], [1, 1, 1, 4], [5, 4, 5, 4]])
    with torch.no_grad():
        target = torch.randn(3, 2, dtype=torch.float64)
    eng, norms, _, _ = run_engine(model, idx, target, "sum")
    per = oracle_grads(model, idx, target)
    ref = per["0.weight"].reshape(3, -1).norm(dim=1)
    assert_rel_close(norms[:, 0], ref, 1e-9, "embedding norms")


def test_layer_norm_saved_and_recomputed_statistics() -> None:
    """LayerNorm's x̂ from the forward's saved mean/rstd (input requires grad) and recomputed (first layer on
    raw data: no autograd node), both against the oracle; weight reuse mixes the two in one layer."""
    from instrument.kernels import layer_norm as ln_mod

    ln = nn.LayerNorm(5).double().requires_grad_(False)  # as in an armed call: parameters detached
    assert ln_mod._saved_stats(ln(torch.randn(2, 5, dtype=torch.float64))) is None  # no node: recompute
    assert ln_mod._saved_stats(ln(torch.randn(2, 5, dtype=torch.float64, requires_grad=True))) is not None

    class TwoNorms(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.lin, self.ln = nn.LayerNorm(5), nn.Linear(5, 5), nn.LayerNorm(5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.lin(self.first(x))) + self.ln(x)  # self.ln: saved, then recomputed

    model = TwoNorms().double()
    check_model(model, torch.randn(4, 3, 5, dtype=torch.float64) * 3 + 1, "mean")
    check_model(model.float(), torch.randn(4, 3, 5) * 3 + 1, "sum", tol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 3, 5), (4, 5), (4, 2, 3, 5)])
def test_layer_norm_one_call_and_generic_paths(shape: tuple[int, ...], bias: bool) -> None:
    """One call with weight and bias takes the [b, 2, P] path (one norm, a GEMV per parameter); a
    LayerNorm without bias takes the generic materialised path: both against the oracle, plain and routed,
    for sequence, 2-D and 4-D inputs."""
    model = nn.Sequential(nn.Linear(5, 5), nn.LayerNorm(5, bias=bias), nn.Linear(5, 3)).double()
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    check_model(model, x, "mean")
    check_model(model, x, "sum")
    check_routed(model, x, seed=2, what=f"layer norm bias={bias} shape={shape}")


def test_layer_norm_kernel_input_narrower_than_backprops() -> None:
    """Under autocast a LayerNorm's input can be narrower than its output/backprops (fp16 in, fp32 out); both
    x̂ paths then compute in the backprops' dtype and equal the float64 per-sample gradients."""
    from instrument.kernels import Call, Request
    from instrument.kernels import layer_norm as ln_mod

    torch.manual_seed(0)
    ln = nn.LayerNorm(6).double()
    x64 = torch.randn(3, 4, 6, dtype=torch.float64) * 2 + 1
    g64 = torch.randn(3, 4, 6, dtype=torch.float64)
    x32 = x64.float()
    xhat = F.layer_norm(x32.double(), (6,), None, None, ln.eps)
    ref = torch.cat([(g64 * xhat).sum(1), g64.sum(1)], 1).norm(dim=1)
    mean, var = x32.double().mean(-1, keepdim=True), x32.double().var(-1, unbiased=False, keepdim=True)
    saved = (mean.float(), (var + ln.eps).rsqrt().float())
    for stats in (None, saved):
        call = Call((x32,), {}, None, 1, [0], [(g64.shape, g64.dtype, g64.device)], [g64], True, stats)
        res = ln_mod.layer_norm_kernel(ln, [call], Request())
        assert res.norm_sq.dtype == torch.float64
        assert_rel_close(res.norm_sq.sqrt(), ref, 1e-6, f"stats={'saved' if stats else 'recomputed'}")
