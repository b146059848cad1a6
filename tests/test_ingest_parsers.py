"""Parsers → normalised records, on the platforms' verbatim SDK fixtures and on realistic exports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ledger.ingest import generic_format, labelbox_format, labelstudio_format
from ledger.ingest.context import ParseContext
from ledger.ingest.errors import FieldError
from ledger.ingest.reader import ExportReader
from ledger.ingest.record import LabelRecord, SuggestionRecord, review_decision, workflow_status
from tests.ingest_support import EMAIL, FIXTURES, expected_pseudonym, pseud, samples, wrap_v2_label


def _parse(source: str, path: Path, **ctx_kw: Any) -> list[Any]:
    ctx = ParseContext(pseud(), **ctx_kw)
    out: list[Any] = []
    fmt = None
    for line, _, el in ExportReader(path):
        if source == "labelbox":
            fmt = fmt or labelbox_format.detect(el)
            out += labelbox_format.parse(fmt, el, line, ctx)
        elif source == "labelstudio":
            out += labelstudio_format.parse(el, line, ctx)
        else:
            out += generic_format.parse(el, line, ctx)
    return out


def _labels(recs: list[Any]) -> dict[str, LabelRecord]:
    return {r.label_id: r for r in recs if isinstance(r, LabelRecord)}


def _no_email(recs: list[Any]) -> None:
    for r in recs:
        text = json.dumps(r.body({"sha256": "0" * 64, "size": 0, "name": "x"})).encode()
        assert not EMAIL.findall(text), EMAIL.findall(text)


# -- vocabularies ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, want",
    [("IN_REVIEW", "in_review"), ("DONE", "done"), ("TO_LABEL", "to_label"), ("IN_REWORK", "in_rework"),
     ("InReview", "in_review"), ("ToLabel", "to_label"), ("rejected", "in_rework"), ("accepted", "done"),
     ("fixed_and_accepted", "done"), ("submitted", "submitted"), ("SOMETHING_NEW", "other")],
)  # fmt: skip
def test_workflow_status_vocabulary(raw: str, want: str) -> None:
    assert workflow_status(raw) == want


@pytest.mark.parametrize(
    "raw, want", [("Approve", "approve"), ("REJECT", "reject"), ("Fix", "fix"), (1, "approve"), (-1, "reject"),
                  (True, "approve"), (False, "reject"), (0, None), ("Comment", None)]
)  # fmt: skip
def test_review_decision(raw: object, want: str | None) -> None:
    assert review_decision(raw) == want


# -- Labelbox: verbatim SDK samples ----------------------------------------------------------------------------
def test_labelbox_v2_sdk_label(tmp_path: Path) -> None:
    p = wrap_v2_label(samples() / "labelbox_export_v2_label_from_sdk_notebook.json", tmp_path / "v2.ndjson")
    (rec,) = _parse("labelbox", p)
    assert rec.format == "labelbox.export_v2" and rec.label_id == "clx23qla80li41964li0fjxgl"
    assert rec.producer == expected_pseudonym("gunderwood@labelbox.com")
    assert rec.created_at == "2024-06-05T17:27:55.000000Z" and rec.effort_seconds == 0.0
    assert rec.status == "submitted" and rec.reviews == [] and rec.workflow is not None
    assert rec.workflow.status == "done" and rec.workflow.raw == "DONE"
    assert [o["name"] for o in rec.value["objects"]] == ["bounding_box", "bbox_with_radio_subclass"]
    assert len(rec.value["classifications"]) == 4
    _no_email([rec])


def test_labelbox_v1_sdk_row_strips_tokens() -> None:
    (rec,) = _parse("labelbox", samples() / "labelbox_v1_export_image.json")
    assert rec.format == "labelbox.v1" and rec.item_id == "ckr083n0e196n0ydk4uyzapvn"
    assert rec.project == "ckr083gl1dr8j0yag4jo5cnnt"  # from the View Label URL
    assert rec.producer == expected_pseudonym("msokoloff+11@labelbox.com")
    assert rec.scores == []  # Agreement -1 and Benchmark Agreement -1 mean "none"
    assert rec.effort_seconds == 150.908
    text = json.dumps(rec.value)
    assert "token=" not in text and "instanceURI" in text  # the URL stays, its signed query does not
    assert len(rec.value["objects"]) == 10
    _no_email([rec])


def test_labelbox_mal_sdk_samples_are_model_suggestions() -> None:
    img = _parse("labelbox", samples() / "labelbox_mal_import_image.json")
    cls = _parse("labelbox", samples() / "labelbox_mal_import_classification.json")
    assert all(isinstance(s, SuggestionRecord) and s.format == "labelbox.mal" for s in img + cls)
    assert [s.confidence for s in img] == [0.851, 0.834, 0.986, None]
    assert [s.confidence for s in cls] == [0.8, None, None]  # answer-level confidence counts for radio
    assert img[0].suggestion_id == "b862c586-8614-483c-b5e6-82810f70cac0" and "bbox" in img[0].value
    assert "uuid" not in img[0].value and "dataRow" not in img[0].value
    assert "Signature=" not in json.dumps(img[1].value)


# -- Label Studio: verbatim SDK samples ------------------------------------------------------------------------
def test_labelstudio_int_and_expanded_completed_by_agree() -> None:
    basic = _labels(_parse("labelstudio", samples() / "labelstudio_export_basic.json"))
    rev = _labels(_parse("labelstudio", samples() / "labelstudio_export_with_reviews_agreement.json"))
    # user 1 appears as an integer in one export and as {"id": 1, "email": ...} in the other
    assert basic["22"].producer == rev["7"].producer == expected_pseudonym("labelstudio:user:1")
    assert basic["22"].effort_seconds == 8.65 and basic["22"].project == "29"


def test_labelstudio_reviews_agreement_and_prediction_seed() -> None:
    recs = _parse("labelstudio", samples() / "labelstudio_export_with_reviews_agreement.json")
    sugg = [r for r in recs if isinstance(r, SuggestionRecord)]
    assert [(s.suggestion_id, s.model_version, s.confidence) for s in sugg] == [
        ("1", "model 0", 0.7212843313260696),
        ("2", "model 0", 0.36088106914938645),
    ]
    labels = _labels(recs)
    a7, a8 = labels["7"], labels["8"]
    assert [(r.decision, r.reviewer) for r in a7.reviews] == [
        ("reject", expected_pseudonym("labelstudio:user:2"))
    ]
    assert a7.scores[0].body() == {
        "name": "agreement", "value": 100.0, "min": 0.0, "max": 100.0, "method": "labelstudio.agreement"
    }  # fmt: skip
    assert [s.body() for s in a7.seeded_from] == [
        {"suggestion_id": "1", "origin": "prediction-changed", "seq": None}
    ]
    # task 2 keeps one predicted region unchanged and adds a manual one
    assert [s.body() for s in a8.seeded_from] == [{"suggestion_id": "2", "origin": "prediction", "seq": None}]
    assert a7.workflow is not None and (a7.workflow.status, a7.workflow.raw) == ("in_rework", "rejected")
    _no_email(recs)


def test_labelstudio_history_users_share_pseudonyms() -> None:
    (rec,) = _parse("labelstudio", samples() / "labelstudio_export_with_history.json")
    assert rec.workflow is not None
    (ev,) = rec.workflow.history
    assert (ev.action, ev.raw, ev.by) == (
        "submit",
        "submitted",
        rec.producer,
    )  # created_by 14 == completed_by.id 14
    _no_email([rec])


# -- realistic exports written from the documented formats -------------------------------------------------------
def test_labelbox_v2_consensus_rows_keep_every_label() -> None:
    recs = _parse("labelbox", FIXTURES / "labelbox_export_v2.ndjson")
    labels = _labels(recs)
    assert len(labels) == 6  # 2 consensus + 1 skipped + 2 benchmark-project + 1 in a second project
    l1, l2 = labels["cllb0000000000000000000001"], labels["cllb0000000000000000000002"]
    assert l1.item_id == l2.item_id == "cldr0000000000000000000001"
    assert l1.producer != l2.producer
    assert (l1.scores[0].value, l1.scores[0].method) == (0.82, "labelbox.consensus_score")
    assert [(r.decision, r.raw) for r in l1.reviews] == [("approve", "Approve")]
    assert [(r.decision, r.raw) for r in l2.reviews] == [("reject", "Reject")]
    assert l1.reviews[0].reviewer == expected_pseudonym("rev.kim@example.com")
    assert l1.workflow is not None and (l1.workflow.status, l1.workflow.raw) == ("in_review", "IN_REVIEW")
    assert l1.seed_candidates[0] == "9c5d4f8e-4a61-4b7e-9a3c-0d2f1e6b7a01"
    skipped = labels["cllb0000000000000000000003"]
    assert skipped.status == "skipped" and skipped.workflow is not None
    assert [e.action for e in skipped.workflow.history] == ["skip", "reject"]
    assert skipped.workflow.status == "in_rework"
    gold, scored = labels["cllb0000000000000000000004"], labels["cllb0000000000000000000005"]
    assert gold.gold and not scored.gold
    assert [(s.name, s.value) for s in scored.scores] == [("benchmark", 0.91)]
    assert {r.project for r in labels.values()} == {
        "clproj00consensus000000001",
        "clproj00benchmark000000002",
    }
    assert labels["cllb0000000000000000000006"].workflow.status == "to_label"  # type: ignore[union-attr]
    text = json.dumps(l2.value)
    assert "dana.ortiz" not in text and expected_pseudonym("dana.ortiz@example.org") in text
    _no_email(recs)


def test_labelbox_project_option_selects_one_project() -> None:
    recs = _parse("labelbox", FIXTURES / "labelbox_export_v2.ndjson", project="clproj00benchmark000000002")
    projects = {r.label_id: r.project for r in recs}
    # the single-project rows keep their project; the two-project row keeps only the selected one
    assert projects["cllb0000000000000000000004"] == "clproj00benchmark000000002"
    assert "cllb0000000000000000000006" not in projects


def test_labelbox_v1_fixture_scores_and_reviews() -> None:
    labels = _labels(_parse("labelbox", FIXTURES / "labelbox_v1_export.json"))
    a, b, s = (labels[f"ckv1label00000000000000000{i}"] for i in (1, 2, 3))
    assert (
        a.item_id == b.item_id and a.scores[0].method == "labelbox.v1.agreement" and a.scores[0].value == 0.75
    )
    assert [r.decision for r in a.reviews] == ["approve"] and [r.decision for r in b.reviews] == ["reject"]
    assert s.status == "skipped" and s.value == {}


def test_labelstudio_fixture_consensus_drafts_skips_gold() -> None:
    recs = _parse("labelstudio", FIXTURES / "labelstudio_export.json")
    labels = _labels(recs)
    assert set(labels) == {"9001", "9002", "9003", "9004", "draft:44"}
    assert labels["9001"].producer == expected_pseudonym("labelstudio:user:3") == labels["9003"].producer
    assert labels["9002"].producer == expected_pseudonym("labelstudio:user:4")
    assert labels["draft:44"].status == "draft" and labels["draft:44"].producer == expected_pseudonym(
        "carla.diaz@example.com"
    )
    assert labels["9003"].status == "skipped" and labels["9004"].gold
    assert [r.decision for r in labels["9002"].reviews] == ["fix"]
    assert [r.decision for r in labels["9001"].reviews] == ["approve"]
    assert [(s.suggestion_id, s.origin) for s in labels["9001"].seeded_from] == [
        ("501", "prediction-changed")
    ]
    assert [(s.suggestion_id, s.origin) for s in labels["9004"].seeded_from] == [("502", "prediction")]
    assert labels["9002"].seeded_from == []
    assert labels["9001"].scores[0].value == 66.67
    sugg = [r.suggestion_id for r in recs if isinstance(r, SuggestionRecord)]
    assert sugg == ["501", "502", "503"]
    _no_email(recs)


def test_generic_jsonl_and_csv() -> None:
    labels = _labels(_parse("jsonl", FIXTURES / "generic_labels.jsonl"))
    assert labels["lf-1"].producer_kind == "program" and labels["lf-1"].producer == "lf_contains_link@v2"
    assert labels["snorkel-1"].value == {"probabilities": {"spam": 0.8, "ham": 0.2}}
    assert labels["snorkel-2"].rights == "withdrawn"
    h = labels["human-7"]
    assert (h.scores[0].value, h.scores[0].min, h.scores[0].max) == (4.0, 1.0, 5.0)
    assert h.reviews[0].at == "2024-05-02T08:00:00.000000Z"  # +02:00 normalised to UTC
    assert h.workflow is not None and h.workflow.status == "done" and h.gold
    csv_rows: list[Any] = []
    ctx = ParseContext(pseud())
    for line, _, row in generic_format.CsvReader(FIXTURES / "generic_labels.csv"):
        csv_rows += generic_format.parse(row, line, ctx, generic_format.FORMAT_CSV)
    c = _labels(csv_rows)
    assert c["csv-1"].value == "cat" and c["csv-1"].reviews[0].decision == "approve"
    assert c["csv-2"].value == {"boxes": [[1, 2, 3, 4]]} and c["csv-2"].gold
    assert c["csv-3"].value == {"probabilities": {"cat": 0.1, "dog": 0.9}} and c["csv-3"].line == 4
    _no_email(list(labels.values()) + csv_rows)


@pytest.mark.parametrize(
    "row, field",
    [
        ({"label_id": "a", "value": 1}, "item_id"),
        ({"item_id": "i", "label_id": "a", "probabilities": [0.5, 0.6]}, "probabilities"),
        ({"item_id": "i", "label_id": "a", "value": 1, "producer_kind": "robot"}, "producer_kind"),
        ({"item_id": "i", "label_id": "a", "value": 1, "consensus": 7}, "consensus"),
        ({"item_id": "i", "label_id": "a", "value": 1, "gold": "yes"}, "gold"),
        ({"item_id": "i", "label_id": "a", "value": 1, "created_at": "yesterday"}, "created_at"),
        ({"item_id": "i", "label_id": "a", "value": 1, "colour": "red"}, "colour"),
    ],
)
def test_generic_validation_names_the_field(row: dict[str, Any], field: str) -> None:
    with pytest.raises(FieldError) as ei:
        generic_format.parse(row, 1, ParseContext(pseud()))
    assert ei.value.field == field


def test_labelbox_wrong_types_name_the_path() -> None:
    ctx = ParseContext(pseud())
    row = {
        "data_row": {"id": "d"},
        "projects": {"p": {"labels": [{"id": "l", "performance_details": {"consensus_score": "high"}}]}},
    }
    with pytest.raises(FieldError) as ei:
        labelbox_format.parse("labelbox.export_v2", row, 1, ctx)
    assert ei.value.field == "projects.p.labels[0].performance_details.consensus_score"
    with pytest.raises(FieldError, match="missing required field") as ei:
        labelbox_format.parse("labelbox.export_v2", {"data_row": {}, "projects": {}}, 1, ctx)
    assert ei.value.field == "data_row.id"
