"""Annotation priorities: two separate queues, never merged into one score.

- **ambiguity** (needs guidelines or more data): domains whose examples stay uncertain deep in the network,
  from an entropy depth profile (:mod:`audit.profiles`). Domain score: mean normalised probe entropy over the
  last ``late_layers`` layers; mean prediction depth is shown beside it and breaks ties. Examples within a
  domain are ordered by their own late-layer entropy, then depth.
- **label disagreement** (needs relabelling): labelled examples whose training record argues with their
  label, from a memorisation ranking (:mod:`audit.memorization`). An example is *flagged* when its whole-run
  self-influence is high (>= ``high_ratio`` x the mean example's) or its AUM is negative (on average over
  training the assigned class lost to another one). Domain score: the fraction of its examples flagged;
  mean self-influence and the negative-AUM fraction are shown beside it. Examples within a domain are
  ordered by self-influence rank.

Both queues rank domains first (a team fixes a slice's guidelines or relabels a source, not one image) and
list examples within each domain. Exports: :func:`labelbox_ndjson` (one data row per line, keyed by
``global_key`` with a Labelbox batch priority 1 = highest .. 5 = lowest; the k-th domain gets
``min(k, 5)``, so each priority level becomes one ``project.create_batch(..., global_keys=..., priority=p)``)
and :func:`label_studio_tasks` (a Label Studio JSON task list; the priority and reason sit in ``data`` so
the Data Manager can sort and filter on them).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from audit.memorization import MemorizationResult
from audit.profiles import ProfileResult

AMBIGUITY = "ambiguity"
DISAGREEMENT = "label_disagreement"


@dataclass(frozen=True)
class QueueItem:
    example_id: str
    domain: str
    score: float  # the queue's own per-example score (late entropy, or self-influence)
    priority: int  # 1 (highest) .. 5 (lowest)
    reason: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainEntry:
    domain: str
    rank: int  # 1 = top of the queue
    score: float  # the queue's domain score
    n: int
    detail: dict[str, Any]
    items: list[QueueItem]


@dataclass(frozen=True)
class Queue:
    name: str  # AMBIGUITY or DISAGREEMENT
    criterion: str
    domains: list[DomainEntry]  # ranked

    def items(self) -> list[QueueItem]:
        """Every listed example, domain by domain in queue order."""
        return [item for d in self.domains for item in d.items]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.name,
            "criterion": self.criterion,
            "domains": [
                {
                    "domain": d.domain,
                    "rank": d.rank,
                    "score": d.score,
                    "n": d.n,
                    **d.detail,
                    "items": [
                        {"example_id": i.example_id, "score": i.score, "priority": i.priority, **i.detail}
                        for i in d.items
                    ],
                }
                for d in self.domains
            ],
        }


def ambiguity_queue(
    profile: ProfileResult,
    example_ids: Sequence[str],
    domains: Sequence[str],
    *,
    late_layers: int = 1,
    top_per_domain: int | None = 100,
) -> Queue:
    """Rank domains by late-layer probe entropy (the profile's evaluated examples only)."""
    if len(example_ids) != len(profile.example_depth) or len(domains) != len(example_ids):
        raise ValueError(
            f"{len(example_ids)} ids and {len(domains)} domains for a profile of {len(profile.example_depth)} examples"
        )
    if not 1 <= late_layers <= len(profile.layers):
        raise ValueError(f"late_layers must be in [1, {len(profile.layers)}], got {late_layers}")
    late = profile.layers[-late_layers:]
    ex_late = profile.example_entropy[:, -late_layers:].mean(axis=1)
    dom = np.array([str(d) for d in domains])
    entries = []
    for d in profile.domains:
        ests = [profile.entropy[d][lay] for lay in late]
        if ests[0].n == 0:
            continue
        score = float(np.mean([e.mean for e in ests]))
        detail = {
            "late_layers": late,
            "entropy_ci": [ests[-1].low, ests[-1].high],
            "depth": profile.depth[d].mean,
            "depth_ci": [profile.depth[d].low, profile.depth[d].high],
        }
        rows = np.flatnonzero(profile.evaluated & (dom == d))
        order = rows[np.lexsort((-profile.example_depth[rows], -ex_late[rows]))]
        entries.append((score, profile.depth[d].mean, d, ests[0].n, detail, order))
    entries.sort(key=lambda e: (-e[0], -e[1], e[2]))
    out = []
    for k, (score, _, d, n, detail, order) in enumerate(entries, start=1):
        prio = min(k, 5)
        keep = order if top_per_domain is None else order[:top_per_domain]
        items = [
            QueueItem(
                example_id=str(example_ids[i]),
                domain=d,
                score=float(ex_late[i]),
                priority=prio,
                reason=f"probe entropy {ex_late[i]:.2f} at {'/'.join(late)}, prediction depth {int(profile.example_depth[i])}",
                detail={"entropy": float(ex_late[i]), "depth": int(profile.example_depth[i])},
            )
            for i in keep
        ]
        out.append(DomainEntry(d, k, score, n, detail, items))
    criterion = (
        f"mean normalised probe entropy over the last {late_layers} layer(s); ties by prediction depth"
    )
    return Queue(AMBIGUITY, criterion, out)


def disagreement_queue(
    result: MemorizationResult,
    domains: Mapping[str, str],
    *,
    high_ratio: float = 3.0,
    top_per_domain: int | None = 100,
    flagged_only: bool = True,
) -> Queue:
    """Rank domains by the fraction of their labelled examples flagged (high self-influence or AUM < 0).

    ``domains`` maps example id -> domain; examples without a domain are left out (they are not labelled
    data of a known slice). ``flagged_only`` lists only flagged examples as items.
    """
    scores = result.arrays["self_influence"]
    aum = result.arrays.get("aum")  # negated AUM: > 0 means AUM < 0
    cut = high_ratio * float(scores.mean())
    ids = result.example_ids
    by_domain: dict[str, list[int]] = {}
    for i, e in enumerate(ids):
        if e in domains:
            by_domain.setdefault(str(domains[e]), []).append(i)
    if not by_domain:
        raise ValueError("no ranked example has a domain")
    high = scores >= cut
    neg_aum = aum > 0 if aum is not None else np.zeros(len(ids), bool)
    flagged = high | neg_aum
    entries = []
    for d, rows_list in by_domain.items():
        rows = np.array(rows_list)
        detail: dict[str, Any] = {
            "flagged": int(flagged[rows].sum()),
            "high_self_influence_fraction": float(high[rows].mean()),
            "negative_aum_fraction": float(neg_aum[rows].mean()) if aum is not None else None,
            "mean_self_influence": float(scores[rows].mean()),
        }
        order = rows[np.argsort(-scores[rows], kind="stable")]
        if flagged_only:
            order = order[flagged[order]]
        entries.append((float(flagged[rows].mean()), float(scores[rows].mean()), d, len(rows), detail, order))
    entries.sort(key=lambda e: (-e[0], -e[1], e[2]))
    out = []
    for k, (score, _, d, n, detail, order) in enumerate(entries, start=1):
        prio = min(k, 5)
        keep = order if top_per_domain is None else order[:top_per_domain]
        items = []
        for i in keep:
            row = result.row(ids[i])
            why = []
            if high[i]:
                why.append(f"self-influence {row.score:.2f} (rank {row.rank})")
            if neg_aum[i]:
                why.append(f"AUM {row.aum:.2f} < 0")
            items.append(
                QueueItem(
                    example_id=ids[i],
                    domain=d,
                    score=row.score,
                    priority=prio,
                    reason="; ".join(why) or f"self-influence {row.score:.2f} (rank {row.rank})",
                    detail={
                        "rank": row.rank,
                        "aum": row.aum,
                        "mean_loss": row.mean_loss,
                        "class": row.category,
                    },
                )
            )
        out.append(DomainEntry(d, k, score, n, detail, items))
    criterion = f"fraction flagged: self-influence >= {high_ratio} x mean, or AUM < 0"
    return Queue(DISAGREEMENT, criterion, out)


def labelbox_ndjson(queue: Queue, row_data_for: Callable[[str], str] | None = None) -> str:
    """One JSON object per line: ``global_key`` (the example id), ``priority`` (1..5), queue, domain, score,
    reason; plus ``row_data`` when ``row_data_for`` maps an id to its asset URL (Labelbox data row import)."""
    lines = []
    for item in queue.items():
        row: dict[str, Any] = {"global_key": item.example_id}
        if row_data_for is not None:
            row["row_data"] = row_data_for(item.example_id)
        row.update(
            priority=item.priority, queue=queue.name, domain=item.domain, score=item.score, reason=item.reason
        )
        lines.append(json.dumps(row, sort_keys=False))
    return "\n".join(lines) + ("\n" if lines else "")


def label_studio_tasks(
    queue: Queue, data_for: Callable[[str], dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """Label Studio JSON tasks: ``data`` holds the example id, priority, queue, domain, reason (and whatever
    ``data_for`` returns for the labeling config, e.g. ``{"image": url}``); ``meta`` holds the score."""
    tasks = []
    for item in queue.items():
        data: dict[str, Any] = dict(data_for(item.example_id)) if data_for is not None else {}
        data.update(
            example_id=item.example_id,
            priority=item.priority,
            queue=queue.name,
            domain=item.domain,
            reason=item.reason,
        )
        tasks.append({"data": data, "meta": {"score": item.score, **item.detail}})
    return tasks
