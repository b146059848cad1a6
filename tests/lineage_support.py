"""A small real run for the lineage and export tests: ingested labels, manifest, policy, training, suggestions.

Story on one SQLite ledger: two annotators (e-mail identities, pseudonymised at ingest) label 16 examples, one
example is a consensus item with two labels; a routing policy keeps rejected labels out of every layer and
low-consensus ones mostly out of the head; a tiny MLP trains 3 epochs through ``instrument.attach`` with a
checkpoint per epoch; the last checkpoint's model suggests labels for two new items, which an annotator
corrects (a second export with ``seeded_from``). A signing key pair lives beside the ledger.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import instrument
from ledger import ingest, keys
from ledger.ingest.pseudonym import Pseudonymizer
from ledger.ingest.suggestions import record_suggestions
from ledger.provenance import Manifest
from ledger.store import Ledger

N_EX = 16
EPOCHS = 3
LAYERS = ["0", "2", "4"]
ANA, BEN, CAL = "ana@example.com", "ben@example.com", "cal@example.org"
PSEUDONYM_KEY = bytes(range(32))
POLICY = """\
gradledger_policy: 1
name: depth
groups:
  shallow: ["0", "2"]
  deep: ["4"]
rules:
  - name: excluded
    when: {review: reject}
    weights: {"*": 0.0}
  - name: low-consensus
    when: {consensus: {lt: 0.7}}
    weights: {shallow: 1.0, deep: 0.25}
default: {"*": 1.0}
"""


@dataclass
class Built:
    path: Path
    key: Path  # private key file
    pub: Path
    vkey: Path
    run: str
    checkpoints: list[int]
    suggestions: list[int]
    manifest_seq: int


def _label_rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(N_EX):
        r: dict[str, Any] = {
            "item_id": f"item-{i}",
            "label_id": f"lab-{i}",
            "value": str(i % 3),
            "producer": ANA if i % 2 == 0 else BEN,
            "consensus": [0.9, 0.5, 0.8, 0.6][i % 4],
            "domain": "news" if i < 8 else "forum",
        }
        if i == 3:
            r.update(review="reject", reviewer="rev@example.com")
        rows.append(r)
    rows.append({"item_id": "item-5", "label_id": "lab-5b", "value": "2", "producer": CAL, "consensus": 0.9})
    return rows


def build(tmp: Path, *, dp: bool = False) -> Built:
    torch.set_num_threads(1)
    path = tmp / "run.db"
    files = keys.save_keypair(tmp / "keys", "gradledger-test")
    pseud = Pseudonymizer(PSEUDONYM_KEY)
    with Ledger.open(path, create=True) as led:
        labels = tmp / "labels.jsonl"
        labels.write_text("".join(json.dumps(r) + "\n" for r in _label_rows()))
        ingest.ingest("jsonl", labels, led, pseudonym_key=pseud)
        mapping: dict[str, Any] = {f"ex{i}": f"lab-{i}" for i in range(N_EX)}
        mapping["ex5"] = ["lab-5", "lab-5b"]  # a consensus item: two annotators' labels
        man = Manifest.create(led, "train", mapping)
        policy = instrument.Policy.from_yaml(POLICY, "policy.yaml")
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        crit = nn.CrossEntropyLoss()
        g = torch.Generator().manual_seed(1)
        x = torch.randn(N_EX, 5, generator=g)
        y = torch.randint(0, 3, (N_EX,), generator=g)
        dpc = (
            instrument.DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp", seed=3)
            if dp
            else None
        )
        tr = instrument.attach(
            model, opt, ledger=led, run="mlp", policy=policy, labels=man, criterion=crit, dp=dpc, seed=7,
            max_pending=0,
        )  # fmt: skip
        cps = []
        for epoch in range(EPOCHS):
            tr.epoch(epoch)
            order = torch.randperm(N_EX, generator=g).tolist()
            for k in range(0, N_EX, 4):
                b = order[k : k + 4]
                with tr.batch([f"ex{i}" for i in b]):
                    crit(model(x[b]), y[b]).backward()
                opt.step()
                opt.zero_grad()
            if epoch < EPOCHS - 1:
                cps.append(tr.checkpoint(f"epoch{epoch}"))
        cps.append(tr.close())  # the "final" checkpoint
        sugg = record_suggestions(
            led,
            [
                {"item_id": "item-new-1", "value": "1", "confidence": 0.8, "suggestion_id": "s-1"},
                {"item_id": "item-new-2", "value": "0", "confidence": 0.6, "suggestion_id": "s-2"},
            ],
            checkpoint_seq=cps[-1],
            model_version="mlp-epoch2",
        )
        fixes = tmp / "fixes.jsonl"
        fixes.write_text(
            json.dumps({"item_id": "item-new-1", "label_id": "fix-1", "value": "2", "producer": CAL,
                        "seeded_from": "s-1"}) + "\n"
        )  # fmt: skip
        ingest.ingest("jsonl", fixes, led, pseudonym_key=pseud)
        return Built(path, files.private, files.public, files.verifier, "mlp", cps, sugg, man.seq)
