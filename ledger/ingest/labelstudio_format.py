"""Label Studio JSON export → normalised records (``labelstudio.json``).

The export is a JSON array of tasks. Each task yields one record per ``annotations[]`` entry (status
``submitted``, or ``skipped`` when ``was_cancelled``), one ``draft`` record per ``drafts[]`` entry, and one
suggestion per ``predictions[]`` entry (plus the annotation's embedded ``prediction`` when the task list
lacks it).

Users are keyed by their Label Studio user id (``labelstudio:user:<id>`` under the HMAC key), so an
integer ``completed_by`` (Community export) and an expanded ``{id, email, first_name, ...}`` object
(Enterprise export) give the same pseudonym, and so do the integer ``created_by`` ids in ``history[]``.
Only a user given by e-mail alone is keyed by the e-mail. Names and e-mails are never copied.

Task ``agreement`` (0-100) is kept on its own scale, method ``labelstudio.agreement``. A label seeded from a
prediction (``parent_prediction``, or regions whose ``origin`` is ``prediction`` / ``prediction-changed``)
gets ``seeded_from`` with the prediction id; the driver fills in the suggestion entry's seq.
"""

from __future__ import annotations

from typing import Any

from ledger.ingest.context import ParseContext
from ledger.ingest.errors import FieldError
from ledger.ingest.fields import boolean, clean_value, get, ident, number, obj
from ledger.ingest.record import (
    LabelRecord,
    Review,
    Score,
    Seed,
    SuggestionRecord,
    Workflow,
    WorkflowEvent,
    timestamp,
    workflow_action,
    workflow_status,
)

SOURCE = "labelstudio"
FORMAT = "labelstudio.json"


def user_identity(v: object, path: str) -> str | None:
    """The identity string to pseudonymise for a Label Studio user reference (int id, object, or e-mail)."""
    if v is None:
        return None
    if isinstance(v, bool):
        raise FieldError(path, "expected user id or object, got boolean")
    if isinstance(v, int):
        return f"labelstudio:user:{v}"
    if isinstance(v, dict):
        uid = v.get("id")
        if isinstance(uid, int) and not isinstance(uid, bool):
            return f"labelstudio:user:{uid}"
        email = v.get("email")
        if isinstance(email, str) and email:
            return email
        raise FieldError(path, "user object has neither an integer 'id' nor an 'email'")
    if isinstance(v, str):
        return f"labelstudio:user:{v}" if v.isdigit() else v
    raise FieldError(path, f"expected user id or object, got {type(v).__name__}")


def _seed(ann: dict[str, Any], result: list[Any], path: str) -> list[Seed]:
    origins = {r.get("origin") for r in result if isinstance(r, dict)}
    parent = ident(ann.get("parent_prediction"), f"{path}.parent_prediction")
    if "prediction-changed" in origins:
        origin = "prediction-changed"
    elif "prediction" in origins:
        origin = "prediction"
    elif parent is not None:
        origin = "prediction-replaced"  # started from the prediction, every region redrawn by hand
    else:
        return []
    return [Seed(parent, origin)]


def _suggestion(
    pred: dict[str, Any], path: str, task_id: str, project: str | None, line: int, ctx: ParseContext
) -> SuggestionRecord:
    pid = ident(pred.get("id"), f"{path}.id", required=True)
    assert pid is not None
    result = get(pred, "result", (list,), f"{path}.result", required=True)
    mv = get(pred, "model_version", (str,), f"{path}.model_version")
    return SuggestionRecord(
        source=SOURCE,
        format=FORMAT,
        suggestion_id=pid,
        item_id=task_id,
        project=project,
        value=clean_value(result, ctx.pseud),
        model_version=mv if mv is not None else ctx.model_version,
        confidence=number(pred.get("score"), f"{path}.score"),
        checkpoint_seq=ctx.checkpoint_seq,
        created_at=timestamp(pred.get("created_at"), f"{path}.created_at"),
        line=line,
    )


def parse(task: Any, line: int, ctx: ParseContext) -> list[Any]:
    task = obj(task, "<task>")
    task_id = ident(task.get("id"), "id", required=True)
    assert task_id is not None
    task_project = ident(task.get("project"), "project")
    agreement = number(task.get("agreement"), "agreement", 0.0, 100.0)
    scores = (
        [Score("agreement", agreement, 0.0, 100.0, "labelstudio.agreement")] if agreement is not None else []
    )
    out: list[Any] = []
    predicted: set[str] = set()
    for i, pred in enumerate(get(task, "predictions", (list,), "predictions") or []):
        s = _suggestion(
            obj(pred, f"predictions[{i}]"),
            f"predictions[{i}]",
            task_id,
            task_project or ctx.project,
            line,
            ctx,
        )
        predicted.add(s.suggestion_id)
        out.append(s)
    for i, ann in enumerate(get(task, "annotations", (list,), "annotations") or []):
        path = f"annotations[{i}]"
        ann = obj(ann, path)
        label_id = ident(ann.get("id"), f"{path}.id", required=True)
        assert label_id is not None
        result = get(ann, "result", (list,), f"{path}.result", required=True)
        project = ident(ann.get("project"), f"{path}.project") or task_project or ctx.project
        embedded = ann.get("prediction")
        if isinstance(embedded, dict) and embedded.get("id") is not None:
            emb_id = ident(embedded.get("id"), f"{path}.prediction.id")
            if emb_id not in predicted and "result" in embedded:
                s = _suggestion(embedded, f"{path}.prediction", task_id, project, line, ctx)
                predicted.add(s.suggestion_id)
                out.append(s)
        reviews = []
        for j, rv in enumerate(get(ann, "reviews", (list,), f"{path}.reviews") or []):
            rpath = f"{path}.reviews[{j}]"
            rv = obj(rv, rpath)
            accepted = boolean(rv.get("accepted"), f"{rpath}.accepted")
            fixed = rv.get("fixed_annotation_history") is not None
            decision = ("fix" if fixed else "approve") if accepted else "reject"
            reviews.append(
                Review(
                    decision,
                    ctx.person(user_identity(rv.get("created_by"), f"{rpath}.created_by")),
                    timestamp(rv.get("created_at"), f"{rpath}.created_at"),
                    {"accepted": accepted, "fixed": fixed},
                )
            )
        history = []
        for k, ev in enumerate(get(ann, "history", (list,), f"{path}.history") or []):
            hpath = f"{path}.history[{k}]"
            ev = obj(ev, hpath)
            action = get(ev, "action", (str,), f"{hpath}.action")
            history.append(
                WorkflowEvent(
                    action=workflow_action(action) if action else "other",
                    raw=action,
                    at=timestamp(ev.get("created_at"), f"{hpath}.created_at"),
                    by=ctx.person(user_identity(ev.get("created_by"), f"{hpath}.created_by")),
                )
            )
        last = get(ann, "last_action", (str,), f"{path}.last_action")
        workflow = (
            Workflow(workflow_status(last) if last else None, last, tuple(history))
            if (last or history)
            else None
        )
        out.append(
            LabelRecord(
                source=SOURCE,
                format=FORMAT,
                label_id=label_id,
                item_id=task_id,
                value=clean_value(result, ctx.pseud),
                producer_kind="human",
                producer=ctx.annotator(user_identity(ann.get("completed_by"), f"{path}.completed_by")),
                project=project,
                created_at=timestamp(ann.get("created_at"), f"{path}.created_at"),
                updated_at=timestamp(ann.get("updated_at"), f"{path}.updated_at"),
                effort_seconds=number(ann.get("lead_time"), f"{path}.lead_time", 0.0),
                status="skipped"
                if boolean(ann.get("was_cancelled"), f"{path}.was_cancelled")
                else "submitted",
                gold=boolean(ann.get("ground_truth"), f"{path}.ground_truth"),
                scores=list(scores),
                reviews=reviews,
                workflow=workflow,
                seeded_from=_seed(ann, result, path),
                line=line,
            )
        )
    for i, draft in enumerate(get(task, "drafts", (list,), "drafts") or []):
        path = f"drafts[{i}]"
        draft = obj(draft, path)
        did = ident(draft.get("id"), f"{path}.id", required=True)
        result = get(draft, "result", (list,), f"{path}.result", required=True)
        out.append(
            LabelRecord(
                source=SOURCE,
                format=FORMAT,
                label_id=f"draft:{did}",
                item_id=task_id,
                value=clean_value(result, ctx.pseud),
                producer_kind="human",
                producer=ctx.annotator(user_identity(draft.get("user"), f"{path}.user")),
                project=task_project or ctx.project,
                created_at=timestamp(draft.get("created_at"), f"{path}.created_at"),
                updated_at=timestamp(draft.get("updated_at"), f"{path}.updated_at"),
                effort_seconds=number(draft.get("lead_time"), f"{path}.lead_time", 0.0),
                status="draft",
                scores=list(scores),
                seeded_from=_seed(draft, result, path),
                line=line,
            )
        )
    return out
