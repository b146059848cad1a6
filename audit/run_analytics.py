"""A run's analytics read from the ledger: the memorisation ranking with label provenance beside each row,
and the two annotation-priority queues. Shared by ``gradledger memorization | priorities`` and the report.

Everything here is computed from the ledger alone (``Ledger.steps(run)``, the run's manifest, the run's
latest ``profile`` entry); the pure analytics live in :mod:`audit.memorization`, :mod:`audit.profiles` and
:mod:`audit.priorities`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from audit.memorization import MemorizationResult, rank_memorization
from audit.priorities import Queue, ambiguity_queue, disagreement_queue

NO_DOMAIN = "(no domain)"
# A label whose latest review decision is one of these was later rejected or corrected by a reviewer.
CORRECTED = ("reject", "fix")


class AnalyticsError(ValueError):
    """Unknown run / layer, or a run with nothing to analyse; the CLI turns it into exit 2."""


@dataclass
class RunContext:
    """A run's ``run`` entry and its manifest (None when the run was attached without one)."""

    ledger: Any
    run: str
    record: Any  # ledger.records.RunRecord
    manifest: Any | None  # ledger.provenance.Manifest

    def provenance(self, example_id: str) -> Any | None:
        return None if self.manifest is None else self.manifest.get(example_id)

    def domain(self, example_id: str) -> str:
        p = self.provenance(example_id)
        return p.domain if p is not None and p.domain is not None else NO_DOMAIN


def open_run(ledger: Any, run: str) -> RunContext:
    """The run's context; AnalyticsError naming the runs that exist when ``run`` is unknown."""
    from ledger.records import run_record

    try:
        rec = run_record(ledger, run)
    except KeyError as exc:
        raise AnalyticsError(str(exc.args[0])) from None
    manifest = None
    if rec.manifest_seq is not None:
        from ledger.provenance import Manifest

        manifest = Manifest.load(ledger, int(rec.manifest_seq))
    return RunContext(ledger, run, rec, manifest)


def step_count(ledger: Any, run: str) -> int:
    """Number of the run's step entries (bodies only; for progress bars)."""
    return sum(1 for e in ledger.entries(kind="step", payloads=False) if e.body.get("run") == run)


def memorization(
    ctx: RunContext, layers: Sequence[str] | None = None, records: Iterable[Any] | None = None
) -> MemorizationResult:
    """``rank_memorization`` over the run's step records; AnalyticsError for unknown layers / no steps."""
    if layers:
        unknown = [name for name in layers if name not in ctx.record.layers]
        if unknown:
            raise AnalyticsError(
                f"run {ctx.run!r} has no layer(s) {unknown} (layers: {', '.join(ctx.record.layers)})"
            )
    try:
        return rank_memorization(
            records if records is not None else ctx.ledger.steps(ctx.run),
            layers=list(layers) if layers else None,
        )
    except ValueError as exc:
        raise AnalyticsError(f"run {ctx.run!r}: {exc}") from None


def provenance_fields(ctx: RunContext, example_id: str) -> dict[str, Any]:
    """Label id, annotator pseudonym(s), domain, consensus, review of an example (None where unknown)."""
    p = ctx.provenance(example_id)
    if p is None:
        return {
            "label_id": None,
            "annotator": None,
            "domain": None,
            "consensus": None,
            "review": None,
            "source": None,
        }
    names = [a for a in (p.annotators or (p.annotator,)) if a]
    return {
        "label_id": p.label_id,
        "annotator": ", ".join(dict.fromkeys(names)) or None,
        "domain": p.domain,
        "consensus": p.consensus,
        "review": p.review,
        "source": p.source,
    }


def review_check(ctx: RunContext, result: MemorizationResult) -> dict[str, Any] | None:
    """How each signal ranks the labels a reviewer later rejected or corrected, when the ledger knows any.

    AUROC / precision@k of the score and of both baselines against those labels, on equal terms; None when
    the run has no manifest or the reviewed set is empty or covers every example (nothing to compare).
    """
    if ctx.manifest is None:
        return None
    positives = [
        e for e in result.example_ids if (p := ctx.provenance(e)) is not None and p.review in CORRECTED
    ]
    if not positives or len(positives) == len(result.example_ids):
        return None
    return {
        "positives": len(positives),
        "definition": "labels whose latest review decision is reject or fix",
        "signals": result.evaluate(positives),
    }


def memorization_json(ctx: RunContext, result: MemorizationResult, top: int | None) -> dict[str, Any]:
    """JSON-ready ranking: rows with provenance, the summary, baselines and the review check."""
    rows = result.rows if top is None else result.rows[:top]
    out_rows = []
    for r in rows:
        d = r.to_dict()
        d.update(provenance_fields(ctx, r.example_id))
        out_rows.append(d)
    return {
        "run": ctx.run,
        "run_seq": ctx.record.seq,
        "layers": result.layers,
        "epochs": result.epochs,
        "summary": result.summary,
        "baselines": {
            "mean_loss": "mean training loss over every recorded step (higher = more suspicious)",
            "aum": "area under the margin, Pleiss et al. 2020 (lower = more suspicious)",
        },
        "review_check": review_check(ctx, result),
        "rows": out_rows,
    }


@dataclass
class Priorities:
    """The two queues, kept apart. ``ambiguity`` is None (with ``ambiguity_unavailable``) without a profile."""

    disagreement: Queue
    ambiguity: Queue | None
    ambiguity_unavailable: str | None
    profile_seq: int | None
    profile_inputs_digest: str | None
    memorization: MemorizationResult

    def to_json(self, ctx: RunContext) -> dict[str, Any]:
        return {
            "run": ctx.run,
            "queues": {
                "ambiguity": None if self.ambiguity is None else self.ambiguity.to_dict(),
                "label_disagreement": self.disagreement.to_dict(),
            },
            "ambiguity_source": None
            if self.profile_seq is None
            else {"profile_seq": self.profile_seq, "inputs_digest": self.profile_inputs_digest},
            "ambiguity_unavailable": self.ambiguity_unavailable,
            "note": "two separate queues, never merged into one score: ambiguity needs guidelines or more data, "
            "label disagreement needs relabelling",
        }


def priorities(
    ctx: RunContext,
    *,
    top_per_domain: int | None = 100,
    result: MemorizationResult | None = None,
) -> Priorities:
    """The label-disagreement queue from the memorisation ranking (domains from the manifest) and the
    ambiguity queue from the run's latest ``profile`` entry."""
    from audit.profiles_ledger import load_profile

    res = result if result is not None else memorization(ctx)
    domains = {e: ctx.domain(e) for e in res.example_ids}
    disagreement = disagreement_queue(res, domains, top_per_domain=top_per_domain)
    try:
        stored = load_profile(ctx.ledger, ctx.run)
    except ValueError as exc:  # a profile entry without the per-example payloads this queue needs
        return Priorities(disagreement, None, str(exc), None, None, res)
    if stored is None:
        return Priorities(
            disagreement,
            None,
            f"run {ctx.run!r} has no profile entry yet (run `gradledger profile`)",
            None,
            None,
            res,
        )
    amb = ambiguity_queue(
        stored.result, stored.example_ids, stored.example_domains, top_per_domain=top_per_domain
    )
    return Priorities(disagreement, amb, None, stored.seq, stored.result.inputs_digest, res)
