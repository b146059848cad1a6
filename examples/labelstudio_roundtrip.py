"""The model-assisted labelling loop with Label Studio, recorded end to end in a gradledger ledger.

    python examples/labelstudio_roundtrip.py --out /tmp/ls-roundtrip [--tasks 300] [--new-tasks 100] [--epochs 8]

1. Round 1: a Label Studio JSON export of digits tasks (``choices`` results; ``completed_by`` as a user id or an
   expanded user object with an e-mail; reviews; task agreement) is ingested (pseudonymised) and trained on.
2. The trained model's suggestions for new, unlabelled tasks are recorded as ``suggestion`` entries tied to the
   model's checkpoint entry and exported as Label Studio predictions (``predictions.json``, the body of
   ``POST /api/predictions``).
3. Round 2: annotators open the pre-labelled tasks, keep right suggestions and correct wrong ones. Their export
   (predictions with Label Studio's own ids, annotations with ``parent_prediction`` and region ``origin``
   ``prediction`` / ``prediction-changed``) is ingested; every label seeded from a suggestion is linked to it
   (``seeded_from``), and the suggestions to the checkpoint that made them.
4. A second run trains on both rounds, so the loop checkpoint → suggestion → human correction → training → next
   checkpoint is in the ledger, and the lineage graph walks it.

Annotators are simulated here (no Label Studio server is needed); the files are in Label Studio's export format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import instrument
from audit import lineage
from ledger import Ledger, ingest
from ledger.ingest.pseudonym import create_key
from ledger.ingest.suggestions import export_labelstudio_predictions, record_suggestions
from ledger.provenance import Manifest

MODEL_VERSION = "digits-mlp-round1"
USERS = {
    3: "ana.silva@studio.example.org",
    4: "ben.okafor@studio.example.org",
    5: "sam.rush@studio.example.org",
}


def choice(value: int, origin: str = "manual", rid: str = "r1") -> dict[str, Any]:
    """One Label Studio ``choices`` region: the digit class."""
    return {
        "id": rid,
        "type": "choices",
        "from_name": "digit",
        "to_name": "image",
        "origin": origin,
        "value": {"choices": [str(value)]},
    }


def user(uid: int, expanded: bool) -> Any:
    """``completed_by`` as Label Studio writes it: an int, or (expanded exports) a user object."""
    if not expanded:
        return uid
    first, last = USERS[uid].split("@")[0].split(".")
    return {"id": uid, "email": USERS[uid], "first_name": first.title(), "last_name": last.title()}


def round1_export(tasks: list[int], targets: np.ndarray, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Round 1: one human annotation per task (sam.rush errs often), some reviewed."""
    out = []
    for k, t in enumerate(tasks):
        uid = int(rng.choice([3, 4, 5], p=[0.4, 0.4, 0.2]))
        truth = int(targets[t])
        wrong = rng.random() < (0.3 if uid == 5 else 0.02)
        val = (truth + int(rng.integers(1, 10))) % 10 if wrong else truth
        ann: dict[str, Any] = {
            "id": 10_000 + t,
            "completed_by": user(uid, expanded=k % 2 == 0),
            "result": [choice(val)],
            "was_cancelled": False,
            "ground_truth": False,
            "lead_time": 3.5,
            "created_at": "2026-10-01T10:00:00.000000Z",
            "updated_at": "2026-10-01T10:00:04.000000Z",
            "last_action": "submitted",
            "parent_prediction": None,
            "reviews": [],
        }
        if k % 5 == 0:
            ann["reviews"].append(
                {"id": 700 + k, "created_by": {"id": 9, "email": "rev.kim@studio.example.org"}, "accepted": not wrong,
                 "created_at": "2026-10-02T08:00:00.000000Z", "fixed_annotation_history": None}
            )  # fmt: skip
        out.append({"id": t, "project": 7, "data": {"image": f"/data/upload/7/digit-{t:04d}.png"},
                    "annotations": [ann], "predictions": []})  # fmt: skip
    return out


def make_model(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(
    led: Ledger, manifest: Manifest, x: np.ndarray, run: str, epochs: int, seed: int
) -> tuple[nn.Module, int]:
    """Train on the manifest's labels (their ingested values) with the tracker attached; return the final checkpoint."""
    ids = sorted(manifest)
    rows = torch.from_numpy(np.stack([x[task_of(e)] for e in ids]))
    ys = torch.tensor([int(manifest[e].value[0]["value"]["choices"][0]) for e in ids])
    model = make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    tracker = instrument.attach(model, opt, ledger=led, run=run, labels=manifest, criterion=crit, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        tracker.epoch(epoch)
        for idx in torch.randperm(len(ids), generator=gen).split(32):
            with tracker.batch([ids[i] for i in idx]):
                crit(model(rows[idx]), ys[idx]).backward()
                opt.step()
                opt.zero_grad()
    return model, tracker.close()


def task_of(example_id: str) -> int:
    return int(example_id.split("-")[1])


def suggest(model: nn.Module, x: np.ndarray, tasks: list[int]) -> list[dict[str, Any]]:
    """Model suggestions as ``record_suggestions`` rows: a Label Studio result list per task, with confidence."""
    with torch.no_grad():
        p = torch.softmax(model(torch.from_numpy(x[tasks])), dim=1)
    conf, pred = p.max(1)
    return [
        {"item_id": str(t), "value": [choice(int(c), origin="prediction", rid="p1") | {"origin": None}],
         "confidence": round(float(s), 4)}
        for t, c, s in zip(tasks, pred.tolist(), conf.tolist(), strict=True)
    ]  # fmt: skip


def round2_export(
    predictions: list[dict[str, Any]], targets: np.ndarray, rng: np.random.Generator
) -> list[dict[str, Any]]:
    """Round 2 as Label Studio exports it after importing ``predictions.json``: each task carries the prediction
    (with Label Studio's own id) and an annotation that started from it — kept when right, corrected when wrong."""
    out = []
    for k, pred in enumerate(predictions):
        t = int(pred["task"])
        pid = 50_000 + k
        suggested = int(pred["result"][0]["value"]["choices"][0])
        truth = int(targets[t])
        kept = suggested == truth
        region = choice(
            suggested if kept else truth, origin="prediction" if kept else "prediction-changed", rid="p1"
        )
        uid = 3 if k % 2 else 4
        out.append({
            "id": t, "project": 7, "data": {"image": f"/data/upload/7/digit-{t:04d}.png"},
            "predictions": [{"id": pid, "model_version": pred.get("model_version"), "score": pred.get("score"),
                             "result": pred["result"], "task": t, "created_at": "2026-10-03T09:00:00.000000Z"}],
            "annotations": [{
                "id": 20_000 + t, "completed_by": user(uid, expanded=True), "result": [region],
                "was_cancelled": False, "ground_truth": False, "lead_time": 1.2 if kept else 4.0,
                "parent_prediction": pid, "created_at": "2026-10-03T10:00:00.000000Z",
                "updated_at": "2026-10-03T10:00:02.000000Z", "last_action": "submitted", "reviews": [],
            }],
        })  # fmt: skip
    rng.shuffle(out)
    return out


def run(out: Path, tasks: int = 300, new_tasks: int = 100, epochs: int = 8, seed: int = 0) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    digits = load_digits()
    x = ((digits.data / 16.0) - 0.3).astype(np.float32)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x)).tolist()
    first, second = sorted(order[:tasks]), sorted(order[tasks : tasks + new_tasks])

    led = Ledger.create(out / "ledger.db")
    key = out / "pseudonym.key"
    create_key(key)

    # 1. round 1: ingest the Label Studio export, train
    (out / "round1.json").write_text(json.dumps(round1_export(first, digits.target, rng)), encoding="utf-8")
    s1 = ingest.labelstudio(out / "round1.json", led, pseudonym_key=key)
    m1 = Manifest.create(led, "round1", {f"task-{t}": str(10_000 + t) for t in first})
    model, cp1 = train(led, m1, x, "round1", epochs, seed)
    print(
        f"round 1: ingested {s1.records} labels from {s1.annotators} annotators; run 'round1' -> checkpoint seq {cp1}"
    )

    # 2. the model's suggestions for new tasks, tied to that checkpoint, exported as Label Studio predictions
    seqs = record_suggestions(led, suggest(model, x, second), checkpoint_seq=cp1, model_version=MODEL_VERSION)
    n_pred = export_labelstudio_predictions(led, out / "predictions.json", checkpoint_seq=cp1)
    print(
        f"suggestions: {len(seqs)} recorded (seq {seqs[0]}..{seqs[-1]}), {n_pred} written to {out / 'predictions.json'}"
    )

    # 3. round 2: annotators keep or correct the pre-labels; ingest their export (links the seeds)
    preds = json.loads((out / "predictions.json").read_text(encoding="utf-8"))
    (out / "round2.json").write_text(json.dumps(round2_export(preds, digits.target, rng)), encoding="utf-8")
    s2 = ingest.labelstudio(
        out / "round2.json", led, pseudonym_key=key, checkpoint_seq=cp1, model_version=MODEL_VERSION
    )
    corrected = [e for e in led.entries(kind="annotation", payloads=False)
                 if any(sd.get("origin") == "prediction-changed" for sd in e.body.get("seeded_from") or [])]  # fmt: skip
    print(
        f"round 2: {s2.records} labels, {s2.seeded} seeded from a suggestion, {len(corrected)} of them corrected"
    )
    if corrected:
        e = corrected[0]
        sd = e.body["seeded_from"][0]
        sugg = led.entry(sd["seq"]).body
        print(f"   label {e.body['label_id']} (seq {e.seq}) <- seeded_from Label Studio prediction "
              f"{sd['suggestion_id']} (seq {sd['seq']}, origin {sd['origin']}) <- checkpoint seq {sugg['checkpoint_seq']}")  # fmt: skip

    # 4. train on both rounds: the corrections shape the next checkpoint
    m2 = Manifest.create(
        led,
        "round2",
        {**{f"task-{t}": str(10_000 + t) for t in first}, **{f"task-{t}": str(20_000 + t) for t in second}},
    )
    _, cp2 = train(led, m2, x, "round2", epochs, seed)
    g = lineage.graph(led)
    path = None
    if (
        corrected
    ):  # checkpoint 1 -> suggestion -> corrected label -> example -> run round2 -> layer -> checkpoint 2
        label_node = lineage.label_node("labelstudio", corrected[0].body["label_id"])
        a, b = f"checkpoint:{cp1}", f"checkpoint:{cp2}"
        if nx.has_path(g, a, label_node) and nx.has_path(g, label_node, b):
            path = nx.shortest_path(g, a, label_node) + nx.shortest_path(g, label_node, b)[1:]
            print("lineage: " + " -> ".join(path))
    lineage.write(g, out / "lineage.graphml", "graphml")
    res = led.verify()
    print(
        f"run 'round2' -> checkpoint seq {cp2}; ledger {'intact' if res.ok else 'FAILED'} ({res.size} entries)"
    )
    led.close()
    return {"round1": s1.to_json(), "round2": s2.to_json(), "suggestions": seqs, "checkpoints": [cp1, cp2],
            "corrected": [e.seq for e in corrected], "lineage_path": path, "verify_ok": res.ok}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="empty directory for the ledger and the exports")
    ap.add_argument("--tasks", type=int, default=300)
    ap.add_argument("--new-tasks", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if (a.out / "ledger.db").exists():
        print(f"error: {a.out / 'ledger.db'} already exists; choose an empty --out", file=sys.stderr)
        return 2
    summary = run(a.out, a.tasks, a.new_tasks, a.epochs, a.seed)
    return 0 if summary["verify_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
