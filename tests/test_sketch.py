"""Gradient sketches vs exact per-sample gradients from torch.func (float64 oracle)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from instrument.sketch import (
    LayerSketchSpec,
    Sketcher,
    SketchError,
    derive_seed,
    kron_sketch,
    linear_form,
    make_spec,
    projection_matrix,
    rank1_dot,
    sketch_batch,
    split_k,
)

torch.set_num_threads(1)


def per_sample_grads(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> dict[str, torch.Tensor]:
    """Oracle: each sample's own-loss gradient of every parameter, via vmap(grad(functional_call))."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, p, (xi.unsqueeze(0),))
        if loss == "ce":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), yi.reshape(-1), reduction="sum")
        return (out * yi.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)


def flat_grad(grads: dict[str, torch.Tensor], layer: str, bias: bool) -> torch.Tensor:
    """``[B, d_out, d_in (+1)]``: weight gradient (conv weights flattened) with the bias column appended."""
    w = grads[f"{layer}.weight"]
    w = w.reshape(w.shape[0], w.shape[1], -1)
    if bias:
        w = torch.cat([w, grads[f"{layer}.bias"].unsqueeze(-1)], dim=-1)
    return w


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, h: int = 9, c: int = 5) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(d_in, h), nn.Linear(h, h), nn.Linear(h, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SeqNet(nn.Module):
    """Linear over a sequence dim, with and without bias, then a mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.proj, self.mix, self.head = nn.Linear(6, 7), nn.Linear(7, 7, bias=False), nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(torch.tanh(self.proj(x)))).mean(1))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(2, 3, 3, padding="same")
        self.c2 = nn.Conv2d(1, 4, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2))
        self.head = nn.Linear(3 * 8 + 4 * 4 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.c1(x[:, :2, 0, :]))  # [B, 3, 8]
        b = torch.relu(self.c2(x[:, 2:3]))  # [B, 4, 4, 8]
        return self.head(torch.cat([a.flatten(1), b.flatten(1)], 1))


def _eye_sketch(model: nn.Module, layer: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Run the Sketcher machinery with identity projections: the sketch is the exact flattened gradient."""
    mod = dict(model.named_modules())[layer]
    bias = mod.bias is not None
    captured: dict[str, torch.Tensor] = {}

    def fwd(_m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        captured["a"] = inp[0].detach()
        out.register_hook(lambda g: captured.__setitem__("g", g.detach()))

    h = mod.register_forward_hook(fwd)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    h.remove()
    a, g = linear_form(mod, captured["a"], captured["g"])
    eye_out = torch.eye(g.shape[-1], dtype=torch.float64)
    eye_in = torch.eye(a.shape[-1] + int(bias), dtype=torch.float64)
    return kron_sketch(a, g, eye_out, eye_in, bias).reshape(x.shape[0], g.shape[-1], -1)


@pytest.mark.parametrize(
    ("net", "shape", "layers"),
    [
        (MLP, (6, 12), ["fc1", "fc2", "head"]),
        (SeqNet, (5, 4, 6), ["proj", "mix", "head"]),
        (ConvNet, (4, 3, 8, 8), ["c1", "c2", "head"]),
    ],
)
def test_linear_form_with_identity_projection_is_the_exact_gradient(net, shape, layers) -> None:
    torch.manual_seed(0)
    model = net().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    oracle = per_sample_grads(model, x, y)
    for layer in layers:
        mod = dict(model.named_modules())[layer]
        got = _eye_sketch(model, layer, x, y)
        want = flat_grad(oracle, layer, mod.bias is not None)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("net", "shape"), [(MLP, (6, 12)), (SeqNet, (5, 4, 6)), (ConvNet, (4, 3, 8, 8))])
def test_sketcher_equals_projected_oracle_gradient(net, shape, reduction) -> None:
    """Sketcher output == P_out^T X_i P_in computed from the torch.func per-sample gradient X_i."""
    torch.manual_seed(1)
    model = net().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randint(0, 3, (shape[0],))
    layers = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)]
    oracle = per_sample_grads(model, x, y)
    sk = Sketcher(model, layers, k=24, seed=5, loss_reduction=reduction)
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    got = sk.collect_tensors()
    sk.remove()
    for layer in layers:
        spec = sk.specs[layer]
        p_out, p_in = spec.projections()
        want = torch.einsum("ok,boi,il->bkl", p_out, flat_grad(oracle, layer, spec.bias), p_in)
        torch.testing.assert_close(got[f"sketch.{layer}"], want.reshape(shape[0], -1), rtol=1e-9, atol=1e-11)


def test_rank1_path_equals_exact_dot_products() -> None:
    torch.manual_seed(2)
    model = MLP().double()
    x, y = torch.randn(7, 12, dtype=torch.float64), torch.randint(0, 5, (7,))
    xq, yq = torch.randn(3, 12, dtype=torch.float64), torch.randint(0, 5, (3,))
    sk = Sketcher(model, ["head", "fc2"], k=16, seed=0, methods={"head": "rank1", "fc2": "rank1"})
    F.cross_entropy(model(x), y).backward()  # mean-reduced: the sketcher rescales by B
    train = sk.collect_tensors()
    sk.remove()
    query = sketch_batch(
        model, sk.specs.values(), xq, yq, lambda o, t: F.cross_entropy(o, t, reduction="none")
    )
    gt, gq = per_sample_grads(model, x, y), per_sample_grads(model, xq, yq)
    for layer in ("head", "fc2"):
        exact = flat_grad(gt, layer, True).flatten(1) @ flat_grad(gq, layer, True).flatten(1).T
        got = rank1_dot(
            train[f"g.{layer}"], train[f"a.{layer}"], query[f"g.{layer}"], query[f"a.{layer}"], True
        )
        assert (got - exact).abs().max().item() <= 1e-6 * max(1.0, exact.abs().max().item())
        assert (got - exact).abs().max().item() < 1e-10


def test_sketch_inner_products_are_unbiased() -> None:
    """Mean of <S_i, S_j> over 600 independent projection seeds is within 4 standard errors of <X_i, X_j>."""
    gen = torch.Generator().manual_seed(3)
    d_out, d_in, b = 6, 9, 4
    a = torch.randn(b, 3, d_in, generator=gen, dtype=torch.float64)
    g = torch.randn(b, 3, d_out, generator=gen, dtype=torch.float64)
    x_exact = torch.einsum("bto,bti->boi", g, a)
    x_exact = torch.cat([x_exact, g.sum(1).unsqueeze(-1)], -1).flatten(1)
    exact = x_exact @ x_exact.T
    samples = []
    for seed in range(600):
        p_out = projection_matrix(d_out, 3, seed, "L", "out")
        p_in = projection_matrix(d_in + 1, 4, seed, "L", "in")
        s = kron_sketch(a, g, p_out, p_in, bias=True)
        samples.append(s @ s.T)
    est = torch.stack(samples)
    se = est.std(0) / math.sqrt(len(samples))
    z = (est.mean(0) - exact).abs() / se
    assert z.max().item() < 4.0, z
    # and the estimator is not trivially exact (the test would not detect a scaling bug otherwise)
    assert (est.std(0) > 0.05 * exact.abs().max()).all()
    # a wrongly scaled projection (N(0, 1) instead of N(0, 1/k)) is detected by the same check
    wrong = torch.stack([sample * 12 for sample in samples[:50]])
    assert ((wrong.mean(0) - exact).abs() / se).max().item() > 4.0


def test_projection_is_reproducible_and_checked() -> None:
    torch.manual_seed(0)
    model = MLP()
    spec = make_spec("fc2", model.fc2, "kron", 16, seed=11)
    p1, q1 = spec.projections()
    p2, q2 = LayerSketchSpec.from_json(spec.to_json()).projections()
    assert torch.equal(p1, p2) and torch.equal(q1, q2)
    assert spec.k_out * spec.k_in <= 16 and spec.d_in == 10  # bias column
    assert derive_seed(11, "fc2", "out") != derive_seed(11, "fc2", "in") != derive_seed(12, "fc2", "in")
    tampered = LayerSketchSpec.from_json({**spec.to_json(), "seed": 12})
    with pytest.raises(SketchError, match="regenerated P_out sha256"):
        tampered.projections()
    with pytest.raises(SketchError, match="unknown field"):
        LayerSketchSpec.from_json({**spec.to_json(), "bogus": 1})


def test_split_k_keeps_small_factors_exact() -> None:
    assert split_k(128, 512, 513) == (32, 4)
    assert split_k(512, 512, 513) == (64, 8)
    assert split_k(512, 10, 65) == (10, 51)  # d_out fits its share: identity on the output side
    assert split_k(512, 32, 33) == (32, 16)
    assert split_k(64, 100, 2) == (32, 2)  # d_in fits: identity on the input side
    assert split_k(1, 5, 5) == (1, 1)
    with pytest.raises(SketchError):
        split_k(0, 3, 3)


def test_microbatches_concatenate_and_weight_reuse_sums() -> None:
    torch.manual_seed(4)

    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.head = nn.Linear(5, 5), nn.Linear(5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    model = Reuse().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 2, (6,))
    oracle = per_sample_grads(model, x, y)
    sk = Sketcher(model, ["shared", "head"], k=25, seed=1, loss_reduction="sum")
    for lo, hi in ((0, 2), (2, 6)):  # two micro-batches before one collect
        F.cross_entropy(model(x[lo:hi]), y[lo:hi], reduction="sum").backward()
    got = sk.collect_tensors()
    p_out, p_in = sk.specs["shared"].projections()
    want = torch.einsum("ok,boi,il->bkl", p_out, flat_grad(oracle, "shared", True), p_in).flatten(1)
    torch.testing.assert_close(got["sketch.shared"], want, rtol=1e-9, atol=1e-11)
    assert sk.collect_tensors() == {}  # collect drains
    sk.remove()
    rk = Sketcher(model, ["shared"], methods={"shared": "rank1"})
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(SketchError, match="called 2 times"):
        rk.collect_tensors()


def test_payloads_are_float32_and_eval_forwards_are_ignored() -> None:
    model = MLP()
    sk = Sketcher(model, ["fc2", "head"], k=32, methods={"head": "rank1"})
    with torch.no_grad():
        model(torch.randn(3, 12))
    F.cross_entropy(model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    out = sk.collect()
    assert set(out) == {"sketch.fc2", "g.head", "a.head"}
    assert out["sketch.fc2"].dtype == np.dtype("<f4") and out["sketch.fc2"].shape == (4, sk.specs["fc2"].k)
    assert out["g.head"].shape == (4, 5) and out["a.head"].shape == (4, 9)
    body = sk.body()
    assert body["layers"]["head"]["method"] == "rank1" and body["seed"] == 0
    sk.pause()
    F.cross_entropy(model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    assert sk.collect() == {}
    sk.remove()


def test_clear_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    with pytest.raises(SketchError, match=r"layer '1' \(LayerNorm\)"):
        Sketcher(model, ["1"])
    with pytest.raises(SketchError, match="not found"):
        Sketcher(model, ["nope"])
    with pytest.raises(SketchError, match="rank1"):
        Sketcher(nn.Sequential(nn.Conv1d(1, 1, 2)), ["0"], methods={"0": "rank1"})
    with pytest.raises(SketchError, match="groups=2"):
        Sketcher(nn.Sequential(nn.Conv1d(2, 2, 2, groups=2)), ["0"])
    sk = Sketcher(model, ["2"], methods={"2": "rank1"})
    with pytest.raises(SketchError, match="2-D input"):
        model(torch.randn(2, 3, 4))
    sk.remove()
    with pytest.raises(SketchError, match="query model has d_out=3"):
        Sketcher.from_specs(nn.Sequential(nn.Linear(4, 4), nn.Identity(), nn.Linear(4, 3)), [sk.specs["2"]])


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs CUDA (an equivalent standalone check passed on an H100: rel. error ~1e-7)",
)
def test_cuda_sketches_match_the_cpu_float64_sketches() -> None:
    torch.manual_seed(0)
    cpu = ConvNet().double()
    gpu = copy.deepcopy(cpu).float().cuda()
    x, y = torch.randn(8, 3, 8, 8, dtype=torch.float64), torch.randint(0, 3, (8,))
    out = {}
    for name, m, xx, yy in (("cpu", cpu, x, y), ("cuda", gpu, x.float().cuda(), y.cuda())):
        sk = Sketcher(m, ["c1", "c2", "head"], k=64, seed=3, methods={"head": "rank1"})
        F.cross_entropy(m(xx), yy).backward()
        got = sk.collect_tensors()
        sk.remove()
        assert {t.device.type for t in got.values()} == {xx.device.type}
        out[name] = {k: v.double().cpu() for k, v in got.items()}
    for key, want in out["cpu"].items():
        assert ((out["cuda"][key] - want).norm() / want.norm()).item() < 1e-4, key
