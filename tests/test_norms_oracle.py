"""Per-sample per-layer gradient norms vs the torch.func oracle (float64 rel. err < 1e-6, float32 < 1e-4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import instrument
from instrument.kernels import linear as linear_kernel_mod
from instrument.kernels.linear import use_gram
from tests.support_engine import check_model, oracle_grads, oracle_norms, per_sample_loss, reduce

torch.set_num_threads(1)
RED = ["mean", "sum"]
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


@pytest.fixture(autouse=True)
def _f64() -> None:
    torch.manual_seed(1234)


def f64(m: nn.Module) -> nn.Module:
    return m.double()


@pytest.mark.parametrize("reduction", RED)
def test_mlp_2d(reduction: str) -> None:
    model = f64(
        nn.Sequential(
            nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 8, bias=False), nn.Tanh(), nn.Linear(8, 3)
        )
    )
    eng = check_model(model, torch.randn(7, 6, dtype=torch.float64), reduction)
    assert eng.layer_names == ["0", "2", "4"]


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize(("t", "d_in", "d_out"), [(3, 8, 8), (9, 4, 5), (1, 5, 5)])
def test_linear_sequence_with_bias(reduction: str, t: int, d_in: int, d_out: int) -> None:
    """Both the Gram path and the materialising path (chosen by the cost model) with sequence inputs."""
    model = f64(nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, 2)))
    check_model(model, torch.randn(5, t, d_in, dtype=torch.float64), reduction)


def test_cost_model_picks_both_paths() -> None:
    assert use_gram(3, 8, 8) and not use_gram(9, 4, 5) and use_gram(1, 512, 512)


def test_linear_extra_dims_and_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(linear_kernel_mod, "MATERIALISE_BUDGET", 40)  # several chunks of samples
    model = f64(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    check_model(model, torch.randn(6, 2, 5, 3, dtype=torch.float64), "mean")


CONV2D = [
    dict(stride=1, padding=0),
    dict(stride=2, padding=1),
    dict(stride=1, padding=2, dilation=2),
    dict(stride=1, padding=1, groups=2),
    dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False),
    dict(padding="same"),
    dict(padding=1, padding_mode="reflect"),
]


@pytest.mark.parametrize("kw", CONV2D, ids=[str(k) for k in CONV2D])
@pytest.mark.parametrize("reduction", RED)
def test_conv2d_variants(kw: dict, reduction: str) -> None:
    model = f64(nn.Sequential(nn.Conv2d(4, 6, 3, **kw), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)))
    x = torch.randn(4, 4, 7, 6, dtype=torch.float64)
    model(x)  # materialise the lazy layer
    check_model(model, x, reduction)


@pytest.mark.parametrize(
    "kw", [dict(stride=2, padding=1), dict(dilation=2, groups=3), dict(padding="same", bias=False)]
)
def test_conv1d_variants(kw: dict) -> None:
    model = f64(nn.Sequential(nn.Conv1d(3, 6, 3, **kw), nn.Tanh(), nn.Conv1d(6, 2, 1)))
    check_model(model, torch.randn(5, 3, 11, dtype=torch.float64), "mean")


def test_conv_gram_path_small_maps() -> None:
    """A late conv with a 2x2 map and many channels takes the Gram path (cost model)."""
    assert use_gram(4, 32 * 9, 32)
    model = f64(nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 4, 2)))
    check_model(model, torch.randn(3, 32, 2, 2, dtype=torch.float64), "sum")


class TokenModel(nn.Module):
    def __init__(self, vocab: int = 11, dim: int = 4, padding_idx: int | None = 0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.out = nn.Linear(dim, 3)

    def forward(self, idx: Tensor) -> Tensor:
        return self.out(self.emb(idx))


@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_repeated_tokens_and_padding(reduction: str, padding_idx: int | None) -> None:
    model = f64(TokenModel(padding_idx=padding_idx))
    idx = torch.tensor([[1, 2, 1, 0, 0], [3, 3, 3, 3, 3], [0, 0, 0, 0, 0], [4, 5, 6, 7, 1]])
    check_model(model, idx, reduction)


@pytest.mark.parametrize("reduction", RED)
def test_norm_layers(reduction: str) -> None:
    model = f64(
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(2),  # [B, 4, 25]
            nn.LayerNorm(25), nn.Linear(25, 6), nn.RMSNorm(6), nn.RMSNorm([4, 6], eps=1e-5), nn.LayerNorm([4, 6]),
        )
    )  # fmt: skip
    eng = check_model(model, torch.randn(5, 2, 5, 5, dtype=torch.float64), reduction)
    assert eng.layer_names == ["0", "1", "4", "5", "6", "7", "8"]


class Reuse(nn.Module):
    """Every layer type called more than once in one forward (weight reuse)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(9, 4)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx) + self.emb(idx.flip(1))  # [B, T, 4]
        h = self.lin(torch.tanh(self.lin(h)))  # same Linear twice in a chain
        h = self.ln(h) * self.ln(h.square())
        c = self.conv(h.transpose(1, 2))
        c = self.conv(torch.relu(c)).transpose(1, 2)
        return self.head(c.mean(1)) + self.head(h[:, 0])  # 2-D reuse


@pytest.mark.parametrize("reduction", RED)
def test_weight_reuse(reduction: str) -> None:
    model = f64(Reuse())
    check_model(model, torch.randint(0, 9, (5, 6)), reduction)


class Block(nn.Module):
    """A pre-LN transformer block with attention built from Linear layers."""

    def __init__(self, vocab: int = 13, d: int = 8, heads: int = 2, t: int = 5) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, 4 * d)
        self.ff2 = nn.Linear(4 * d, d)
        self.lnf = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.heads = heads

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device).expand(b, t))
        q, k, v = self.qkv(self.ln1(h)).split(h.shape[-1], dim=-1)
        split = lambda z: z.reshape(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return self.head(self.lnf(h))


@pytest.mark.parametrize("reduction", RED)
def test_transformer_block_f64(reduction: str) -> None:
    eng = check_model(f64(Block()), torch.randint(0, 13, (4, 5)), reduction)
    assert eng.layer_names[:3] == ["tok", "pos", "ln1"]


def test_transformer_block_f32() -> None:
    check_model(Block(), torch.randint(0, 13, (4, 5)), "mean", tol=1e-4)


def test_cnn_f32() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5)
    )
    check_model(model, torch.randn(6, 3, 7, 7), "sum", tol=1e-4)


class Scaled(nn.Module):
    """A custom layer with its own nn.Parameter and a child Linear it calls: one fallback layer."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.inner = nn.Linear(5, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x * self.scale) + self.scale


class WithFallbacks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 5)
        self.act = nn.PReLU()
        self.custom = Scaled()
        self.attn = nn.MultiheadAttention(5, 1, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.custom(self.act(self.lin(x)))
        a, _ = self.attn(h, h, h)
        return self.head(a + h)


@pytest.mark.parametrize("reduction", RED)
def test_fallback_layers(reduction: str) -> None:
    eng = check_model(f64(WithFallbacks()), torch.randn(4, 3, 5, dtype=torch.float64), reduction)
    # fallback layers cover their whole subtree: no separate "custom.inner" / "attn.out_proj"
    assert eng.layer_names == ["lin", "act", "custom", "attn", "head"]


def test_batchnorm_eval_mode_goes_to_fallback() -> None:
    model = f64(nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2)))
    model[1].running_mean.uniform_()
    model[1].eval()
    check_model(model, torch.randn(4, 2, 4, 4, dtype=torch.float64), "mean")


@pytest.mark.parametrize("reduction", RED)
def test_functional_entry_point(reduction: str) -> None:
    model = f64(Block())
    idx = torch.randint(0, 13, (3, 5))
    target = torch.randn(3, 5, 13, dtype=torch.float64)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    norms = instrument.per_sample_grad_norms(
        model,
        lambda out, tgt: reduce(per_sample_loss(out, tgt), reduction),
        idx,
        target,
        loss_reduction=reduction,
    )
    assert all(bool((p.grad == 7.0).all()) for p in model.parameters())  # .grad left untouched
    names = list(norms)
    ref = oracle_norms(oracle_grads(model, idx, target), names)
    for i, n in enumerate(names):
        assert norms[n].shape == (3,)
        torch.testing.assert_close(norms[n], ref[:, i], rtol=1e-6, atol=1e-9)


def test_conv_chunking(monkeypatch: pytest.MonkeyPatch) -> None:
    from instrument.kernels import conv as conv_kernel_mod

    monkeypatch.setattr(conv_kernel_mod, "MATERIALISE_BUDGET", 100)  # one sample per chunk
    model = f64(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 2)))
    check_model(model, torch.randn(4, 2, 5, 5, dtype=torch.float64), "mean")
