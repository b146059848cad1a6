"""Digits test bed for the analytics: a small MLP trained with SGD that records step records.

Reusable by tests and benchmarks. Each optimiser step yields a :class:`DigitsStep` shaped like
``ledger.records.StepRecord`` (see docs/ARCHITECTURE.md, "Step records"): example ids, layer names,
per-sample per-layer gradient norms ``[B, L]`` (the norm of each sample's own loss gradient over all of a
layer's parameters), routing weights, per-sample losses and margins, and the per-layer learning rate.

The per-sample norms come from a swappable ``norm_fn``: :func:`vmap_grad_norms` is the exact oracle
``torch.func.vmap(grad(functional_call))`` (an MLP 64-128-128-10 is small enough to materialise every
per-sample gradient); the default :func:`linear_grad_norms` is the same quantity in closed form for Linear
layers (one backward, several times faster), tested against the oracle; ``instrument.per_sample_grad_norms``
can be passed in once it exists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import cross_val_predict, train_test_split
from torch import nn
from torch.func import functional_call, grad, vmap

NUM_CLASSES = 10

NormFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class DigitsStep:
    """One optimiser step, with the fields of ``ledger.records.StepRecord`` that analytics read."""

    seq: int
    run: str
    step: int
    epoch: int
    example_ids: list[str]
    layers: list[str]
    grad_norms: np.ndarray  # [B, L] float32
    weights: np.ndarray  # [B, L] float32
    losses: np.ndarray  # [B] float32
    margins: np.ndarray  # [B] float32
    lr: np.ndarray  # [L] float32
    update_norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    clip_factors: np.ndarray | None = None
    policy_seq: int | None = None


@dataclass
class DigitsData:
    """Train/test split of scikit-learn's bundled digits (pixels / 16, optionally standardised on train)."""

    x_train: np.ndarray
    y_train: np.ndarray  # clean labels
    x_test: np.ndarray
    y_test: np.ndarray
    ids: list[str]  # one id per training example


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread (reproducible figures, fair on a shared machine), then restore."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def load_data(
    seed: int = 0, test_size: float = 0.25, standardize: bool = True, eps: float = 0.1
) -> DigitsData:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    if standardize:
        mu, sd = x_tr.mean(0), x_tr.std(0) + eps
        x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    ids = [f"digit-{i:04d}" for i in range(len(y_tr))]
    return DigitsData(x_tr, y_tr, x_te, y_te, ids)


def flip_uniform(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``fraction`` of labels, each to a uniformly chosen *other* class. Returns (labels, mask)."""
    rng = np.random.default_rng(seed)
    n_flip = int(round(fraction * len(y)))
    idx = rng.choice(len(y), size=n_flip, replace=False)
    y_new = y.copy()
    offsets = rng.integers(1, NUM_CLASSES, size=n_flip)
    y_new[idx] = (y[idx] + offsets) % NUM_CLASSES
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    return y_new, mask


def confusable_pairing(x: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """For each class, the class a clean model confuses it with most (symmetrised confusion counts).

    The clean model is a 5-fold cross-fitted logistic regression on the clean training labels, so every
    prediction is out-of-fold. Ties (including all-zero rows) go to the lowest class index.
    """
    clf = LogisticRegression(max_iter=2000)
    pred = cross_val_predict(clf, x, y, cv=5)
    cm = confusion_matrix(y, pred, labels=list(range(NUM_CLASSES))).astype(float)
    sym = cm + cm.T
    np.fill_diagonal(sym, -1.0)
    return sym.argmax(axis=1)


def flip_confusable(
    y: np.ndarray, fraction: float, seed: int, pairing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``fraction`` of labels, each to its class's most confusable class (``pairing[c]``)."""
    rng = np.random.default_rng(seed)
    n_flip = int(round(fraction * len(y)))
    idx = rng.choice(len(y), size=n_flip, replace=False)
    y_new = y.copy()
    y_new[idx] = pairing[y[idx]]
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    return y_new, mask


def make_mlp(seed: int) -> nn.Sequential:
    """MLP 64-128-128-10 with ReLU; layers named ``0``, ``2``, ``4`` (``named_modules`` names)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, NUM_CLASSES)
    )


def param_layers(model: nn.Module) -> list[str]:
    """Layers per the gradledger convention: modules that directly own trainable parameters."""
    return [
        name
        for name, mod in model.named_modules()
        if any(p.requires_grad for p in mod.parameters(recurse=False))
    ]


def vmap_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Exact per-sample, per-layer gradient norms ``[B, L]`` of each sample's own cross-entropy loss."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    layers = param_layers(model)
    cols = []
    for layer in layers:
        prefix = f"{layer}." if layer else ""
        sq = sum(
            g.flatten(1).pow(2).sum(1)
            for name, g in grads.items()
            if name.startswith(prefix) and "." not in name[len(prefix) :]
        )
        cols.append(torch.as_tensor(sq).sqrt())
    return torch.stack(cols, dim=1)


def linear_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same norms as :func:`vmap_grad_norms` in closed form, for models whose layers are all Linear.

    For a Linear layer with 2-D input a_i and output gradient g_i, sample i's weight gradient is the outer
    product g_i a_iᵀ and its bias gradient g_i, so the layer norm² is ||g_i||² (||a_i||² + 1). Exact, and one
    backward instead of B materialised gradients; checked against the vmap oracle in the tests.
    """
    layers = param_layers(model)
    mods = dict(model.named_modules())
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name in layers:
        mod = mods[name]
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"linear_grad_norms: layer {name!r} is {type(mod).__name__}, not nn.Linear")

        def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor, name: str = name) -> None:
            inputs[name] = inp[0].detach()
            outputs[name] = out

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.enable_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y, reduction="sum")
            gouts = torch.autograd.grad(loss, [outputs[n] for n in layers])
    finally:
        for h in handles:
            h.remove()
    cols = []
    for name, g in zip(layers, gouts, strict=True):
        a = inputs[name]
        has_bias = mods[name].bias is not None
        cols.append((g.pow(2).sum(1) * (a.pow(2).sum(1) + float(has_bias))).sqrt())
    return torch.stack(cols, dim=1)


def instrument_grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same norms from ``instrument.per_sample_grad_norms`` (the production engine), as ``[B, L]``."""
    from instrument.functional import per_sample_grad_norms

    norms = per_sample_grad_norms(model, nn.functional.cross_entropy, x, y, loss_reduction="mean")
    return torch.stack([norms[name] for name in param_layers(model)], dim=1)


def margins_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Assigned logit minus the largest other logit (AUM's margin, Pleiss et al. 2020)."""
    assigned = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return assigned - other.max(dim=1).values


def train(
    x: np.ndarray,
    y: np.ndarray,
    ids: list[str],
    *,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 128,
    lr: float = 0.5,
    momentum: float = 0.0,
    decay_at: float | None = None,
    decay: float = 0.1,
    norm_fn: NormFn = linear_grad_norms,
    run: str = "digits",
    model: nn.Module | None = None,
) -> tuple[nn.Module, list[DigitsStep]]:
    """SGD on a mean-reduced cross-entropy; one :class:`DigitsStep` per step (norms before the update).

    ``decay_at`` (a fraction of ``epochs``) multiplies the learning rate by ``decay`` from that epoch on;
    the recorded ``lr`` is the rate the step used.
    """
    model = model if model is not None else make_mlp(seed)
    layers = param_layers(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed + 1)
    records: list[DigitsStep] = []
    step = 0
    for epoch in range(epochs):
        rate = lr * (decay if decay_at is not None and epoch >= int(decay_at * epochs) else 1.0)
        for group in opt.param_groups:
            group["lr"] = rate
        perm = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), batch_size):
            idx = perm[start : start + batch_size]
            xb, yb = xt[idx], yt[idx]
            norms = norm_fn(model, xb, yb)
            opt.zero_grad()
            logits = model(xb)
            losses = nn.functional.cross_entropy(logits, yb, reduction="none")
            losses.mean().backward()
            opt.step()
            b = len(idx)
            records.append(
                DigitsStep(
                    seq=step,
                    run=run,
                    step=step,
                    epoch=epoch,
                    example_ids=[ids[i] for i in idx.tolist()],
                    layers=layers,
                    grad_norms=norms.detach().numpy().astype(np.float32),
                    weights=np.ones((b, len(layers)), np.float32),
                    losses=losses.detach().numpy().astype(np.float32),
                    margins=margins_of(logits.detach(), yb).numpy().astype(np.float32),
                    lr=np.full(len(layers), rate, np.float32),
                )
            )
            step += 1
    return model, records


def iter_epochs(records: list[DigitsStep]) -> Iterator[int]:
    return iter(sorted({r.epoch for r in records}))


@dataclass
class PlantedDomains:
    """Digits split at random into three equal domains: ``clean``; ``noised`` (Gaussian pixel noise on train
    and test inputs); ``flipped`` (a fraction of its training labels flipped uniformly). Standardised on
    train like :func:`load_data`."""

    data: DigitsData
    y_assigned: np.ndarray  # training labels after the flips
    flipped: np.ndarray  # [N_train] bool
    train_domains: list[str]
    test_domains: list[str]


def planted_domains(
    seed: int = 0, noise_sigma: float = 0.5, flip_fraction: float = 0.3, eps: float = 0.3
) -> PlantedDomains:
    raw = load_data(seed, standardize=False)
    rng = np.random.default_rng(seed + 17)
    names = np.array(["clean", "noised", "flipped"])
    dom_tr = names[rng.permutation(len(raw.y_train)) % 3]
    dom_te = names[rng.permutation(len(raw.y_test)) % 3]
    x_tr, x_te = raw.x_train.copy(), raw.x_test.copy()
    x_tr[dom_tr == "noised"] += rng.normal(0.0, noise_sigma, x_tr[dom_tr == "noised"].shape).astype(
        np.float32
    )
    x_te[dom_te == "noised"] += rng.normal(0.0, noise_sigma, x_te[dom_te == "noised"].shape).astype(
        np.float32
    )
    mu, sd = x_tr.mean(0), x_tr.std(0) + eps
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    y = raw.y_train.copy()
    in_dom = np.flatnonzero(dom_tr == "flipped")
    y_dom, mask_dom = flip_uniform(y[in_dom], flip_fraction, seed)
    y[in_dom] = y_dom
    flipped = np.zeros(len(y), bool)
    flipped[in_dom[mask_dom]] = True
    data = DigitsData(x_tr.astype(np.float32), raw.y_train, x_te.astype(np.float32), raw.y_test, raw.ids)
    return PlantedDomains(data, y, flipped, [str(d) for d in dom_tr], [str(d) for d in dom_te])


def train_tracked(
    x: np.ndarray,
    y: np.ndarray,
    ids: list[str],
    *,
    ledger: object,
    run: str,
    seed: int = 0,
    epochs: int = 40,
    batch_size: int = 128,
    lr: float = 0.5,
    momentum: float = 0.0,
) -> nn.Module:
    """The loop of :func:`train` (same init, batches and optimiser) through ``instrument.attach``, so the
    step records land in ``ledger`` and come back through ``ledger.steps(run)``."""
    from instrument import attach

    model = make_mlp(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    crit = nn.CrossEntropyLoss()
    tracker = attach(model, opt, ledger=ledger, run=run, criterion=crit, seed=seed)
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed + 1)
    for epoch in range(epochs):
        tracker.epoch(epoch)
        perm = torch.randperm(len(yt), generator=gen)
        for start in range(0, len(yt), batch_size):
            idx = perm[start : start + batch_size]
            with tracker.batch([ids[i] for i in idx.tolist()]):
                loss = crit(model(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
    tracker.close()
    return model
