"""Model suggestions: record them (``suggestion`` entries tied to the checkpoint that made them) and export
them as pre-labels — Labelbox MAL NDJSON or Label Studio predictions — closing the loop
suggestion → human correction (linked at ingest through ``seeded_from``) → training → next checkpoint.

Linking back: a Labelbox label keeps a MAL annotation's ``uuid`` as its ``feature_id``, so a re-ingested
export links to the recorded suggestion directly. Label Studio assigns its own prediction ids on import;
the ingested export's ``predictions[]`` are recorded as Label Studio suggestions and its annotations link to
those (``parent_prediction``), with the same item and ``value_sha256`` as the suggestion recorded here.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

from ledger.ingest.pseudonym import contains_email
from ledger.ingest.record import SUGGESTION_V, SuggestionRecord
from ledger.store import Ledger, NewEntry

SOURCE = "gradledger"


def record_suggestions(
    ledger: Ledger,
    rows: Iterable[Mapping[str, Any]],
    *,
    checkpoint_seq: int | None = None,
    model_version: str | None = None,
    project: str | None = None,
) -> list[int]:
    """Append one ``suggestion`` entry per row ``{item_id | global_key, value, confidence?, suggestion_id?,
    model_version?}`` in one transaction; returns their seqs. ``suggestion_id`` defaults to a new UUID (used
    as the Labelbox MAL ``uuid``). Values must not contain e-mail addresses (refused, not scrubbed: the
    model side has no pseudonym key)."""
    if checkpoint_seq is not None:
        kind = ledger.entry(checkpoint_seq).kind
        if kind != "checkpoint":
            raise ValueError(f"checkpoint_seq {checkpoint_seq} is a {kind!r} entry, not a checkpoint")
    entries = []
    for i, row in enumerate(rows):
        item_id, gk = row.get("item_id"), row.get("global_key")
        if item_id is None and gk is None:
            raise ValueError(f"row {i}: needs item_id or global_key")
        if "value" not in row:
            raise ValueError(f"row {i}: missing value")
        conf = row.get("confidence")
        if conf is not None and (
            isinstance(conf, bool) or not isinstance(conf, int | float) or not 0 <= conf <= 1
        ):
            raise ValueError(f"row {i}: confidence must be a number in [0, 1]")
        if contains_email(json.dumps(row["value"], ensure_ascii=False)):
            raise ValueError(
                f"row {i}: value contains an e-mail address; suggestions must not carry identities"
            )
        rec = SuggestionRecord(
            source=SOURCE,
            format="gradledger.suggestion",
            suggestion_id=str(row.get("suggestion_id") or uuid.uuid4()),
            item_id=None if item_id is None else str(item_id),
            global_key=gk,
            project=row.get("project", project),
            value=row["value"],
            model_version=row.get("model_version", model_version),
            confidence=None if conf is None else float(conf),
            checkpoint_seq=checkpoint_seq,
        )
        entries.append(NewEntry("suggestion", rec.body(None), None, SUGGESTION_V))
    return ledger.append_many(entries)


def _select(
    ledger: Ledger, checkpoint_seq: int | None, model_version: str | None
) -> Iterable[dict[str, Any]]:
    for e in ledger.entries(kind="suggestion", payloads=False):
        b = e.body
        if checkpoint_seq is not None and b.get("checkpoint_seq") != checkpoint_seq:
            continue
        if model_version is not None and b.get("model_version") != model_version:
            continue
        yield b


def export_labelbox_mal(
    ledger: Ledger,
    out: str | os.PathLike[str],
    *,
    checkpoint_seq: int | None = None,
    model_version: str | None = None,
) -> int:
    """Write MAL NDJSON (one annotation per line: uuid, dataRow, the annotation, confidence). Suggestions
    whose value is not a Labelbox annotation object (with ``name`` or ``schemaId``) are skipped."""
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for b in _select(ledger, checkpoint_seq, model_version):
            value = b.get("value")
            if not isinstance(value, dict) or not ("name" in value or "schemaId" in value):
                continue
            item = b.get("item") or {}
            data_row = {"id": item["id"]} if item.get("id") else {"globalKey": item.get("global_key")}
            line = {"uuid": b["suggestion_id"], "dataRow": data_row, **value}
            if b.get("confidence") is not None:
                line["confidence"] = b["confidence"]
            fh.write(json.dumps(line, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def export_labelstudio_predictions(
    ledger: Ledger,
    out: str | os.PathLike[str],
    *,
    checkpoint_seq: int | None = None,
    model_version: str | None = None,
) -> int:
    """Write a JSON array of Label Studio predictions ``{task, model_version, score, result}`` (the body of
    ``POST /api/predictions``). Suggestions whose value is not a result list are skipped."""
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        fh.write("[")
        for pred in _ls_predictions(ledger, checkpoint_seq, model_version):
            fh.write(("\n" if n == 0 else ",\n") + json.dumps(pred, ensure_ascii=False, sort_keys=True))
            n += 1
        fh.write("\n]\n")
    return n


def _ls_predictions(
    ledger: Ledger, checkpoint_seq: int | None, model_version: str | None
) -> Iterable[dict[str, Any]]:
    for b in _select(ledger, checkpoint_seq, model_version):
        value = b.get("value")
        item = (b.get("item") or {}).get("id")
        if not isinstance(value, list) or item is None:
            continue
        pred: dict[str, Any] = {"task": int(item) if str(item).isdigit() else item, "result": value}
        if b.get("model_version") is not None:
            pred["model_version"] = b["model_version"]
        if b.get("confidence") is not None:
            pred["score"] = b["confidence"]
        yield pred
