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

import msgspec

from ledger import canonical
from ledger.canonical import MAX_SAFE_INT, CanonicalJSON, canonical_json
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

    def json_body(self) -> dict[str, Any]:
        """``body()`` with integral floats as ints, as RFC 8785 writes them (see ``_encode``)."""
        return {
            "name": self.name,
            "value": json_number(self.value),
            "min": json_number(self.min),
            "max": json_number(self.max),
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

    def _content(self, cv: bytes) -> dict[str, Any]:
        """The record's content without ``value`` (``value_sha256`` stands for it): what ``record_sha256`` covers."""
        return {
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
            "value_sha256": hashlib.sha256(cv).hexdigest(),
            "scores": [s.body() for s in self.scores],
            "reviews": [r.body() for r in self.reviews],
            "workflow": self.workflow.body() if self.workflow else None,
            "seeded_from": [s.body() for s in self.seeded_from],
            "domain": self.domain,
            "rights": self.rights,
        }

    def _value_bytes(self) -> bytes:
        return self.value_json if self.value_json is not None else canonical_value_bytes(self.value)

    def body(self, export_ref: dict[str, Any], *, spliced: bool = False) -> dict[str, Any]:
        """The ``annotation`` entry body. ``record_sha256`` covers everything except where it was read from.

        ``spliced``: the value is given as its canonical bytes (``CanonicalJSON``, the same bytes
        ``value_sha256`` hashes), so the ledger does not encode it a second time.
        """
        cv = self._value_bytes()
        content = self._content(cv)
        content["record_sha256"] = _digest(content, False)
        content["value"] = CanonicalJSON(cv) if spliced else self.value
        content["export"] = export_ref
        content["line"] = self.line
        return content

    def encode(self, export_ref: dict[str, Any]) -> tuple[CanonicalJSON, str]:
        """(RFC 8785 bytes of ``body(export_ref, spliced=True)``, ``record_sha256``): what ingest appends.

        Raises ``FieldError("value")`` for a value without an RFC 8785 form, ``CanonicalError`` for any other
        field. How both texts are written: ``_digest`` and ``_encode``.
        """
        cv = self._value_bytes()
        content = self._content(cv)
        plain = (
            _plain(self.effort_seconds)
            and _plain(self.line)
            and all(_plain(s.value) and _plain(s.min) and _plain(s.max) for s in self.scores)
            and all(_plain(r.raw) for r in self.reviews)
        )
        digest = _digest(content, plain)
        content["record_sha256"] = digest
        content["export"] = export_ref
        content["line"] = self.line
        if plain:  # numbers in their RFC 8785 form (40.0 -> 40); the digest above saw the floats
            content["effort_seconds"] = json_number(self.effort_seconds)
            if self.scores:
                content["scores"] = [s.json_body() for s in self.scores]
            for rv in content["reviews"]:
                rv["raw"] = json_number(rv["raw"])
        return _encode(content, cv, plain), digest


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

    def _content(self, cv: bytes) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "suggestion_id": self.suggestion_id,
            "item": {"id": self.item_id, "global_key": self.global_key},
            "project": self.project,
            "model_version": self.model_version,
            "confidence": self.confidence,
            "checkpoint_seq": self.checkpoint_seq,
            "created_at": self.created_at,
            "value_sha256": hashlib.sha256(cv).hexdigest(),
        }

    def body(self, export_ref: dict[str, Any] | None, *, spliced: bool = False) -> dict[str, Any]:
        """The ``suggestion`` entry body (``spliced`` as for ``LabelRecord.body``)."""
        cv = canonical_value_bytes(self.value)
        content = self._content(cv)
        content["record_sha256"] = _digest(content, False)
        content["value"] = CanonicalJSON(cv) if spliced else self.value
        content["export"] = export_ref
        content["line"] = self.line
        return content

    def encode(self, export_ref: dict[str, Any] | None) -> tuple[CanonicalJSON, str]:
        """(RFC 8785 bytes of ``body(export_ref, spliced=True)``, ``record_sha256``), as ``LabelRecord.encode``."""
        cv = canonical_value_bytes(self.value)
        content = self._content(cv)
        plain = _plain(self.confidence) and _plain(self.checkpoint_seq) and _plain(self.line)
        digest = _digest(content, plain)
        content["record_sha256"] = digest
        content["export"] = export_ref
        content["line"] = self.line
        if plain:
            content["confidence"] = json_number(self.confidence)
        return _encode(content, cv, plain), digest


def json_number(x: Any) -> Any:
    """An integral float as the int RFC 8785 writes for it (``40.0`` -> ``40``); anything else unchanged."""
    if type(x) is float and x.is_integer() and -MAX_SAFE_INT <= x <= MAX_SAFE_INT:
        return int(x)
    return x


def _plain(x: Any, nested: bool = False) -> bool:
    """True if msgspec writes ``x`` as ``json.dumps`` does and, after ``json_number``, as RFC 8785 does.

    Strings always qualify (all three escape alike; msgspec refuses lone surrogates, which then take the
    slow path). Numbers qualify where all three print the same digits: ints in the double-safe range, and
    finite floats that are integral below 1e15 or non-integral in [1e-4, 1e16), which each writes as its
    shortest round-trip digits without an exponent (``tests/test_ingest_valuehash.py`` checks this on
    generated floats). Small containers (a review's raw verdict) qualify when all they hold does, except
    integral floats inside them: ``json_number`` rewrites only top-level numbers, so a nested ``40.0`` would
    be written ``40.0`` where RFC 8785 writes ``40``.
    """
    t = type(x)
    if t is str or t is bool or x is None:
        return True
    if t is float:
        if x.is_integer():
            return not nested and abs(x) < 1e15
        return 1e-4 <= abs(x) < 1e16  # False for NaN and infinities
    if t is int:
        return -MAX_SAFE_INT <= x <= MAX_SAFE_INT
    if t is dict:
        return all(type(k) is str and k.isascii() and k[:1] != "$" and _plain(v, True) for k, v in x.items())
    if t is list:
        return all(_plain(v, True) for v in x)
    return False


# Sorted keys, compact separators, ensure_ascii=False escaping: the json module's text in the domain
# ``_plain`` admits (checked on generated values by tests/test_ingest_valuehash.py).
_encode_sorted = msgspec.json.Encoder(order="sorted").encode


def _digest(content: dict[str, Any], plain: bool) -> str:
    """sha256 hex of ``json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)``.

    That text must stay byte-identical across versions: re-ingest duplicate detection compares digests
    stored by older versions. msgspec writes the same text ~5x faster when every number is ``_plain`` (the
    other fields are strings, bools, None and small ints by construction); otherwise ``json`` writes it.
    """
    try:
        if plain:
            try:
                return hashlib.sha256(_encode_sorted(content)).hexdigest()
            except UnicodeEncodeError:  # a lone surrogate: json reports it below
                pass
        return hashlib.sha256(_digest_dumps(content).encode("utf-8")).hexdigest()
    except UnicodeEncodeError as exc:  # JSON allows "\ud800"; UTF-8 does not
        raise CanonicalError(f"body: string is not valid Unicode ({exc.reason})") from None


def _encode(body: dict[str, Any], value: bytes, plain: bool) -> CanonicalJSON:
    """RFC 8785 bytes of a record body with ``value`` (canonical bytes) spliced in as ``body["value"]``.

    Why not only ``canonical_json``: its generic walk costs ~25 us per body, more than all the rest of
    encoding a label. A record body is built here from fixed ASCII keys, strings, bools, None and
    ``_plain`` numbers already in their RFC 8785 form (``json_number``); for exactly that, msgspec with
    sorted keys writes RFC 8785. Anything else (``plain`` False, a lone surrogate) goes to
    ``canonical_json``. With ``GRADLEDGER_CHECK_CANONICAL=1`` (the ingest tests) every body is compared.
    """
    if plain:
        body["value"] = msgspec.Raw(value)
        try:
            out = _encode_sorted(body)
        except UnicodeEncodeError:
            pass
        else:
            if canonical.CHECK_CANONICAL:
                body["value"] = CanonicalJSON(value)
                if out != canonical_json(body, "body"):
                    raise CanonicalError(f"body: fast encoding differs from canonical_json: {out[:120]!r}")
            return CanonicalJSON(out)
    body["value"] = CanonicalJSON(value)
    return CanonicalJSON(canonical_json(body, "body"))


def record_digest(content: dict[str, Any]) -> str:
    """sha256 of the sorted-key compact JSON of a record's content without ``value`` (``value_sha256``
    stands for it): the re-ingest duplicate key. Not RFC 8785 (the entry's leaf hash already is);
    recompute it as ``sha256(json.dumps({k: v for k, v in c.items() if k != "value"}, sort_keys=True,
    separators=(",", ":"), ensure_ascii=False))`` over the body minus export, line and record_sha256."""
    return _digest({k: v for k, v in content.items() if k != "value"}, False)
