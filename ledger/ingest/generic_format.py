"""The documented generic format (``gradledger.jsonl`` / ``gradledger.csv``): one label per row.

For labels no platform produced: programmatic labelling functions, Snorkel-style probabilistic labels,
in-house tools. Fields are documented in ``docs/ingest-formats.md``. A JSONL row is an object; a CSV row uses
the same column names, with ``value_json``, ``probabilities``, ``scores`` and ``reviews`` holding JSON text
and empty cells meaning "absent".
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from collections.abc import Iterator
from typing import Any

from ledger.ingest.context import ParseContext
from ledger.ingest.errors import FieldError, IngestError
from ledger.ingest.fields import boolean, clean_text, clean_value, get, ident, number, obj
from ledger.ingest.reader import DEFAULT_MAX_ITEM_BYTES
from ledger.ingest.record import (
    PRODUCERS,
    REVIEW_DECISIONS,
    STATUSES,
    LabelRecord,
    Review,
    Score,
    Seed,
    Workflow,
    timestamp,
    workflow_status,
)

SOURCE = "jsonl"
FORMAT_JSONL = "gradledger.jsonl"
FORMAT_CSV = "gradledger.csv"
PROB_TOLERANCE = 1e-6

_CSV_JSON_COLUMNS = ("value_json", "probabilities", "scores", "reviews")
_CSV_NUMBER_COLUMNS = ("effort_seconds", "consensus", "consensus_min", "consensus_max")
KNOWN_FIELDS = {
    "item_id", "label_id", "value", "value_json", "probabilities", "producer_kind", "producer", "project",
    "global_key", "external_id", "created_at", "updated_at", "effort_seconds", "status", "gold", "scores",
    "consensus", "consensus_min", "consensus_max", "consensus_method", "reviews", "review", "reviewer",
    "reviewed_at", "workflow_status", "seeded_from", "domain", "rights",
}  # fmt: skip


def _probabilities(v: object) -> dict[str, float] | list[float]:
    """Snorkel-style class probabilities: a list (class index order) or {class: p}; each in [0, 1], sum 1."""
    if isinstance(v, list):
        probs: list[float] = [number(p, f"probabilities[{i}]", 0.0, 1.0) or 0.0 for i, p in enumerate(v)]
        total = math.fsum(probs)
        out: dict[str, float] | list[float] = probs
    elif isinstance(v, dict):
        pd = {str(k): number(p, f"probabilities.{k}", 0.0, 1.0) or 0.0 for k, p in v.items()}
        total = math.fsum(pd.values())
        out = pd
    else:
        raise FieldError("probabilities", "expected an array or an object of probabilities")
    if not v:
        raise FieldError("probabilities", "must not be empty")
    if abs(total - 1.0) > PROB_TOLERANCE:
        raise FieldError("probabilities", f"sum to {total!r}, not 1 (tolerance {PROB_TOLERANCE})")
    return out


def parse(row: Any, line: int, ctx: ParseContext, fmt: str = FORMAT_JSONL) -> list[Any]:
    row = obj(row, "<row>")
    unknown = set(row) - KNOWN_FIELDS
    if unknown:
        raise FieldError(sorted(unknown)[0], "unknown field (see docs/ingest-formats.md)")
    item_id = ident(row.get("item_id"), "item_id", required=True)
    label_id = ident(row.get("label_id"), "label_id", required=True)
    assert item_id is not None and label_id is not None
    kind = get(row, "producer_kind", (str,), "producer_kind") or "human"
    if kind not in PRODUCERS:
        raise FieldError("producer_kind", f"must be one of {', '.join(PRODUCERS)}, got {kind!r}")
    producer_raw = get(row, "producer", (str,), "producer")
    producer = ctx.annotator(producer_raw) if kind == "human" else clean_text(producer_raw, ctx.pseud)
    status = get(row, "status", (str,), "status") or "submitted"
    if status not in STATUSES:
        raise FieldError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
    if "probabilities" in row and row["probabilities"] is not None:
        probs = _probabilities(row["probabilities"])
        value: Any = {"probabilities": probs}
        if row.get("value") is not None:
            value["value"] = row["value"]
    elif "value" in row:
        value = row["value"]
    else:
        raise FieldError("value", "missing required field (or give 'probabilities')")
    scores = []
    for i, s in enumerate(get(row, "scores", (list,), "scores") or []):
        spath = f"scores[{i}]"
        s = obj(s, spath)
        lo = number(s.get("min", 0.0), f"{spath}.min")
        hi = number(s.get("max", 1.0), f"{spath}.max")
        assert lo is not None and hi is not None
        if hi <= lo:
            raise FieldError(f"{spath}.max", "must be greater than min")
        val = number(s.get("value"), f"{spath}.value", lo, hi)
        if val is None:
            raise FieldError(f"{spath}.value", "missing required field")
        name = get(s, "name", (str,), f"{spath}.name", required=True)
        method = get(s, "method", (str,), f"{spath}.method", required=True)
        scores.append(Score(name, val, lo, hi, method))
    if row.get("consensus") is not None:
        lo = number(row.get("consensus_min", 0.0), "consensus_min")
        hi = number(row.get("consensus_max", 1.0), "consensus_max")
        assert lo is not None and hi is not None
        if hi <= lo:
            raise FieldError("consensus_max", "must be greater than consensus_min")
        val = number(row.get("consensus"), "consensus", lo, hi)
        assert val is not None
        method = get(row, "consensus_method", (str,), "consensus_method") or "jsonl.consensus"
        scores.append(Score("consensus", val, lo, hi, method))
    reviews = []
    raw_reviews = get(row, "reviews", (list,), "reviews") or []
    if row.get("review") is not None:
        raw_reviews = [
            *raw_reviews,
            {"decision": row.get("review"), "reviewer": row.get("reviewer"), "at": row.get("reviewed_at")},
        ]
    for i, rv in enumerate(raw_reviews):
        rpath = f"reviews[{i}]"
        rv = obj(rv, rpath)
        decision = get(rv, "decision", (str,), f"{rpath}.decision", required=True)
        if decision not in REVIEW_DECISIONS:
            raise FieldError(
                f"{rpath}.decision", f"must be one of {', '.join(REVIEW_DECISIONS)}, got {decision!r}"
            )
        reviewer = get(rv, "reviewer", (str,), f"{rpath}.reviewer")
        reviews.append(
            Review(decision, ctx.person(reviewer), timestamp(rv.get("at"), f"{rpath}.at"), decision)
        )
    wf_raw = get(row, "workflow_status", (str,), "workflow_status")
    seed = ident(row.get("seeded_from"), "seeded_from")
    return [
        LabelRecord(
            source=SOURCE,
            format=fmt,
            label_id=label_id,
            item_id=item_id,
            value=clean_value(value, ctx.pseud),
            producer_kind=kind,
            producer=producer,
            global_key=get(row, "global_key", (str,), "global_key"),
            external_id=clean_text(get(row, "external_id", (str,), "external_id"), ctx.pseud),
            project=ident(row.get("project"), "project") or ctx.project,
            created_at=timestamp(row.get("created_at"), "created_at"),
            updated_at=timestamp(row.get("updated_at"), "updated_at"),
            effort_seconds=number(row.get("effort_seconds"), "effort_seconds", 0.0),
            status=status,
            gold=boolean(row.get("gold"), "gold"),
            scores=scores,
            reviews=reviews,
            workflow=Workflow(workflow_status(wf_raw), wf_raw) if wf_raw else None,
            seeded_from=[Seed(seed, "prediction")] if seed is not None else [],
            domain=clean_text(get(row, "domain", (str,), "domain"), ctx.pseud),
            rights=get(row, "rights", (str,), "rights"),
            line=line,
        )
    ]


# -- CSV ----------------------------------------------------------------------------------------------------
class CsvReader:
    """Stream CSV rows as dicts with exact line numbers, a running sha256 and per-line UTF-8 checks."""

    def __init__(self, path: str | os.PathLike[str], *, max_item_bytes: int = DEFAULT_MAX_ITEM_BYTES) -> None:
        self.path = os.fspath(path)
        self.name = os.path.basename(self.path)
        self.max_item_bytes = max_item_bytes
        self.mode = "csv"
        self.size = 0
        self._hash = hashlib.sha256()

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def _lines(self, fh: Any, counter: list[int]) -> Iterator[str]:
        while True:
            raw = fh.readline(self.max_item_bytes + 1)
            if not raw:
                return
            counter[0] += 1
            self.size += len(raw)
            self._hash.update(raw)
            if len(raw) > self.max_item_bytes:
                raise IngestError(
                    self.path, counter[0], None, f"line longer than the {self.max_item_bytes}-byte limit"
                )
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise IngestError(
                    self.path,
                    counter[0],
                    None,
                    f"not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})",
                ) from None
            if counter[0] == 1 and text.startswith("\ufeff"):
                text = text[1:]
            yield text

    def __iter__(self) -> Iterator[tuple[int, int, Any]]:
        counter = [0]
        with open(self.path, "rb") as fh:
            reader = csv.reader(self._lines(fh, counter), strict=True)
            try:
                header = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise IngestError(self.path, counter[0], None, f"invalid CSV: {exc}") from None
            for col in header:
                if col not in KNOWN_FIELDS:
                    raise IngestError(self.path, 1, col, "unknown column (see docs/ingest-formats.md)")
            index = 0
            while True:
                start = counter[0] + 1
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise IngestError(self.path, counter[0], None, f"invalid CSV: {exc}") from None
                if not cells or all(c == "" for c in cells):
                    continue
                if len(cells) != len(header):
                    raise IngestError(
                        self.path, start, None, f"expected {len(header)} columns, got {len(cells)}"
                    )
                yield start, index, self._row(dict(zip(header, cells, strict=True)), start)
                index += 1

    def _row(self, cells: dict[str, str], line: int) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for k, v in cells.items():
            if v == "":
                continue
            try:
                if k in _CSV_JSON_COLUMNS:
                    row["value" if k == "value_json" else k] = json.loads(v)
                elif k in _CSV_NUMBER_COLUMNS:
                    row[k] = float(v)
                    if not math.isfinite(row[k]):
                        raise ValueError("not finite")
                elif k == "gold":
                    if v.lower() not in ("true", "false", "1", "0"):
                        raise ValueError("expected true/false/1/0")
                    row[k] = v.lower() in ("true", "1")
                else:
                    row[k] = v
            except ValueError as exc:
                raise IngestError(self.path, line, k, f"invalid cell: {exc}") from None
        return row
