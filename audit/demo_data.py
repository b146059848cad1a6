"""A realistic Labelbox Export v2 NDJSON for scikit-learn's bundled ``load_digits``, with simulated annotators.

The demo needs annotation provenance with known ground truth, so it simulates a labelling project on the
digits images and writes it the way Labelbox exports it (one data row per line, labels under
``projects.<id>.labels[]``, ``label_details``, ``performance_details``, ``project_details``):

* a few careful annotators (about 2% of their labels wrong) and one careless one (about 40% wrong);
* single-labelled rows, some of them reviewed: the reviewer rejects most wrong labels it sees (and very
  occasionally a right one), approves the rest;
* consensus rows labelled by three annotators; each label's ``consensus_score`` is the fraction of the other
  labels of the row that agree with it (Labelbox's per-label agreement, on its own [0, 1] scale);
* benchmark (gold) rows labelled by a QA lead: ``benchmark_reference_label`` is the label's own id;
* a few rows the careless annotator skipped, then labelled by someone else;
* identities are e-mail addresses (label creators, reviewers, workflow history, dataset uploader, and now and
  then inside a free-text note), as in real exports: ingest must pseudonymise all of them.

Every label becomes one training example (a consensus row gives three), so the routing policy can act on each
label's own agreement: ``Simulation.examples`` maps example id -> (label id, assigned class, image index).
The ground truth (which labels are wrong, who made them) is kept beside the export for the demo to score
itself against; nothing of it goes into the ledger.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

PROJECT_ID = "clprojdigits0000000000001"
DOMAIN = "annotate.example.com"
CAREFUL = ("ana.silva", "ben.okafor", "chen.wei", "dara.lee")
CARELESS = "sam.rush"
REVIEWER = "rev.kim"
QA_LEAD = "qa.lead"
UPLOADER = "data-ops"


def email(name: str) -> str:
    return f"{name}@{DOMAIN}"


@dataclass(frozen=True)
class SimulationConfig:
    seed: int = 0
    limit: int | None = None  # number of digits images used (None: all 1,797)
    test_fraction: float = 0.2  # held out, never exported: the demo's test set (scikit-learn's own labels)
    consensus_fraction: float = 0.2
    gold_fraction: float = 0.04
    skip_fraction: float = 0.01
    review_fraction: float = 0.35
    careless_share: float = 0.25  # of single-labelled rows
    careless_error: float = 0.4
    careful_error: float = 0.02
    reviewer_catch: float = 0.9  # P(reject | wrong label reviewed)
    reviewer_false_reject: float = 0.02  # P(reject | right label reviewed)


@dataclass(frozen=True)
class SimLabel:
    label_id: str
    image: int  # index into the digits arrays
    annotator: str  # e-mail
    value: int  # the class the annotator chose
    wrong: bool
    row_kind: str  # single | consensus | gold | skipped-then-labelled
    consensus: float | None = None
    review: str | None = None  # Approve | Reject
    skipped: bool = False


@dataclass
class Simulation:
    """The simulated project: images, labels with ground truth, and the training examples."""

    config: SimulationConfig
    images: np.ndarray  # [N, 8, 8] float32 in [0, 1]
    targets: np.ndarray  # [N] scikit-learn's labels (the truth)
    train_images: list[int]
    test_images: list[int]
    labels: list[SimLabel] = field(default_factory=list)

    @property
    def examples(self) -> dict[str, SimLabel]:
        """Training example id -> the (non-skipped) label it trains on; one example per label."""
        return {example_id(lab): lab for lab in self.labels if not lab.skipped}

    def global_key(self, image: int) -> str:
        return f"digits/{image:04d}.png"

    def content_sha256(self, image: int) -> str:
        return hashlib.sha256(np.ascontiguousarray(self.images[image], dtype="<f4").tobytes()).hexdigest()

    def wrong_examples(self, annotator: str | None = None) -> set[str]:
        return {ex for ex, lab in self.examples.items() if lab.wrong and annotator in (None, lab.annotator)}


def example_id(label: SimLabel) -> str:
    return f"digit-{label.image:04d}/{label.label_id[-6:]}"


def _label_id(n: int) -> str:
    return f"cllbdigits{n:016d}"


def simulate(config: SimulationConfig = SimulationConfig()) -> Simulation:
    """Simulate the labelling project (deterministic for a given config)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)
    targets = digits.target.astype(np.int64)
    rng = np.random.default_rng(config.seed)
    order = rng.permutation(len(targets))
    if config.limit is not None:
        order = order[: config.limit]
    n_test = int(round(config.test_fraction * len(order)))
    test, train = sorted(order[:n_test].tolist()), sorted(order[n_test:].tolist())
    sim = Simulation(config, images, targets, train, test)
    people = [*CAREFUL, CARELESS]
    counter = iter(range(1, 10**9))

    def answer(who: str, truth: int) -> tuple[int, bool]:
        err = config.careless_error if who == CARELESS else config.careful_error
        if rng.random() < err:
            return int((truth + rng.integers(1, 10)) % 10), True
        return truth, False

    for img in train:
        truth = int(targets[img])
        u = rng.random()
        if u < config.gold_fraction:
            sim.labels.append(SimLabel(_label_id(next(counter)), img, email(QA_LEAD), truth, False, "gold"))
        elif u < config.gold_fraction + config.consensus_fraction:
            who3 = rng.choice(len(people), size=3, replace=False)
            vals = [(people[i], *answer(people[i], truth)) for i in who3]
            for k, (who, v, wrong) in enumerate(vals):
                agree = sum(1 for j, (_, v2, _) in enumerate(vals) if j != k and v2 == v)
                sim.labels.append(
                    SimLabel(
                        _label_id(next(counter)), img, email(who), v, wrong, "consensus", consensus=agree / 2
                    )
                )
        else:
            skipped = u < config.gold_fraction + config.consensus_fraction + config.skip_fraction
            if skipped:
                sim.labels.append(
                    SimLabel(
                        _label_id(next(counter)), img, email(CARELESS), -1, False, "skipped", skipped=True
                    )
                )
                who = CAREFUL[int(rng.integers(len(CAREFUL)))]
            elif rng.random() < config.careless_share:
                who = CARELESS
            else:
                who = CAREFUL[int(rng.integers(len(CAREFUL)))]
            v, wrong = answer(who, truth)
            review = None
            if rng.random() < config.review_fraction:
                p_reject = config.reviewer_catch if wrong else config.reviewer_false_reject
                review = "Reject" if rng.random() < p_reject else "Approve"
            sim.labels.append(
                SimLabel(_label_id(next(counter)), img, email(who), v, wrong, "single", review=review)
            )
    return sim


# ----- the export ----------------------------------------------------------------------------------------------
_T0 = datetime(2026, 10, 1, 9, 0, tzinfo=UTC)


def _ts(minutes: float) -> str:
    return (_T0 + timedelta(minutes=minutes)).isoformat(timespec="milliseconds")


def _annotations(lab: SimLabel, n: int) -> dict[str, object]:
    if lab.skipped:
        return {"objects": [], "classifications": [], "relationships": []}
    cls = [
        {
            "feature_id": f"clfeatdigit{n:015d}",
            "feature_schema_id": "clschemadigit000000000001",
            "name": "digit",
            "value": "digit",
            "radio_answer": {
                "feature_id": f"clfeatdigit{n:015d}a",
                "feature_schema_id": f"clschemadigitans00000000{lab.value}",
                "name": str(lab.value),
                "value": f"digit_{lab.value}",
                "classifications": [],
            },
        }
    ]
    if lab.wrong and lab.annotator == email(CARELESS) and n % 7 == 0:
        # free text written by a human: e-mails in it must be pseudonymised too
        cls.append(
            {
                "feature_id": f"clfeatnote{n:016d}",
                "feature_schema_id": "clschemanote0000000000001",
                "name": "notes",
                "value": "notes",
                "text_answer": {"content": f"blurry, ask {email(REVIEWER)} to check"},
            }
        )
    return {"objects": [], "classifications": cls, "relationships": []}


def _label_json(lab: SimLabel, n: int, gold: bool) -> dict[str, object]:
    t = 10.0 * n
    reviews = []
    if lab.review is not None:
        reviews.append(
            {"reviewed_at": _ts(t + 600), "reviewed_by": email(REVIEWER), "review_action": lab.review}
        )
    return {
        "id": lab.label_id,
        "label_kind": "Default",
        "version": "1.0.0",
        "label_details": {
            "created_at": _ts(t),
            "updated_at": _ts(t),
            "created_by": lab.annotator,
            "content_last_updated_at": _ts(t),
            "reviews": reviews,
        },
        "performance_details": {
            "seconds_to_create": round(2.0 + (n % 13) * 0.7, 1) if lab.annotator != email(CARELESS) else 1.1,
            "seconds_to_review": 2.0 if reviews else 0.0,
            "skipped": lab.skipped,
            "consensus_score": lab.consensus,
            "benchmark_score": None,
            "benchmark_reference_label": lab.label_id if gold else None,
        },
        "annotations": _annotations(lab, n),
    }


def _workflow(labs: list[SimLabel], t: float) -> dict[str, object]:
    history: list[dict[str, object]] = []
    for lab in labs:
        history.append(
            {
                "action": "Skip" if lab.skipped else "Submit",
                "created_at": _ts(t),
                "created_by": lab.annotator,
                "previous_task_name": "Initial labeling task",
                "next_task_name": "Review",
            }
        )
    reviewed = [lab.review for lab in labs if lab.review]
    status = "TO_LABEL" if all(lab.skipped for lab in labs) else "IN_REVIEW"
    if reviewed:
        action = reviewed[-1]
        history.append(
            {
                "action": action,
                "created_at": _ts(t + 600),
                "created_by": email(REVIEWER),
                "previous_task_name": "Review",
                "next_task_name": "Done" if action == "Approve" else "Rework",
            }
        )
        status = "DONE" if action == "Approve" else "IN_REWORK"
    elif labs and labs[0].row_kind in ("gold", "consensus"):
        status = "DONE"
    return {
        "ontology_id": "clontdigits0000000000001",
        "task_id": "cltaskdigits000000000001",
        "task_name": "Review",
        "batch_id": "clbatchdigits00000000001",
        "batch_name": "digits-batch-1",
        "workflow_status": status,
        "priority": 5,
        "consensus_expected_label_count": 3 if labs and labs[0].row_kind == "consensus" else 1,
        "workflow_history": history,
    }


def write_labelbox_export(sim: Simulation, path: Path) -> Path:
    """Write the simulated project as a Labelbox Export v2 NDJSON file (one data row per line)."""
    by_image: dict[int, list[SimLabel]] = {}
    for lab in sim.labels:
        by_image.setdefault(lab.image, []).append(lab)
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for row_no, (img, labs) in enumerate(sorted(by_image.items())):
            labels_json = []
            for lab in labs:
                n += 1
                labels_json.append(_label_json(lab, n, gold=lab.row_kind == "gold"))
            key = sim.global_key(img)
            row = {
                "data_row": {
                    "id": f"cldrdigits{img:016d}",
                    "global_key": key,
                    "external_id": key.rsplit("/", 1)[-1],
                    "row_data": f"https://storage.example.com/{key}?X-Goog-Signature=5f2a{img:04d}",
                    "details": {
                        "dataset_id": "cldsdigits00000000000001",
                        "dataset_name": "sklearn-digits",
                        "created_by": email(UPLOADER),
                    },
                },
                "media_attributes": {"height": 8, "width": 8, "mime_type": "image/png"},
                "attachments": [],
                "metadata_fields": [],
                "projects": {
                    PROJECT_ID: {
                        "name": "Digits classification",
                        "labels": labels_json,
                        "project_details": _workflow(labs, 10.0 * (n + row_no)),
                    }
                },
            }
            fh.write(json.dumps(row, separators=(",", ":")) + "\n")
    return path


def identities() -> list[str]:
    """Every e-mail address the export contains (for privacy checks)."""
    return [email(p) for p in (*CAREFUL, CARELESS, REVIEWER, QA_LEAD, UPLOADER)]
