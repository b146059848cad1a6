"""Memorisation / label-disagreement ranking from step records, with loss and AUM baselines beside it.

Score (whole-run per-layer self-influence, within-layer normalised). For example i and layer l::

    E[i, l]  = sum over the steps t that contain i of  lr[t, l] * w[t, i, l] * c[t, i] * ||g[t, i, l]||^2
    S[i, l]  = E[i, l] / mean_j E[j, l]              (within-layer normalisation: each layer has mean 1)
    score[i] = mean over layers l of S[i, l]

``||g||`` is the recorded per-sample, per-layer gradient norm of the sample's own loss (step records'
``grad_norms``), ``lr`` the layer's learning rate (NaN = not trained by the optimizer: no influence; layers
with no energy at all are left out of the mean), ``w`` the routing weight (an example barred from a layer
exerts no influence on it) and ``c`` the DP clip factor when recorded (else 1). This is the diagonal of
TracIn (Pruthi et al. 2020) summed over every step of the run rather than a few checkpoints, computed per
layer. Normalising within each layer before averaging stops the layer with the largest raw norms from
deciding the ranking alone. The per-epoch trajectory uses the same normaliser, so an example's trajectory
sums to its score.

Classes (per example; thresholds are arguments). The early window is the first third of the epochs, the
late window the last third (at least one epoch each):
- ``unresolved``: late-window mean loss >= ``loss_threshold`` (default ln 2: for cross-entropy, the assigned
  label's geometric-mean probability over the late window is still at most one half). The model never fit
  the label, so its logit gradient (norm >= 1 - p) stays large from start to end;
- ``memorised``: late loss below the threshold, and early-window energy >= ``high_ratio`` x the mean example's
  early energy (high early energy, then low late loss: the label was fit only by force);
- ``easy``: the rest.

Baselines, always computed beside the score: mean training loss over every recorded step, and the area
under the margin (AUM, Pleiss et al. 2020): the mean over epochs of the example's mean margin in that epoch
(assigned logit minus the largest other logit). Low AUM = suspicious. ``MemorizationResult.evaluate`` gives
AUROC / precision@k of all three against known positives, so a caller compares them on equal terms; this
module never claims the score beats a baseline.

Entry points: :func:`rank_memorization` (any iterable of step records, e.g. ``Ledger.steps(run)``) and
:func:`final_epoch_ranking` (the same score from the last epoch only, the "final checkpoint" comparison).
Memory: O(examples x epochs x layers) float64 for the trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from audit.metrics import auroc, descending_ranks, precision_at_k

CLASSES = ("memorised", "unresolved", "easy")
BASELINES = ("self_influence", "mean_loss", "aum")


class StepRecordLike(Protocol):
    """The fields of ``ledger.records.StepRecord`` read here (docs/ARCHITECTURE.md, "Step records")."""

    @property
    def epoch(self) -> int: ...
    @property
    def example_ids(self) -> Sequence[str]: ...
    @property
    def layers(self) -> Sequence[str]: ...
    @property
    def grad_norms(self) -> np.ndarray: ...
    @property
    def weights(self) -> np.ndarray | None: ...
    @property
    def losses(self) -> np.ndarray | None: ...
    @property
    def margins(self) -> np.ndarray | None: ...
    @property
    def lr(self) -> np.ndarray: ...


@dataclass(frozen=True)
class ExampleScore:
    """One example's row: the score, its parts, its class and the baselines with their ranks."""

    example_id: str
    score: float
    layer_scores: dict[str, float]
    trajectory: tuple[float, ...]  # per epoch (``MemorizationResult.epochs``); sums to ``score``
    category: str  # one of CLASSES
    mean_loss: float | None  # None when no record carried losses
    aum: float | None
    rank: int  # 1 = highest self-influence
    loss_rank: int | None  # 1 = highest mean loss
    aum_rank: int | None  # 1 = lowest AUM
    steps: int  # records that contained the example

    def to_dict(self) -> dict[str, Any]:
        return {
            "example_id": self.example_id,
            "score": self.score,
            "layer_scores": dict(self.layer_scores),
            "trajectory": list(self.trajectory),
            "class": self.category,
            "mean_loss": self.mean_loss,
            "aum": self.aum,
            "rank": self.rank,
            "loss_rank": self.loss_rank,
            "aum_rank": self.aum_rank,
            "steps": self.steps,
        }


@dataclass(frozen=True)
class MemorizationResult:
    """Rows sorted by rank, plus AUROC-ready score arrays aligned with ``example_ids``."""

    layers: list[str]
    epochs: list[int]
    rows: list[ExampleScore]
    example_ids: list[str]  # first-seen order; the order of ``arrays``
    arrays: dict[
        str, np.ndarray
    ]  # BASELINES -> scores, higher = more suspicious (aum negated); None if absent
    summary: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int) -> list[ExampleScore]:
        return self.rows[:k]

    def row(self, example_id: str) -> ExampleScore:
        for r in self.rows:
            if r.example_id == example_id:
                return r
        raise KeyError(f"example {example_id!r} not in the ranking")

    def evaluate(self, positives: Iterable[str], k: int | None = None) -> dict[str, dict[str, float]]:
        """AUROC and precision@k (default k = number of positives) of the score and of each baseline."""
        pos = set(positives)
        unknown = pos - set(self.example_ids)
        if unknown:
            raise ValueError(f"{len(unknown)} positive id(s) not in the ranking, e.g. {sorted(unknown)[0]!r}")
        labels = np.array([e in pos for e in self.example_ids])
        out: dict[str, dict[str, float]] = {}
        for name, scores in self.arrays.items():
            out[name] = {"auroc": auroc(labels, scores), "precision_at_k": precision_at_k(labels, scores, k)}
        return out

    def to_dict(self, top: int | None = None) -> dict[str, Any]:
        rows = self.rows if top is None else self.rows[:top]
        return {
            "layers": self.layers,
            "epochs": self.epochs,
            "summary": self.summary,
            "rows": [r.to_dict() for r in rows],
        }


def _classify(
    traj: np.ndarray, late_loss: np.ndarray, high_ratio: float, loss_threshold: float
) -> tuple[list[str], dict[str, Any]]:
    """Class per example from its per-epoch energy ``traj`` [N, E] and its late-window mean loss."""
    w = max(1, traj.shape[1] // 3)
    early = traj[:, :w].sum(1)
    early_cut = high_ratio * float(early.mean())
    unresolved = late_loss >= loss_threshold
    memorised = ~unresolved & (early >= early_cut)
    cats = np.where(unresolved, "unresolved", np.where(memorised, "memorised", "easy"))
    info = {
        "window_epochs": w,
        "high_ratio": high_ratio,
        "loss_threshold": loss_threshold,
        "early_energy_cut": early_cut,
    }
    return [str(c) for c in cats], info


def rank_memorization(
    records: Iterable[StepRecordLike],
    *,
    layers: Sequence[str] | None = None,
    epochs: Iterable[int] | None = None,
    high_ratio: float = 3.0,
    loss_threshold: float = math.log(2.0),
) -> MemorizationResult:
    """Rank every example seen in ``records`` by whole-run per-layer self-influence (module docstring).

    ``layers`` restricts the score to those layers (e.g. the CLI's ``--layer``); ``epochs`` restricts the
    records used (e.g. the last epoch only, see :func:`final_epoch_ranking`). Raises ``ValueError`` naming
    the record for inconsistent layer lists or array shapes, and when nothing is left to rank.
    """
    wanted_epochs = None if epochs is None else set(epochs)
    index: dict[str, int] = {}
    run_layers: list[str] | None = None
    cols: np.ndarray | None = None
    parts: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray | None]] = []
    nonfinite = 0
    n_steps = 0
    for n, rec in enumerate(records):
        if wanted_epochs is not None and rec.epoch not in wanted_epochs:
            continue
        where = f"step record {getattr(rec, 'seq', n)}"
        if run_layers is None:
            run_layers = list(rec.layers)
            if layers is None:
                cols = np.arange(len(run_layers))
            else:
                missing = [name for name in layers if name not in run_layers]
                if missing:
                    raise ValueError(f"layer(s) {missing} not in the run's layers {run_layers}")
                cols = np.array([run_layers.index(name) for name in layers])
        elif list(rec.layers) != run_layers:
            raise ValueError(f"{where}: layers {list(rec.layers)} differ from the run's {run_layers}")
        assert cols is not None
        ids = list(rec.example_ids)
        b, n_layers = len(ids), len(run_layers)
        norms = np.asarray(rec.grad_norms, dtype=np.float64)
        if norms.shape != (b, n_layers):
            raise ValueError(f"{where}: grad_norms shape {norms.shape}, expected {(b, n_layers)}")
        lr = np.asarray(rec.lr, dtype=np.float64)
        if lr.shape != (n_layers,):
            raise ValueError(f"{where}: lr shape {lr.shape}, expected {(n_layers,)}")
        weights = np.ones((b, n_layers)) if rec.weights is None else np.asarray(rec.weights, np.float64)
        if weights.shape != (b, n_layers):
            raise ValueError(f"{where}: weights shape {weights.shape}, expected {(b, n_layers)}")
        clip = getattr(rec, "clip_factors", None)
        scale = np.ones(b) if clip is None else np.asarray(clip, np.float64)
        losses = np.full(b, np.nan) if rec.losses is None else np.asarray(rec.losses, dtype=np.float64)
        if losses.shape != (b,) or scale.shape != (b,):
            raise ValueError(f"{where}: losses / clip_factors must have shape {(b,)}")
        margins = None if rec.margins is None else np.asarray(rec.margins, dtype=np.float64)
        if margins is not None and margins.shape != (b,):
            raise ValueError(f"{where}: margins shape {margins.shape}, expected {(b,)}")
        # NaN lr = a layer the optimizer does not train (tracker contract): it exerts no influence.
        energy = np.nan_to_num(lr, nan=0.0)[None, :] * weights * scale[:, None] * norms**2
        bad = ~np.isfinite(energy)
        nonfinite += int(bad[:, cols].sum())
        energy[bad] = 0.0  # NaN/Inf norms are legal records but carry no usable magnitude: counted, skipped
        idx = np.array([index.setdefault(e, len(index)) for e in ids], dtype=np.int64)
        parts.append((idx, int(rec.epoch), energy[:, cols], losses, margins))
        n_steps += 1
    if not parts or run_layers is None or cols is None:
        raise ValueError("no step records to rank" + ("" if epochs is None else " in the chosen epochs"))

    used_layers = [run_layers[c] for c in cols]
    epoch_list = sorted({p[1] for p in parts})
    epoch_pos = {e: k for k, e in enumerate(epoch_list)}
    n, n_ep, n_l = len(index), len(epoch_list), len(used_layers)
    energy_e = np.zeros((n, n_ep, n_l))
    loss_sum, loss_cnt = np.zeros(n), np.zeros(n)
    late_sum, late_cnt = np.zeros(n), np.zeros(n)
    margin_sum, margin_cnt = np.zeros((n, n_ep)), np.zeros((n, n_ep))
    late_from = n_ep - max(1, n_ep // 3)
    for idx, ep, en, losses, margins in parts:
        k = epoch_pos[ep]
        np.add.at(energy_e[:, k, :], idx, en)
        finite = np.isfinite(losses)
        np.add.at(loss_sum, idx[finite], losses[finite])
        np.add.at(loss_cnt, idx[finite], 1.0)
        if k >= late_from:
            np.add.at(late_sum, idx[finite], losses[finite])
            np.add.at(late_cnt, idx[finite], 1.0)
        if margins is not None:
            ok = np.isfinite(margins)
            np.add.at(margin_sum[:, k], idx[ok], margins[ok])
            np.add.at(margin_cnt[:, k], idx[ok], 1.0)

    total = energy_e.sum(1)  # [N, L]
    layer_mean = total.mean(0)
    norm = np.where(layer_mean > 0, layer_mean, 1.0)
    per_layer = total / norm  # S[i, l]
    trained = layer_mean > 0  # a layer with no energy at all (never trained) is left out of the mean
    if not trained.any():
        raise ValueError("every layer has zero recorded energy (lr, weights or norms all zero)")
    score = per_layer[:, trained].mean(1)
    traj = (energy_e[:, :, trained] / norm[None, None, trained]).mean(2)  # [N, E], sums over E to score
    mean_loss = np.divide(loss_sum, loss_cnt, out=np.full(n, np.nan), where=loss_cnt > 0)
    late_loss = np.divide(late_sum, late_cnt, out=np.full(n, np.nan), where=late_cnt > 0)
    has_margin = margin_cnt > 0
    aum: np.ndarray | None = None
    if has_margin.any():
        per_epoch = np.divide(margin_sum, margin_cnt, out=np.zeros_like(margin_sum), where=has_margin)
        n_margin_epochs = has_margin.sum(1)
        aum = np.divide(per_epoch.sum(1), n_margin_epochs, out=np.full(n, np.nan), where=n_margin_epochs > 0)

    cats, class_info = _classify(traj, np.nan_to_num(late_loss, nan=0.0), high_ratio, loss_threshold)
    ids = [""] * n
    for e, i in index.items():
        ids[i] = e
    rank = descending_ranks(score)
    has_loss = np.isfinite(mean_loss).any()
    loss_rank = descending_ranks(np.nan_to_num(mean_loss, nan=-np.inf)) if has_loss else None
    aum_rank = None if aum is None else descending_ranks(np.nan_to_num(-aum, nan=-np.inf))
    steps_per = np.zeros(n, dtype=np.int64)
    for idx, *_ in parts:
        np.add.at(steps_per, idx, 1)

    rows = [
        ExampleScore(
            example_id=ids[i],
            score=float(score[i]),
            layer_scores={name: float(per_layer[i, j]) for j, name in enumerate(used_layers)},
            trajectory=tuple(float(v) for v in traj[i]),
            category=cats[i],
            mean_loss=float(mean_loss[i]) if np.isfinite(mean_loss[i]) else None,
            aum=None if aum is None or not np.isfinite(aum[i]) else float(aum[i]),
            rank=int(rank[i]),
            loss_rank=None if loss_rank is None else int(loss_rank[i]),
            aum_rank=None if aum_rank is None else int(aum_rank[i]),
            steps=int(steps_per[i]),
        )
        for i in range(n)
    ]
    rows.sort(key=lambda r: (r.rank, r.example_id))
    arrays = {"self_influence": score}
    if has_loss:
        arrays["mean_loss"] = np.nan_to_num(mean_loss, nan=0.0)
    if aum is not None:
        arrays["aum"] = -np.nan_to_num(aum, nan=0.0)
    layer_total = total.sum(0)
    summary = {
        "examples": n,
        "steps": n_steps,
        "epochs": len(epoch_list),
        "layers": used_layers,
        "layer_energy_share": {
            name: float(layer_total[j] / layer_total.sum()) if layer_total.sum() > 0 else 0.0
            for j, name in enumerate(used_layers)
        },
        "classes": {c: cats.count(c) for c in CLASSES},
        "nonfinite_norms_skipped": nonfinite,
        "layers_without_energy": [name for j, name in enumerate(used_layers) if not trained[j]],
        "classification": class_info,
        "score": "whole-run per-layer self-influence: sum lr*w*c*norm^2, divided by the layer mean, averaged over layers",
        "baselines": [b for b in BASELINES if b in arrays and b != "self_influence"],
    }
    return MemorizationResult(used_layers, epoch_list, rows, ids, arrays, summary)


def final_epoch_ranking(records: Iterable[StepRecordLike], **kwargs: Any) -> MemorizationResult:
    """The same score from the last epoch's records only: the final-checkpoint comparison."""
    recs = list(records)
    if not recs:
        raise ValueError("no step records to rank")
    last = max(r.epoch for r in recs)
    return rank_memorization(recs, epochs=[last], **kwargs)
