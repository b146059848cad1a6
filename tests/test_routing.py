"""Depth-selective routing and per-sample clipping vs torch.func references (float64).

"A batch without example j" (for the bit-identity test) means the same B rows with example j's loss
multiplied by zero, so a mean-reduced loss keeps the divisor B: removing the row instead would change
the GEMM's reduction length, and no BLAS promises bit-identical sums for a different length.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from instrument import GradNormEngine
from tests.support_engine import (
    layer_of,
    oracle_grads,
    per_sample_loss,
    plain_grads,
    reduce,
    run_engine,
)
from tests.test_norms_oracle import Block, Reuse, WithFallbacks

torch.set_num_threads(1)
RED = ["mean", "sum"]
pytestmark = [
    pytest.mark.filterwarnings("ignore:There is a performance drop"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
        nn.Flatten(), nn.Linear(16, 8), nn.LayerNorm(8), nn.Linear(8, 3),
    ).double()  # fmt: skip


MODELS = {
    "cnn": (_cnn, lambda: torch.randn(6, 2, 5, 5, dtype=torch.float64)),
    "block": (lambda: Block().double(), lambda: torch.randint(0, 13, (6, 5))),
    "reuse": (lambda: Reuse().double(), lambda: torch.randint(0, 9, (6, 4))),
    "fallback": (lambda: WithFallbacks().double(), lambda: torch.randn(6, 3, 5, dtype=torch.float64)),
}


def _setup(kind: str) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(7)
    make_model, make_x = MODELS[kind]
    model, x = make_model(), make_x()
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, x, target


def _random_weights(b: int, L: int) -> Tensor:
    w = torch.rand(b, L, dtype=torch.float64)
    w[w < 0.3] = 0.0  # plenty of exact zeros
    w[0] = 1.0
    return w


def _close(a: Tensor, b: Tensor, what: str, tol: float = 1e-9) -> None:
    scale = max(float(b.abs().max()), 1e-300)
    err = float((a - b).abs().max()) / scale
    assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("reduction", RED)
def test_routed_grads_match_torch_func(kind: str, reduction: str) -> None:
    model, x, target = _setup(kind)
    names = GradNormEngine(model).layer_names
    w = _random_weights(x.shape[0], len(names))
    eng, _, _, grads = run_engine(model, x, target, reduction, weights=w)
    per = oracle_grads(model, x, target)
    b = x.shape[0]
    for pname, g in per.items():
        col = w[:, names.index(layer_of(pname, names))]
        ref = torch.tensordot(col, g, dims=1) / (b if reduction == "mean" else 1)
        _close(grads[pname], ref, f"routed grad of {pname}")


@pytest.mark.parametrize("kind", ["cnn", "block"])
def test_no_weights_equals_plain_autograd(kind: str) -> None:
    model, x, target = _setup(kind)
    _, _, _, grads = run_engine(model, x, target, "mean")
    plain = plain_grads(model, x, target, "mean")
    for n, g in plain.items():
        _close(grads[n], g, n, tol=1e-12)


def test_mlp_no_weights_bitwise_equal_plain() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    x, target = torch.randn(9, 6), torch.randn(9, 4)
    _, _, _, grads = run_engine(model, x, target, "mean")
    plain = plain_grads(model, x, target, "mean")
    assert all(torch.equal(grads[n], plain[n]) for n in plain)


def _masked_loss_grads(
    model: nn.Module, x: Tensor, target: Tensor, reduction: str, j: int, engine: bool
) -> dict[str, Tensor]:
    """Gradients for the batch in which example j contributes nothing (its loss times 0)."""
    mask = torch.ones(x.shape[0], dtype=torch.float64)
    mask[j] = 0.0
    model.zero_grad(set_to_none=True)
    eng = GradNormEngine(model, loss_reduction=reduction) if engine else None
    if eng is not None:
        eng.begin(x.shape[0])
    reduce(per_sample_loss(model(x), target) * mask, reduction).backward()
    if eng is not None:
        eng.end()
        eng.remove()
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("kind", ["block", "cnn"])
def test_barred_example_bit_identical_and_shallow_layers_still_train(reduction: str, kind: str) -> None:
    model, x, target = _setup(kind)
    names = GradNormEngine(model).layer_names
    deep = [i for i, n in enumerate(names) if n in ("head", "lnf", "ff2", "7", "6", "5")]
    shallow = [i for i in range(len(names)) if i not in deep]
    j = 3
    w = torch.ones(x.shape[0], len(names), dtype=torch.float64)
    w[j, deep] = 0.0  # example j: shallow layers only
    _, _, _, routed = run_engine(model, x, target, reduction, weights=w)
    without = _masked_loss_grads(model, x, target, reduction, j, engine=True)
    plain_without = _masked_loss_grads(model, x, target, reduction, j, engine=False)
    full = plain_grads(model, x, target, reduction)
    for pname in routed:
        li = names.index(layer_of(pname, names))
        if li in deep:
            assert torch.equal(routed[pname], without[pname]), (
                f"{pname}: not bit-identical to the batch without j"
            )
            _close(routed[pname], plain_without[pname], pname, tol=1e-12)
        else:  # shallow layers still get example j's gradient: the unrouted plain gradient
            _close(routed[pname], full[pname], pname, tol=1e-12)
            assert not torch.allclose(routed[pname], without[pname]), f"{pname} lost example j's gradient"
    assert deep and shallow


@pytest.mark.parametrize("path", ["linear-materialise", "linear-gram", "conv-groups", "conv-unfold"])
def test_barred_example_bit_identical_on_every_kernel_path(
    monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """The bit-identity above on each way a kernel can form the routed gradient (forced, several chunks)."""
    from instrument.kernels import conv as conv_mod
    from instrument.kernels import linear as linear_mod

    family, mode = path.split("-")
    if family == "linear":
        monkeypatch.setattr(linear_mod, "use_gram", lambda t, d_in, d_out, deferred=False: mode == "gram")
        monkeypatch.setattr(linear_mod, "MATERIALISE_BUDGET", 200)
    else:
        monkeypatch.setattr(conv_mod, "PER_SAMPLE_MODE", mode)
        monkeypatch.setattr(conv_mod, "MATERIALISE_BUDGET", 300)
    test_barred_example_bit_identical_and_shallow_layers_still_train(
        "mean", "block" if family == "linear" else "cnn"
    )


def test_linear_bit_identical_to_plain_autograd_without_example() -> None:
    """On the Linear GEMM path the routed gradient is even bit-identical to plain autograd's."""
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3)
    ).double()
    x, target = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64)
    w = torch.ones(8, 3, dtype=torch.float64)
    w[2, 1:] = 0.0
    _, _, _, routed = run_engine(model, x, target, "mean", weights=w)
    plain_without = _masked_loss_grads(model, x, target, "mean", 2, engine=False)
    for p in ("2.weight", "2.bias", "4.weight", "4.bias"):
        assert torch.equal(routed[p], plain_without[p]), p


@pytest.mark.parametrize("kind", ["cnn", "block", "fallback"])
@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("routed", [False, True])
def test_clipping_matches_torch_func(kind: str, reduction: str, routed: bool) -> None:
    model, x, target = _setup(kind)
    names = GradNormEngine(model).layer_names
    b = x.shape[0]
    w = _random_weights(b, len(names)) if routed else torch.ones(b, len(names), dtype=torch.float64)
    per = oracle_grads(model, x, target)
    sq = torch.zeros(b, dtype=torch.float64)
    for pname, g in per.items():
        col = w[:, names.index(layer_of(pname, names))]
        sq += (col.reshape(-1, *[1] * (g.dim() - 1)) * g).reshape(b, -1).square().sum(1)
    total = sq.sqrt()
    C = float(total.median())  # about half the samples are clipped
    c_ref = (C / (total + 1e-6)).clamp(max=1.0)
    _, _, clip, grads = run_engine(
        model, x, target, reduction, weights=w if routed else None, max_grad_norm=C
    )
    assert clip is not None
    _close(clip, c_ref, "clip factors")
    assert bool((c_ref < 1).any()) and bool((c_ref == 1).any())
    for pname, g in per.items():
        col = w[:, names.index(layer_of(pname, names))] * c_ref
        ref = torch.tensordot(col, g, dims=1) / (b if reduction == "mean" else 1)
        _close(grads[pname], ref, f"clipped grad of {pname}")


def test_clipping_with_opacus_per_sample_grads() -> None:
    """Same clipped sum as Opacus's GradSampleModule per-sample gradients + its clipping formula."""
    from opacus import GradSampleModule

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, target = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    _, _, clip, grads = run_engine(model, x, target, "mean", max_grad_norm=0.5)
    gsm = GradSampleModule(model, loss_reduction="mean")
    reduce(per_sample_loss(gsm(x), target), "mean").backward()
    ps = [p.grad_sample for p in gsm.parameters()]
    norms = torch.stack([g.reshape(7, -1).norm(dim=1) for g in ps], 1).norm(dim=1)
    c = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    assert clip is not None
    _close(clip, c, "clip factors vs opacus")
    for (n, _), g in zip(model.named_parameters(), ps, strict=True):
        _close(grads[n], torch.einsum("i,i...->...", c, g) / 7, n)
    gsm._close()


@pytest.mark.parametrize("clip", [None, 1.0])
def test_gradient_accumulation_across_windows(clip: float | None) -> None:
    model, x, target = _setup("block")
    names = GradNormEngine(model).layer_names
    eng = GradNormEngine(model)
    model.zero_grad(set_to_none=True)
    norms = []
    expected: dict[str, Tensor] = {}
    for half in (slice(0, 3), slice(3, 6)):
        _, n1, _, g1 = run_engine(model, x[half], target[half], "mean", max_grad_norm=clip)
        for k, v in g1.items():
            expected[k] = expected.get(k, 0) + v
        norms.append(n1)
    model.zero_grad(set_to_none=True)
    for half in (slice(0, 3), slice(3, 6)):  # two windows, one optimizer step: .grad accumulates
        eng.begin(3, max_grad_norm=clip)
        reduce(per_sample_loss(model(x[half]), target[half]), "mean").backward()
        res = eng.end()
        assert len(names) == res.norms.shape[1]
    for n, p in model.named_parameters():
        _close(p.grad, expected[n], n, tol=1e-12)
    # several backward passes (micro-batches) in one window: rows concatenate, .grad accumulates
    model.zero_grad(set_to_none=True)
    eng.begin(6, max_grad_norm=clip)
    for half in (slice(0, 3), slice(3, 6)):
        reduce(per_sample_loss(model(x[half]), target[half]), "mean").backward()
    res = eng.end()
    _close(res.norms, torch.cat(norms), "micro-batch norms", tol=1e-12)
    for n, p in model.named_parameters():
        _close(p.grad, expected[n], n, tol=1e-12)
    eng.remove()


def test_routing_weights_reach_only_their_layer() -> None:
    """Scaling one layer's column changes that layer's gradient and no other."""
    model, x, target = _setup("block")
    names = GradNormEngine(model).layer_names
    w = torch.ones(6, len(names), dtype=torch.float64)
    li = names.index("ff1")
    w[:, li] = 0.5
    _, norms_w, _, routed = run_engine(model, x, target, "sum", weights=w)
    _, norms_1, _, plain = run_engine(model, x, target, "sum")
    torch.testing.assert_close(norms_w, norms_1, rtol=0, atol=0)  # norms are unrouted
    for pname in plain:
        if layer_of(pname, names) == "ff1":
            _close(routed[pname], 0.5 * plain[pname], pname, tol=1e-12)
        else:
            assert torch.equal(routed[pname], plain[pname]), pname
