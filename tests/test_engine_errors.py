"""Engine refusals and misuse: clear errors, never a silently wrong or missing number."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instrument import EngineError, GradNormEngine, UnsupportedLayerError

torch.set_num_threads(1)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))


def step(model: nn.Module, x: Tensor) -> None:
    model(x).square().mean().backward()


def test_batchnorm_train_mode_refused_with_reason_and_remedy() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with pytest.raises(UnsupportedLayerError) as err:
        GradNormEngine(model)
    msg = str(err.value)
    assert "'1'" in msg and "BatchNorm2d" in msg
    assert "statistics of the whole batch" in msg and "GroupNorm" in msg and "eval mode" in msg


def test_batchnorm_without_affine_is_refused_too() -> None:
    """Even with no parameters of its own, train-mode BN couples the samples for every earlier layer."""
    with pytest.raises(UnsupportedLayerError, match="BatchNorm1d"):
        GradNormEngine(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3, affine=False)))


def test_batchnorm_back_in_train_mode_is_caught_at_forward() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    model[1].eval()
    eng = GradNormEngine(model)
    model.train()
    eng.begin(5)
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        model(torch.randn(5, 3))


def test_batchnorm_without_running_stats_refused() -> None:
    bn = nn.BatchNorm1d(3, track_running_stats=False).eval()
    with pytest.raises(UnsupportedLayerError, match="track_running_stats=False"):
        GradNormEngine(nn.Sequential(nn.Linear(3, 3), bn))


def test_lstm_refused_with_suggestion() -> None:
    with pytest.raises(UnsupportedLayerError, match="DPLSTM"):
        GradNormEngine(nn.LSTM(3, 4))


@pytest.mark.parametrize(
    ("kw", "match"), [({"sparse": True}, "sparse=True"), ({"scale_grad_by_freq": True}, "scale_grad_by_freq")]
)
def test_embedding_options_refused(kw: dict, match: str) -> None:
    with pytest.raises(UnsupportedLayerError, match=match):
        GradNormEngine(nn.Sequential(nn.Embedding(5, 3, **kw)))


def test_tied_parameters_refused() -> None:
    emb, head = nn.Embedding(7, 3), nn.Linear(3, 7, bias=False)
    head.weight = emb.weight
    with pytest.raises(UnsupportedLayerError, match="tied weights"):
        GradNormEngine(nn.ModuleDict({"emb": emb, "head": head}))


class DirectUse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 3)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.emb(idx)
        return F.linear(h, self.emb.weight)  # weight used outside a call of self.emb


def test_parameter_used_outside_its_layer_is_caught() -> None:
    model = DirectUse()
    eng = GradNormEngine(model)
    eng.begin(2)
    out = model(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(EngineError, match=r"layer 'emb' \(Embedding\).*outside a call"):
        out.sum().backward()


def test_forward_before_begin_is_caught() -> None:
    model = mlp()
    eng = GradNormEngine(model)
    loss = model(torch.randn(3, 4)).sum()
    eng.begin(3)
    with pytest.raises(EngineError, match="forward run before begin"):
        loss.backward()


def test_unbatched_positional_embedding_refused() -> None:
    class Pos(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(9, 3), nn.Embedding(4, 3)

        def forward(self, idx: Tensor) -> Tensor:
            return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))

    eng = GradNormEngine(Pos())
    eng.begin(2)
    with pytest.raises(EngineError, match=r"'pos'.*positions.expand"):
        Pos.forward(eng.model, torch.randint(0, 9, (2, 4)))  # type: ignore[arg-type]


def test_sample_mixing_custom_module_caught_by_fallback_check() -> None:
    class Centre(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x: Tensor) -> Tensor:
            return (x - x.mean(0)) * self.w  # mixes samples through the batch mean

    model = nn.Sequential(nn.Linear(3, 3), Centre())
    eng = GradNormEngine(model)
    eng.begin(4)
    with pytest.raises(EngineError, match=r"layer '1' \(Centre\).*do not add up.*mixes samples"):
        model(torch.randn(4, 3)).square().sum().backward()


def test_batch_size_mismatches() -> None:
    model = mlp()
    eng = GradNormEngine(model)
    eng.begin(3)
    with pytest.raises(EngineError, match=r"begin\(3\) but layer '0' received a batch of 4 rows"):
        model(torch.randn(4, 4))
    with pytest.raises(EngineError, match="covered 0 rows"):
        eng.end()  # closes the failed window
    eng.begin(5)
    step(model, torch.randn(4, 4))
    with pytest.raises(EngineError, match=r"begin\(5\) but the forward passes in this window covered 4 rows"):
        eng.end()
    eng.begin(4)  # end() closed the failed window; the engine is usable again
    step(model, torch.randn(4, 4))
    assert eng.end().norms.shape == (4, 2)


def test_second_backward_through_same_forward_refused() -> None:
    model = mlp()
    eng = GradNormEngine(model)
    eng.begin(3)
    loss = model(torch.randn(3, 4)).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(EngineError, match="second backward pass"):
        loss.backward()


def test_window_misuse() -> None:
    model = mlp()
    eng = GradNormEngine(model)
    with pytest.raises(EngineError, match="end\\(\\) without begin"):
        eng.end()
    eng.begin(2)
    with pytest.raises(EngineError, match="window is open"):
        eng.begin(2)
    with pytest.raises(EngineError, match="pause\\(\\) inside"):
        eng.pause()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "positive int"),
        ({"batch_size": 2, "weights": torch.ones(2, 3)}, r"shape \[2, 2\]"),
        ({"batch_size": 2, "weights": -torch.ones(2, 2)}, ">= 0"),
        ({"batch_size": 2, "weights": torch.full((2, 2), float("nan"))}, "finite"),
        ({"batch_size": 2, "max_grad_norm": 0.0}, "positive finite"),
    ],
)
def test_begin_validates_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GradNormEngine(mlp()).begin(**kwargs)


def test_bad_loss_reduction_and_empty_model() -> None:
    with pytest.raises(ValueError, match="'mean' or 'sum'"):
        GradNormEngine(mlp(), loss_reduction="avg")
    with pytest.raises(UnsupportedLayerError, match="no trainable parameters"):
        GradNormEngine(nn.Sequential(nn.ReLU()))


def test_pause_removes_every_hook_and_resume_restores() -> None:
    model = mlp()
    eng = GradNormEngine(model)
    assert all(m._forward_hooks for m in (model[0], model[2]))
    eng.pause()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not any(p._backward_hooks for p in model.parameters())
    step(model, torch.randn(3, 4))  # plain PyTorch
    with pytest.raises(EngineError, match="paused"):
        eng.begin(3)
    eng.resume()
    model.zero_grad()
    eng.begin(3)
    step(model, torch.randn(3, 4))
    assert bool((eng.end().norms > 0).all())
    eng.remove()
    assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(EngineError, match="remove"):
        eng.resume()


def test_data_parallel_names_strip_module_prefix() -> None:
    eng = GradNormEngine(nn.DataParallel(mlp()))
    assert eng.layer_names == ["0", "2"]


def test_frozen_parameters_are_not_layers() -> None:
    model = mlp()
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    eng = GradNormEngine(model)
    assert eng.layer_names == ["2"]
    eng.begin(3)
    step(model, torch.randn(3, 4))
    eng.end()
    assert model[2].bias.grad is None and model[0].weight.grad is None and model[2].weight.grad is not None
