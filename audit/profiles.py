"""Entropy depth profiles: how uncertain a linear read-out of each layer is, per domain, and how deep an
example has to go before the read-outs settle on the model's final answer.

Inputs are plain arrays, so the functions work on any model: ``activations`` maps a layer name to an
``[N, d]`` array (see :func:`collect_activations` for a torch model), ``labels`` is ``[N]`` integer class ids
with ``-1`` for unlabelled examples, and ``domains`` is one tag per example (class, source, slice, ...).

For every layer a multinomial logistic-regression probe (scikit-learn, on standardised features) is
*cross-fitted*: the labelled examples are split into ``folds`` stratified folds and each fold is predicted
by a probe trained on the others, so no labelled example is scored by a probe that saw it; unlabelled
examples get the mean probability of the fold probes. For each example and layer the normalised predictive
entropy is ``H(p) / log C`` (0 = certain, 1 = uniform over the C classes). Per (domain, layer) the profile
reports its mean over the evaluated examples, a percentile bootstrap confidence interval and n.

Prediction depth (after Baldock et al. 2021, with these probes): with the layers in the given order
(shallow to deep) and the final prediction (the model's, if given, else the last probe's), an example's depth
is the first layer index from which *every* later probe predicts the final class; it is ``len(layers)``
when even the last probe disagrees. Averaged per domain with the same bootstrap.

Entry points: :func:`entropy_profile` (returns :class:`ProfileResult`, whose ``entry_body()`` is the body
of a ``profile`` ledger entry) and :func:`collect_activations`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

EVALUATE = ("all", "labelled", "unlabelled")


@dataclass(frozen=True)
class ProbeSettings:
    """Everything that determines a profile besides its inputs (recorded in the ``profile`` entry)."""

    folds: int = 5
    C: float = 1.0  # inverse L2 regularisation strength of the probe
    max_iter: int = 500
    n_boot: int = 1000
    ci: float = 0.95
    seed: int = 0
    evaluate: str = "all"  # which examples the profile averages over: all / labelled / unlabelled
    unit_norm: bool = True  # scale each example's activation vector to unit L2 norm before the probe

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": "sklearn.linear_model.LogisticRegression on StandardScaler features",
            "folds": self.folds,
            "C": self.C,
            "max_iter": self.max_iter,
            "n_boot": self.n_boot,
            "ci": self.ci,
            "seed": self.seed,
            "evaluate": self.evaluate,
            "unit_norm": self.unit_norm,
        }


@dataclass(frozen=True)
class Estimate:
    """A mean with a bootstrap confidence interval over ``n`` examples."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; an empty domain (n = 0) has null mean and interval rather than NaN."""
        if self.n == 0:
            return {"mean": None, "ci": [None, None], "n": 0}
        return {"mean": self.mean, "ci": [self.low, self.high], "n": self.n}


@dataclass(frozen=True)
class ProfileResult:
    """Per-domain x per-layer entropy, per-domain depth, and the per-example values they summarise."""

    layers: list[str]
    domains: list[str]  # sorted
    classes: list[int]
    entropy: dict[str, dict[str, Estimate]]  # domain -> layer -> estimate
    depth: dict[str, Estimate]  # domain -> prediction depth estimate
    example_entropy: np.ndarray  # [N, L] normalised entropy, every example (NaN never)
    example_depth: np.ndarray  # [N] int
    probe_predictions: np.ndarray  # [N, L] class ids
    evaluated: np.ndarray  # [N] bool: the examples the estimates average over
    inputs_digest: str
    settings: ProbeSettings
    probe_accuracy: dict[str, float] = field(default_factory=dict)  # layer -> out-of-fold accuracy

    def entry_body(self, run: str | None = None, data: str | None = None) -> dict[str, Any]:
        """JSON-ready body for a ``profile`` ledger entry: settings, inputs digest, results; ``run`` and
        ``data`` (e.g. the evaluated file's name or digest) are recorded when given."""
        extra: dict[str, Any] = {}
        if run is not None:
            extra["run"] = run
        if data is not None:
            extra["data"] = data
        return {
            **extra,
            "settings": self.settings.to_dict(),
            "inputs_digest": self.inputs_digest,
            "layers": self.layers,
            "classes": self.classes,
            "entropy": {d: {lay: e.to_dict() for lay, e in per.items()} for d, per in self.entropy.items()},
            "depth": {d: e.to_dict() for d, e in self.depth.items()},
            "probe_accuracy": self.probe_accuracy,
        }


def inputs_digest(activations: Mapping[str, np.ndarray], labels: np.ndarray, domains: Sequence[str]) -> str:
    """sha256 over the layer names, activation bytes (float32 little-endian), labels and domain tags."""
    h = hashlib.sha256()
    for name in activations:
        arr = np.ascontiguousarray(activations[name], dtype="<f4")
        h.update(f"layer:{name}:{arr.shape}\n".encode())
        h.update(arr.tobytes())
    h.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    h.update("\x1f".join(domains).encode())
    return h.hexdigest()


def bootstrap_mean(values: np.ndarray, n_boot: int, ci: float, rng: np.random.Generator) -> Estimate:
    """Mean with a percentile bootstrap interval (resampling examples with replacement)."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    means = v[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    alpha = (1.0 - ci) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    return Estimate(float(v.mean()), float(low), float(high), n)


def _cross_fit(x: np.ndarray, labels: np.ndarray, classes: np.ndarray, settings: ProbeSettings) -> np.ndarray:
    """Out-of-fold class probabilities [N, C] for labelled rows; fold-mean for unlabelled rows."""
    n, n_cls = len(labels), len(classes)
    lab = np.flatnonzero(labels >= 0)
    unl = np.flatnonzero(labels < 0)
    proba = np.zeros((n, n_cls))
    col = {c: k for k, c in enumerate(classes)}
    skf = StratifiedKFold(n_splits=settings.folds, shuffle=True, random_state=settings.seed)
    for train_idx, test_idx in skf.split(x[lab], labels[lab]):
        probe = make_pipeline(
            StandardScaler(),
            LogisticRegression(C=settings.C, max_iter=settings.max_iter),
        )
        probe.fit(x[lab[train_idx]], labels[lab[train_idx]])
        cols = [col[c] for c in probe.classes_]
        rows = np.concatenate([lab[test_idx], unl])
        p = probe.predict_proba(x[rows])
        out = np.zeros((len(rows), n_cls))
        out[:, cols] = p
        proba[lab[test_idx]] = out[: len(test_idx)]
        proba[unl] += out[len(test_idx) :] / settings.folds
    return proba


def normalised_entropy(proba: np.ndarray) -> np.ndarray:
    """H(p) / log C per row, with 0 log 0 = 0."""
    n_cls = proba.shape[1]
    p = np.clip(proba, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return h / math.log(n_cls)


def prediction_depth(predictions: np.ndarray, final: np.ndarray) -> np.ndarray:
    """First layer index from which every probe prediction equals ``final``; L when the last one differs.

    ``predictions`` is [N, L] (shallow to deep), ``final`` is [N].
    """
    agree = predictions == final[:, None]
    n_layers = predictions.shape[1]
    # suffix-all: agree_from[i, l] is True when layers l..L-1 all agree.
    agree_from = np.flip(np.cumprod(np.flip(agree, axis=1), axis=1), axis=1).astype(bool)
    return np.where(agree_from.any(axis=1), n_layers - agree_from.sum(axis=1), n_layers)


def entropy_profile(
    activations: Mapping[str, np.ndarray],
    labels: Sequence[int] | np.ndarray,
    domains: Sequence[str],
    *,
    layers: Sequence[str] | None = None,
    final_predictions: Sequence[int] | np.ndarray | None = None,
    settings: ProbeSettings | None = None,
) -> ProfileResult:
    """Cross-fitted probe entropy per (domain, layer) and prediction depth per domain (module docstring).

    ``layers`` orders the layers shallow to deep (default: the mapping's order). Raises ``ValueError`` for
    mismatched lengths, too few labelled examples per class for the folds, or an unknown ``evaluate``.
    """
    settings = settings or ProbeSettings()
    if settings.evaluate not in EVALUATE:
        raise ValueError(f"settings.evaluate must be one of {EVALUATE}, got {settings.evaluate!r}")
    layer_names = list(layers) if layers is not None else list(activations)
    if not layer_names:
        raise ValueError("no layers to profile")
    y = np.asarray(labels, dtype=np.int64)
    dom = [str(d) for d in domains]
    n = len(y)
    if len(dom) != n:
        raise ValueError(f"domains has {len(dom)} entries, labels {n}")
    xs = {}
    for name in layer_names:
        if name not in activations:
            raise ValueError(f"layer {name!r} has no activations (have {sorted(activations)})")
        x = np.asarray(activations[name], dtype=np.float64).reshape(len(activations[name]), -1)
        if x.shape[0] != n:
            raise ValueError(f"layer {name!r}: {x.shape[0]} rows of activations, {n} labels")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"layer {name!r}: activations contain NaN or Inf")
        if settings.unit_norm:
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            x = x / np.where(norms > 0, norms, 1.0)
        xs[name] = x
    classes, counts = np.unique(y[y >= 0], return_counts=True)
    if len(classes) < 2:
        raise ValueError("need labelled examples of at least two classes to fit probes")
    if counts.min() < settings.folds:
        raise ValueError(
            f"class {int(classes[counts.argmin()])} has {int(counts.min())} labelled example(s), "
            f"fewer than folds={settings.folds}"
        )
    ent = np.zeros((n, len(layer_names)))
    preds = np.zeros((n, len(layer_names)), dtype=np.int64)
    acc: dict[str, float] = {}
    lab = y >= 0
    for j, name in enumerate(layer_names):
        proba = _cross_fit(xs[name], y, classes, settings)
        ent[:, j] = normalised_entropy(proba)
        preds[:, j] = classes[proba.argmax(axis=1)]
        acc[name] = float((preds[lab, j] == y[lab]).mean())
    if final_predictions is None:
        final = preds[:, -1]
    else:
        final = np.asarray(final_predictions, dtype=np.int64)
        if final.shape != (n,):
            raise ValueError(f"final_predictions has shape {final.shape}, expected {(n,)}")
    depth = prediction_depth(preds, final)
    evaluated = {"all": np.ones(n, bool), "labelled": lab, "unlabelled": ~lab}[settings.evaluate]
    rng = np.random.default_rng(settings.seed)
    entropy: dict[str, dict[str, Estimate]] = {}
    depth_est: dict[str, Estimate] = {}
    dom_arr = np.array(dom)
    for d in sorted(set(dom)):
        rows = evaluated & (dom_arr == d)
        entropy[d] = {
            name: bootstrap_mean(ent[rows, j], settings.n_boot, settings.ci, rng)
            for j, name in enumerate(layer_names)
        }
        depth_est[d] = bootstrap_mean(depth[rows].astype(float), settings.n_boot, settings.ci, rng)
    return ProfileResult(
        layers=layer_names,
        domains=sorted(set(dom)),
        classes=[int(c) for c in classes],
        entropy=entropy,
        depth=depth_est,
        example_entropy=ent,
        example_depth=depth,
        probe_predictions=preds,
        evaluated=evaluated,
        inputs_digest=inputs_digest({k: xs[k] for k in layer_names}, y, dom),
        settings=settings,
        probe_accuracy=acc,
    )


def collect_activations(
    model: torch.nn.Module,
    inputs: torch.Tensor | Iterable[torch.Tensor],
    layers: Sequence[str],
    *,
    batch_size: int = 512,
) -> dict[str, np.ndarray]:
    """Outputs of the named modules (``named_modules`` names; ``""`` = the model's output), flattened to
    ``[N, d]`` float32, via forward hooks under ``torch.no_grad`` in eval mode (the mode is restored).

    ``inputs`` is one tensor (split into ``batch_size`` chunks) or an iterable of input batches.
    """
    mods = dict(model.named_modules())
    missing = [name for name in layers if name not in mods]
    if missing:
        raise ValueError(f"no module(s) named {missing} in the model")
    store: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    handles = []
    for name in layers:

        def hook(m: torch.nn.Module, inp: Any, out: Any, name: str = name) -> None:
            t = out[0] if isinstance(out, tuple) else out
            store[name].append(t.detach().reshape(t.shape[0], -1).float().cpu().numpy())

        handles.append(mods[name].register_forward_hook(hook))
    batches = inputs.split(batch_size) if isinstance(inputs, torch.Tensor) else inputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for xb in batches:
                model(xb)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {
        name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        for name, parts in store.items()
    }
