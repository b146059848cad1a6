"""Labelbox exports → normalised records.

Three shapes, told apart by the first element (every later element must have the same shape):

* Export v2 / streamable export (``labelbox.export_v2``): NDJSON, one data row per line, labels under
  ``projects.<project id>.labels[]``. A consensus row carries several labels: each becomes its own record.
* Legacy v1 JSON array (``labelbox.v1``): one label per element (``ID``, ``DataRow ID``, ``Label``...).
* Model-assisted-labelling import (``labelbox.mal``): NDJSON, one model annotation per line with a
  ``uuid``; these become ``suggestion`` records. When a human label later contains an annotation whose
  ``feature_id`` equals a MAL ``uuid`` (Labelbox keeps the import uuid as the feature id), the label is
  linked to that suggestion (``seeded_from``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

from ledger.ingest.context import ParseContext
from ledger.ingest.errors import FieldError
from ledger.ingest.fields import boolean, clean_text, clean_value, clean_value_json, get, ident, number, obj
from ledger.ingest.record import (
    LabelRecord,
    Review,
    Score,
    SuggestionRecord,
    Workflow,
    WorkflowEvent,
    review_decision,
    timestamp,
    workflow_action,
    workflow_status,
)

SOURCE = "labelbox"
FORMATS = ("labelbox.export_v2", "labelbox.v1", "labelbox.mal")
# Keys of a MAL line that describe the import, not the suggested annotation itself.
_MAL_META = {"uuid", "dataRow", "confidence", "customMetrics"}


def detect(element: Any) -> str:
    """The Labelbox format of an export element."""
    if isinstance(element, dict):
        if "data_row" in element:
            return "labelbox.export_v2"
        if "DataRow ID" in element:
            return "labelbox.v1"
        if "uuid" in element and "dataRow" in element:
            return "labelbox.mal"
    raise FieldError(
        None,
        "not a Labelbox export element (expected Export v2 'data_row', v1 'DataRow ID', or MAL 'uuid' + 'dataRow')",
    )


def parse(fmt: str, element: Any, line: int, ctx: ParseContext) -> list[Any]:
    if fmt == "labelbox.export_v2":
        return parse_export_v2(element, line, ctx)
    if fmt == "labelbox.v1":
        return parse_v1(element, line, ctx)
    return parse_mal(element, line, ctx)


def feature_ids(annotations: Any) -> list[str]:
    """Feature ids of the top-level objects and classifications of a label (for MAL seed links)."""
    out: list[str] = []
    if isinstance(annotations, dict):
        for group in ("objects", "classifications"):
            items = annotations.get(group)
            if isinstance(items, list):
                for a in items:
                    if isinstance(a, dict):
                        fid = a.get("feature_id", a.get("featureId"))
                        if isinstance(fid, str):
                            out.append(fid)
    return out


# -- Export v2 ----------------------------------------------------------------------------------------------
def parse_export_v2(row: Any, line: int, ctx: ParseContext) -> list[Any]:
    row = obj(row, "<row>")
    if "data_row" not in row:
        raise FieldError("data_row", "missing required field (every line of one export must be a data row)")
    dr = obj(row["data_row"], "data_row")
    item_id = ident(dr.get("id"), "data_row.id", required=True)
    assert item_id is not None
    global_key = get(dr, "global_key", (str,), "data_row.global_key")
    external_id = clean_text(get(dr, "external_id", (str,), "data_row.external_id"), ctx.pseud)
    projects = obj(get(row, "projects", (dict,), "projects", required=True), "projects")
    records: list[Any] = []
    for pid, pdata in projects.items():
        if ctx.project is not None and len(projects) > 1 and pid != ctx.project:
            continue
        ppath = f"projects.{pid}"
        pdata = obj(pdata, ppath)
        workflow = _v2_workflow(
            get(pdata, "project_details", (dict,), f"{ppath}.project_details"), ppath, ctx
        )
        labels = get(pdata, "labels", (list,), f"{ppath}.labels") or []
        for i, label in enumerate(labels):
            lpath = f"{ppath}.labels[{i}]"
            rec = _v2_label(obj(label, lpath), lpath, pid, workflow, ctx)
            rec.item_id, rec.global_key, rec.external_id, rec.line = item_id, global_key, external_id, line
            records.append(rec)
    return records


def _v2_label(
    label: dict[str, Any], path: str, project: str, workflow: Workflow | None, ctx: ParseContext
) -> LabelRecord:
    label_id = ident(label.get("id"), f"{path}.id", required=True)
    assert label_id is not None
    annotations = get(label, "annotations", (dict,), f"{path}.annotations")
    details = get(label, "label_details", (dict,), f"{path}.label_details") or {}
    perf = get(label, "performance_details", (dict,), f"{path}.performance_details") or {}
    dpath, ppath = f"{path}.label_details", f"{path}.performance_details"
    creator = get(details, "created_by", (str,), f"{dpath}.created_by")
    skipped = boolean(perf.get("skipped"), f"{ppath}.skipped")
    scores = []
    consensus = number(perf.get("consensus_score"), f"{ppath}.consensus_score", 0.0, 1.0)
    if consensus is not None:
        scores.append(Score("consensus", consensus, 0.0, 1.0, "labelbox.consensus_score"))
    bench = number(perf.get("benchmark_score"), f"{ppath}.benchmark_score", 0.0, 1.0)
    if bench is not None:
        scores.append(Score("benchmark", bench, 0.0, 1.0, "labelbox.benchmark_score"))
    bench_ref = ident(perf.get("benchmark_reference_label"), f"{ppath}.benchmark_reference_label")
    gold = bench_ref == label_id or boolean(
        details.get("is_benchmark_reference"), f"{dpath}.is_benchmark_reference"
    )
    reviews = []
    for j, rv in enumerate(get(details, "reviews", (list,), f"{dpath}.reviews") or []):
        rpath = f"{dpath}.reviews[{j}]"
        rv = obj(rv, rpath)
        raw = rv.get("review_action", rv.get("action", rv.get("score")))
        if raw is not None and not isinstance(raw, str | int | float):
            raise FieldError(f"{rpath}.review_action", "expected string or number")
        who = rv.get("reviewed_by", rv.get("created_by", rv.get("reviewer")))
        if who is not None and not isinstance(who, str):
            raise FieldError(f"{rpath}.reviewed_by", "expected string")
        at = rv.get("reviewed_at", rv.get("created_at"))
        reviews.append(
            Review(review_decision(raw), ctx.person(who), timestamp(at, f"{rpath}.reviewed_at"), raw)
        )
    effort = number(
        perf.get("seconds_to_create", perf.get("seconds_to_label")), f"{ppath}.seconds_to_create", 0.0
    )
    value, value_json = clean_value_json(annotations if annotations is not None else {}, ctx.pseud)
    rec = LabelRecord(
        source=SOURCE,
        format="labelbox.export_v2",
        label_id=label_id,
        item_id="",
        value=value,
        producer_kind="human",
        producer=ctx.annotator(creator),
        project=project,
        created_at=timestamp(details.get("created_at"), f"{dpath}.created_at"),
        updated_at=timestamp(details.get("updated_at"), f"{dpath}.updated_at"),
        effort_seconds=effort,
        status="skipped" if skipped else "submitted",
        gold=gold,
        scores=scores,
        reviews=reviews,
        workflow=workflow,
        value_json=value_json,
    )
    rec.seed_candidates = feature_ids(annotations)
    return rec


def _v2_workflow(details: dict[str, Any] | None, ppath: str, ctx: ParseContext) -> Workflow | None:
    if not details:
        return None
    dpath = f"{ppath}.project_details"
    raw = get(details, "workflow_status", (str,), f"{dpath}.workflow_status")
    history = []
    for k, ev in enumerate(get(details, "workflow_history", (list,), f"{dpath}.workflow_history") or []):
        hpath = f"{dpath}.workflow_history[{k}]"
        ev = obj(ev, hpath)
        action = get(ev, "action", (str,), f"{hpath}.action")
        who = get(ev, "created_by", (str,), f"{hpath}.created_by")
        history.append(
            WorkflowEvent(
                action=workflow_action(action) if action else "other",
                raw=action,
                at=timestamp(ev.get("created_at"), f"{hpath}.created_at"),
                by=ctx.person(who),
                from_step=clean_text(
                    get(ev, "previous_task_name", (str,), f"{hpath}.previous_task_name"), ctx.pseud
                ),
                to_step=clean_text(get(ev, "next_task_name", (str,), f"{hpath}.next_task_name"), ctx.pseud),
            )
        )
    if raw is None and not history:
        return None
    return Workflow(workflow_status(raw) if raw else None, raw, tuple(history))


# -- legacy v1 ----------------------------------------------------------------------------------------------
def _v1_score(row: dict[str, Any], key: str, name: str) -> Score | None:
    v = number(row.get(key), key, -1.0, 1.0)
    if v is None or v == -1.0:  # -1 means "not computed" in v1 exports
        return None
    if v < 0:
        raise FieldError(key, f"{v} outside [0, 1] (or -1 for none)")
    return Score(name, v, 0.0, 1.0, f"labelbox.v1.{key.lower().replace(' ', '_')}")


def _v1_project(row: dict[str, Any], ctx: ParseContext) -> str | None:
    if ctx.project is not None:
        return ctx.project
    url = row.get("View Label")
    if isinstance(url, str):
        pid = parse_qs(urlparse(url).query).get("project")
        if pid:
            return pid[0]
    return None


def parse_v1(row: Any, line: int, ctx: ParseContext) -> list[Any]:
    row = obj(row, "<row>")
    label_id = ident(row.get("ID"), "ID", required=True)
    item_id = ident(row.get("DataRow ID"), "DataRow ID", required=True)
    assert label_id is not None and item_id is not None
    value = get(row, "Label", (dict,), "Label")
    skipped = boolean(row.get("Skipped"), "Skipped")
    scores = [
        s
        for s in (
            _v1_score(row, "Agreement", "consensus"),
            _v1_score(row, "Benchmark Agreement", "benchmark"),
        )
        if s
    ]
    reviews = []
    for j, rv in enumerate(get(row, "Reviews", (list,), "Reviews") or []):
        rpath = f"Reviews[{j}]"
        rv = obj(rv, rpath)
        score = number(rv.get("score"), f"{rpath}.score", -1.0, 1.0)
        who = get(rv, "createdBy", (str,), f"{rpath}.createdBy")
        reviews.append(
            Review(
                review_decision(score),
                ctx.person(who),
                timestamp(rv.get("createdAt"), f"{rpath}.createdAt"),
                score,
            )
        )
    bench_id = ident(row.get("Benchmark ID"), "Benchmark ID")
    rec = LabelRecord(
        source=SOURCE,
        format="labelbox.v1",
        label_id=label_id,
        item_id=item_id,
        global_key=get(row, "Global Key", (str,), "Global Key"),
        external_id=clean_text(get(row, "External ID", (str,), "External ID"), ctx.pseud),
        value=clean_value(value if value is not None else {}, ctx.pseud),
        producer_kind="human",
        producer=ctx.annotator(get(row, "Created By", (str,), "Created By")),
        project=_v1_project(row, ctx),
        created_at=timestamp(row.get("Created At"), "Created At"),
        updated_at=timestamp(row.get("Updated At"), "Updated At"),
        effort_seconds=number(row.get("Seconds to Label"), "Seconds to Label", 0.0),
        status="skipped" if skipped else "submitted",
        gold=bench_id is not None and bench_id == label_id,
        scores=scores,
        reviews=reviews,
        line=line,
    )
    rec.seed_candidates = feature_ids(value)
    return [rec]


# -- MAL imports ------------------------------------------------------------------------------------------
def parse_mal(ann: Any, line: int, ctx: ParseContext) -> list[Any]:
    ann = obj(ann, "<annotation>")
    uuid = ident(ann.get("uuid"), "uuid", required=True)
    assert uuid is not None
    dr = obj(get(ann, "dataRow", (dict,), "dataRow", required=True), "dataRow")
    item_id = ident(dr.get("id"), "dataRow.id")
    global_key = get(dr, "globalKey", (str,), "dataRow.globalKey")
    if item_id is None and global_key is None:
        raise FieldError("dataRow", "needs 'id' or 'globalKey'")
    if "name" not in ann and "schemaId" not in ann:
        raise FieldError(
            "name", "missing required field (a MAL annotation names its feature by 'name' or 'schemaId')"
        )
    confidence = number(ann.get("confidence"), "confidence", 0.0, 1.0)
    answer = ann.get("answer")
    if confidence is None and isinstance(answer, dict):
        confidence = number(answer.get("confidence"), "answer.confidence", 0.0, 1.0)
    value = {k: v for k, v in ann.items() if k not in _MAL_META}
    return [
        SuggestionRecord(
            source=SOURCE,
            format="labelbox.mal",
            suggestion_id=uuid,
            item_id=item_id,
            global_key=global_key,
            project=ctx.project,
            value=clean_value(value, ctx.pseud),
            model_version=ctx.model_version,
            confidence=confidence,
            checkpoint_seq=ctx.checkpoint_seq,
            line=line,
        )
    ]
