"""Per-example, per-layer contribution totals of one run, from its step records in one streaming pass.

The metric is the query aggregates' ``update`` (``audit.aggregates``): for example i, layer l, summed over the
sample-steps, ``lr_l · w_il · c_i · ‖g_il‖ / d_i`` (``d_i`` = the size of i's micro-batch under a mean-reduced
loss, 1 under sum; ``c_i`` the DP clipping factor, 1 without DP); ``self_influence`` is ``Σ lr_l · ‖g_il‖²``.
A non-finite contribution is left out of both sums and counted per layer in ``excluded``.

Why not read the query aggregate tables: lineage graphs and signed exports must be recomputable by an
offline verifier that holds only the step entries (no database), so the exporter and the verifier both call
:func:`run_totals` on the same records in the same order and get bit-identical floats.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RunTotals:
    layers: list[str]
    example_ids: list[str] = field(default_factory=list)  # first-seen order; row i of the arrays
    update: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [N, L] float64
    self_influence: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [N, L]
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N] sample-steps
    first_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N] first step seq
    last_seq: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [N] last step seq
    epochs: list[int] = field(default_factory=list)  # distinct epochs, ascending
    layer_by_epoch: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> [L] update totals
    example_by_epoch: dict[int, np.ndarray] = field(default_factory=dict)  # epoch -> [N] update (all layers)
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [L]
    steps: int = 0
    sample_steps: int = 0
    step_seqs: list[int] = field(default_factory=list)
    eps: float | None = None  # the last step's DP epsilon, if any

    def index(self) -> dict[str, int]:
        return {ex: i for i, ex in enumerate(self.example_ids)}


def _grow(a: np.ndarray, n: int, fill: float = 0) -> np.ndarray:
    if a.shape[0] >= n:
        return a
    new = np.full((max(n, 2 * a.shape[0]), *a.shape[1:]), fill, a.dtype)
    new[: a.shape[0]] = a
    return new


def run_totals(records: Iterable[Any], layers: list[str], loss_reduction: str = "mean") -> RunTotals:
    """Sum every step record (``ledger.records.StepRecord`` or alike) of one run; see the module docstring.

    Raises ValueError when a record's layer list differs from ``layers`` (the run entry's).
    """
    n_l = len(layers)
    t = RunTotals(list(layers), excluded=np.zeros(n_l, np.int64))
    ids: dict[str, int] = {}
    upd = np.zeros((64, n_l))
    sin = np.zeros((64, n_l))
    cnt = np.zeros(64, np.int64)
    first = np.full(64, -1, np.int64)
    last = np.full(64, -1, np.int64)
    ex_epoch: dict[int, np.ndarray] = {}
    for rec in records:
        if list(rec.layers) != t.layers:
            raise ValueError(f"step entry {rec.seq}: its layers differ from the run entry's")
        b = len(rec.example_ids)
        idx = np.empty(b, np.int64)
        for k, ex in enumerate(rec.example_ids):
            i = ids.get(ex)
            if i is None:
                i = ids[ex] = len(ids)
            idx[k] = i
        n = len(ids)
        if n > upd.shape[0]:
            upd, sin, cnt = _grow(upd, n), _grow(sin, n), _grow(cnt, n)
            first, last = _grow(first, n, -1), _grow(last, n, -1)
            for ep in ex_epoch:
                ex_epoch[ep] = _grow(ex_epoch[ep], n)
        norms = np.asarray(rec.grad_norms, np.float64)
        w = np.asarray(rec.weights, np.float64)
        lr = np.asarray(rec.lr, np.float64)
        if loss_reduction == "mean":
            d = np.repeat(np.asarray(rec.micro_batches, np.float64), rec.micro_batches)
        else:
            d = np.ones(b)
        c = np.ones(b) if rec.clip_factors is None else np.asarray(rec.clip_factors, np.float64)
        u = lr[None, :] * w * norms * (c / d)[:, None]
        s = lr[None, :] * (norms * norms)
        ok = np.isfinite(u) & np.isfinite(s)
        if not ok.all():
            u = np.where(ok, u, 0.0)
            s = np.where(ok, s, 0.0)
            t.excluded += (~ok).sum(axis=0)
        np.add.at(upd, idx, u)
        np.add.at(sin, idx, s)
        np.add.at(cnt, idx, 1)
        fresh = first[idx] < 0
        first[idx[fresh]] = rec.seq
        last[idx] = rec.seq
        ep = int(rec.epoch)
        if ep not in t.layer_by_epoch:
            t.layer_by_epoch[ep] = np.zeros(n_l)
            ex_epoch[ep] = np.zeros(upd.shape[0])
        t.layer_by_epoch[ep] += u.sum(axis=0)
        np.add.at(ex_epoch[ep], idx, u.sum(axis=1))
        t.steps += 1
        t.sample_steps += b
        t.step_seqs.append(int(rec.seq))
        if rec.eps is not None:
            t.eps = float(rec.eps)
    n = len(ids)
    t.example_ids = list(ids)
    t.update, t.self_influence, t.count = upd[:n], sin[:n], cnt[:n]
    t.first_seq, t.last_seq = first[:n], last[:n]
    t.epochs = sorted(t.layer_by_epoch)
    t.example_by_epoch = {ep: ex_epoch[ep][:n] for ep in t.epochs}
    return t
