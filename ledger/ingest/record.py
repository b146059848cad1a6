"""The normalised label record: one per label, whatever platform it came from (``annotation`` entry body v1).

Also the normalised model suggestion (``suggestion`` entry body v1) and the shared vocabularies. The field
list is documented in ``docs/ingest-formats.md``; keep the two in step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ledger.canonical import CanonicalJSON
from ledger.errors import CanonicalError
from ledger.ingest.errors import FieldError
from ledger.ingest.valuehash import canonical_value

_digest_dumps = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode

ANNOTATION_V = 1
SUGGESTION_V = 1
EXPORT_V = 1

PRODUCERS = ("human", "model", "program")
STATUSES = ("submitted", "skipped", "draft")
REVIEW_DECISIONS = ("approve", "reject", "fix")
# Workflow states, platform-neutral. The platform's own spelling is kept in ``workflow.raw``.
WORKFLOW_STATUSES = ("to_label", "in_progress", "submitted", "in_review", "in_rework", "done", "other")
# Workflow history actions.
WORKFLOW_ACTIONS = ("create", "submit", "update", "skip", "approve", "reject", "fix", "move", "other")

_WORKFLOW_STATUS_MAP = {
    # Labelbox Export v2 ``workflow_status`` (upper snake case) and the SDK's CamelCase enum names.
    "to_label": "to_label",
    "tolabel": "to_label",
    "unlabeled": "to_label",
    "in_progress": "in_progress",
    "inprogress": "in_progress",
    "in_review": "in_review",
    "inreview": "in_review",
    "in_rework": "in_rework",
    "inrework": "in_rework",
    "rework": "in_rework",
    "done": "done",
    "complete": "done",
    "completed": "done",
    # Label Studio ``last_action``.
    "submitted": "submitted",
    "updated": "submitted",
    "imported": "submitted",
    "accepted": "done",
    "fixed_and_accepted": "done",
    "rejected": "in_rework",
    "skipped": "other",
}

_ACTION_MAP = {
    "create": "create",
    "created": "create",
    "submit": "submit",
    "submitted": "submit",
    "update": "update",
    "updated": "update",
    "skip": "skip",
    "skipped": "skip",
    "approve": "approve",
    "approved": "approve",
    "accept": "approve",
    "accepted": "approve",
    "reject": "reject",
    "rejected": "reject",
    "fix": "fix",
    "fixed": "fix",
    "fixed_and_accepted": "fix",
    "move": "move",
    "moved": "move",
    "send_to_rework": "reject",
}


def _snake(raw: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", raw.strip())
    return re.sub(r"[\s\-]+", "_", s).lower()


@functools.lru_cache(maxsize=1024)
def workflow_status(raw: str) -> str:
    """Map a platform workflow state (``IN_REVIEW``, ``InReview``, ``rejected``...) to the neutral vocabulary."""
    key = _snake(raw)
    return _WORKFLOW_STATUS_MAP.get(key) or _WORKFLOW_STATUS_MAP.get(key.replace("_", ""), "other")


@functools.lru_cache(maxsize=1024)
def workflow_action(raw: str) -> str:
    key = _snake(raw)
    return _ACTION_MAP.get(key, "other")


def review_decision(raw: object) -> str | None:
    """Map a review verdict (``Approve``, ``accepted``, Labelbox v1 score 1/-1...) to approve/reject/fix."""
    if isinstance(raw, bool):
        return "approve" if raw else "reject"
    if isinstance(raw, int | float):
        return "approve" if raw > 0 else "reject" if raw < 0 else None
    if isinstance(raw, str):
        act = workflow_action(raw)
        return act if act in REVIEW_DECISIONS else None
    return None


def timestamp(value: object, fld: str) -> str | None:
    """Normalise an ISO 8601 time to RFC 3339 UTC with microseconds; naive times are taken as UTC."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise FieldError(fld, f"expected an ISO 8601 time string, got {type(value).__name__}")
    hit = _TS_CACHE.get(value)
    if hit is not None:
        return hit
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        raise FieldError(fld, f"not an ISO 8601 time: {value[:40]!r}") from None
    dt = dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    if dt.year < 1000:
        raise FieldError(fld, f"year {dt.year} is out of range")
    out = dt.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    if len(_TS_CACHE) > 4096:
        _TS_CACHE.clear()
    _TS_CACHE[value] = out
    return out


_TS_CACHE: dict[str, str] = {}


def canonical_value_bytes(value: Any) -> bytes:
    """RFC 8785 bytes of a label value (``ledger.canonical``); FieldError("value") if it has none."""
    try:
        return canonical_value(value)
    except CanonicalError as exc:
        raise FieldError("value", str(exc)) from None


def value_sha256(value: Any) -> str:
    """sha256 hex of the RFC 8785 bytes of a label value (``ledger.canonical``): recomputable from the value."""
    return hashlib.sha256(canonical_value_bytes(value)).hexdigest()


@dataclass(frozen=True)
class Score:
    """A quality score on the platform's own scale. Never averaged across platforms or methods."""

    name: str  # "consensus" | "benchmark" | "agreement" | "confidence" | ...
    value: float
    min: float
    max: float
    method: str  # e.g. "labelbox.consensus_score", "labelstudio.agreement"

    def unit(self) -> float:
        """The score mapped linearly from [min, max] onto [0, 1]."""
        return (self.value - self.min) / (self.max - self.min)

    def body(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "min": self.min,
            "max": self.max,
            "method": self.method,
        }


@dataclass(frozen=True)
class Review:
    decision: str | None  # approve | reject | fix | None (unrecognised; see raw)
    reviewer: str | None  # pseudonym
    at: str | None
    raw: Any

    def body(self) -> dict[str, Any]:
        return {"decision": self.decision, "reviewer": self.reviewer, "at": self.at, "raw": self.raw}


@dataclass(frozen=True)
class WorkflowEvent:
    action: str  # WORKFLOW_ACTIONS
    raw: str | None
    at: str | None
    by: str | None  # pseudonym
    from_step: str | None = None
    to_step: str | None = None

    def body(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "raw": self.raw,
            "at": self.at,
            "by": self.by,
            "from": self.from_step,
            "to": self.to_step,
        }


@dataclass(frozen=True)
class Workflow:
    status: str | None  # WORKFLOW_STATUSES
    raw: str | None
    history: tuple[WorkflowEvent, ...] = ()

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "raw": self.raw, "history": [e.body() for e in self.history]}


@dataclass(frozen=True)
class Seed:
    """A model suggestion that pre-filled a label: its source id, how the human treated it, its entry seq."""

    suggestion_id: str | None
    origin: str  # "prediction" (kept) | "prediction-changed" | "prediction-replaced" | "mal"
    seq: int | None = None

    def body(self) -> dict[str, Any]:
        return {"suggestion_id": self.suggestion_id, "origin": self.origin, "seq": self.seq}


@dataclass
class LabelRecord:
    """One label, normalised. ``value`` has e-mails scrubbed and signed URL queries removed already."""

    source: str
    format: str
    label_id: str
    item_id: str
    value: Any
    producer_kind: str = "human"
    producer: str | None = None  # pseudonym (human) or model / program name
    global_key: str | None = None
    external_id: str | None = None
    project: str | None = None
    created_at: str | None = None
    updated_at: str | None = None
    effort_seconds: float | None = None
    status: str = "submitted"
    gold: bool = False
    scores: list[Score] = field(default_factory=list)
    reviews: list[Review] = field(default_factory=list)
    workflow: Workflow | None = None
    seeded_from: list[Seed] = field(default_factory=list)
    domain: str | None = None
    rights: str | None = None
    line: int | None = None
    # Annotation feature ids that may be MAL suggestion uuids; resolved against the ledger at ingest.
    seed_candidates: list[str] = field(default_factory=list)
    # RFC 8785 bytes of ``value`` when the parser already has them (``fields.clean_value_json``).
    value_json: bytes | None = field(default=None, repr=False, compare=False)

    def body(self, export_ref: dict[str, Any], *, spliced: bool = False) -> dict[str, Any]:
        """The ``annotation`` entry body. ``record_sha256`` covers everything except where it was read from.

        ``spliced``: the value is given as its canonical bytes (``CanonicalJSON``, the same bytes
        ``value_sha256`` hashes), so the ledger does not encode it a second time.
        """
        cv = self.value_json if self.value_json is not None else canonical_value_bytes(self.value)
        content: dict[str, Any] = {
            "source": self.source,
            "format": self.format,
            "item": {"id": self.item_id, "global_key": self.global_key, "external_id": self.external_id},
            "project": self.project,
            "label_id": self.label_id,
            "producer": {"kind": self.producer_kind, "id": self.producer},
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "effort_seconds": self.effort_seconds,
            "status": self.status,
            "gold": self.gold,
            "value": self.value,
            "value_sha256": hashlib.sha256(cv).hexdigest(),
            "scores": [s.body() for s in self.scores],
            "reviews": [r.body() for r in self.reviews],
            "workflow": self.workflow.body() if self.workflow else None,
            "seeded_from": [s.body() for s in self.seeded_from],
            "domain": self.domain,
            "rights": self.rights,
        }
        content["record_sha256"] = record_digest(content)
        if spliced:
            content["value"] = CanonicalJSON(cv)
        content["export"] = export_ref
        content["line"] = self.line
        return content


@dataclass
class SuggestionRecord:
    """A model's suggestion for an item (Labelbox MAL import line, Label Studio prediction)."""

    source: str
    format: str
    suggestion_id: str
    item_id: str | None
    value: Any
    global_key: str | None = None
    project: str | None = None
    model_version: str | None = None
    confidence: float | None = None
    checkpoint_seq: int | None = None
    created_at: str | None = None
    line: int | None = None

    def body(self, export_ref: dict[str, Any] | None, *, spliced: bool = False) -> dict[str, Any]:
        """The ``suggestion`` entry body (``spliced`` as for ``LabelRecord.body``)."""
        cv = canonical_value_bytes(self.value)
        content: dict[str, Any] = {
            "source": self.source,
            "format": self.format,
            "suggestion_id": self.suggestion_id,
            "item": {"id": self.item_id, "global_key": self.global_key},
            "project": self.project,
            "model_version": self.model_version,
            "confidence": self.confidence,
            "checkpoint_seq": self.checkpoint_seq,
            "created_at": self.created_at,
            "value": self.value,
            "value_sha256": hashlib.sha256(cv).hexdigest(),
        }
        content["record_sha256"] = record_digest(content)
        if spliced:
            content["value"] = CanonicalJSON(cv)
        content["export"] = export_ref
        content["line"] = self.line
        return content


def record_digest(content: dict[str, Any]) -> str:
    """sha256 of the sorted-key compact JSON of a record's content without ``value`` (``value_sha256``
    stands for it): the re-ingest duplicate key. Not RFC 8785 (the entry's leaf hash already is);
    recompute it as ``sha256(json.dumps({k: v for k, v in c.items() if k != "value"}, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False))`` over the body minus export, line and record_sha256."""
    text = _digest_dumps({k: v for k, v in content.items() if k != "value"})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
