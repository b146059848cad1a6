"""Ranking metrics for the analytics validations: AUROC, precision@k and descending ranks.

AUROC is scikit-learn's ``roc_auc_score`` (ties count one half); the rest is a few lines of numpy.
Every function takes ``labels`` (1 / True = positive, e.g. a flipped label) and ``scores`` where higher means
"more likely positive".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import roc_auc_score


def _check(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape != y.shape:
        raise ValueError(f"labels and scores must be 1-D and the same length, got {y.shape} and {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int((~np.isfinite(s)).sum())} non-finite value(s)")
    return y, s


def auroc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve; needs at least one positive and one negative."""
    y, s = _check(labels, scores)
    if y.all() or not y.any():
        raise ValueError("AUROC needs both positive and negative labels")
    return float(roc_auc_score(y, s))


def precision_at_k(
    labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray, k: int | None = None
) -> float:
    """Fraction of positives among the ``k`` highest scores (default k = number of positives).

    Ties at the cut-off are broken by input order (a stable sort), so the figure is deterministic.
    """
    y, s = _check(labels, scores)
    k = int(y.sum()) if k is None else int(k)
    if not 0 < k <= len(y):
        raise ValueError(f"k must be in [1, {len(y)}], got {k}")
    top = np.argsort(-s, kind="stable")[:k]
    return float(y[top].mean())


def descending_ranks(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks, 1 = highest score; tied scores share the best (lowest) rank."""
    s = np.asarray(scores, dtype=np.float64)
    return rankdata(-s, method="min").astype(np.int64)
