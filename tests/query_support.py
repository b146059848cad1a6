"""Brute-force oracle for the query aggregates: sums recomputed straight from the raw step records.

Written from the metric definitions (audit/aggregates.py docstring), one sample-step at a time in Python
floats, sharing no code with the indexer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Oracle:
    layers: list[str]
    update: dict[str, list[float]] = field(default_factory=dict)
    self_influence: dict[str, list[float]] = field(default_factory=dict)
    weight: dict[str, list[float]] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)
    excluded: list[int] = field(default_factory=list)
    # (example, epoch) -> per-layer update / self-influence
    by_epoch: dict[tuple[str, int], tuple[list[float], list[float]]] = field(default_factory=dict)

    def metric(self, name: str) -> dict[str, list[float]]:
        return self.update if name == "update" else self.self_influence


def brute_force(records: Iterable[Any], loss_reduction: str, epochs: tuple[int, int] | None = None) -> Oracle:
    out: Oracle | None = None
    for rec in records:
        if epochs is not None and not epochs[0] <= rec.epoch <= epochs[1]:
            continue
        if out is None:
            out = Oracle(list(rec.layers), excluded=[0] * len(rec.layers))
        sizes = [m for m in rec.micro_batches for _ in range(m)]
        for i, ex in enumerate(rec.example_ids):
            d = float(sizes[i]) if loss_reduction == "mean" else 1.0
            c = 1.0 if rec.clip_factors is None else float(rec.clip_factors[i])
            upd = out.update.setdefault(ex, [0.0] * len(out.layers))
            sin = out.self_influence.setdefault(ex, [0.0] * len(out.layers))
            w = out.weight.setdefault(ex, [0.0] * len(out.layers))
            ep_u, ep_s = out.by_epoch.setdefault(
                (ex, rec.epoch), ([0.0] * len(out.layers), [0.0] * len(out.layers))
            )
            out.count[ex] = out.count.get(ex, 0) + 1
            for j in range(len(out.layers)):
                lr = float(rec.lr[j])
                n = float(rec.grad_norms[i, j])
                wij = float(rec.weights[i, j])
                w[j] += wij
                u = lr * wij * c * n / d
                s = lr * n * n
                if not (math.isfinite(u) and math.isfinite(s)):
                    out.excluded[j] += 1
                    continue
                upd[j] += u
                sin[j] += s
                ep_u[j] += u
                ep_s[j] += s
    assert out is not None, "no steps in range"
    return out


def aggregate_tables(led: Any) -> dict[str, list[Any]]:
    """Every query-aggregates table of a ledger as sorted rows, leaf hashes left out (they differ per
    ledger): for comparing two ledgers' aggregates built in different ways."""
    from sqlalchemy import select

    from audit import aggregates

    out = {}
    with led.engine.connect() as conn:
        for t in aggregates.INDEXER.tables:
            cols = [c for c in t.columns if c.name != "leaf_hash"]
            out[t.name] = [tuple(r) for r in conn.execute(select(*cols).order_by(*t.primary_key.columns))]
    return out
