"""Governed training on digits, as plain code to copy: the steps of ``gradledger demo`` without the narration.

    python examples/digits_governed.py --out /tmp/digits-governed [--epochs 6] [--limit 600]

Replace step 0 (a simulated Labelbox export, from ``audit.demo_data``) with your own export and your model; the
rest is the gradledger API as you would call it:

1. a signing key, a pseudonym key and a ledger; ingest the Labelbox export (identities become pseudonyms);
2. a manifest (training example id -> label record) and a routing policy;
3. a normal PyTorch loop with ``instrument.attach``: one ``step`` entry per optimizer step;
4. sign a checkpoint note and verify against it with the public key;
5. ask which annotators and labels shaped the last layer; rank memorisation candidates;
6. a lineage graph and a signed export an auditor verifies with the public key only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

import instrument
from audit import lineage, query
from audit.demo_data import SimulationConfig, simulate, write_labelbox_export
from audit.export import build_export, verify_bundle
from audit.memorization import rank_memorization
from ledger import Ledger, ingest, keys
from ledger.ingest.pseudonym import create_key
from ledger.provenance import Manifest

POLICY = """\
gradledger_policy: 1
name: consensus-depth
groups: {shallow: ["conv1", "conv2", "fc"], deep: ["head"]}
rules:
  - {name: excluded, when: {any: [{review: reject}, {rights: withdrawn}]}, weights: {"*": 0.0}}
  - {name: gold, when: {gold: true}, weights: {"*": 1.0}}
  - {name: low-consensus, when: {consensus: {lt: 0.7}}, weights: {shallow: 1.0, deep: 0.0}}
default: {"*": 1.0}
"""


def cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 8, 3, padding=1), a1=nn.ReLU(), conv2=nn.Conv2d(8, 16, 3, padding=1), a2=nn.ReLU(),
        pool=nn.MaxPool2d(2), flat=nn.Flatten(), fc=nn.Linear(256, 64), a3=nn.ReLU(), head=nn.Linear(64, 10),
    ))  # fmt: skip


def main(out: Path, epochs: int, limit: int | None, seed: int = 0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(seed)

    # 0. a Labelbox Export v2 NDJSON (simulated annotators; use your own export here)
    sim = simulate(SimulationConfig(seed=seed, limit=limit))
    export = write_labelbox_export(sim, out / "labelbox-export.ndjson")

    # 1. keys (outside the ledger), the ledger, the ingest
    kf = keys.save_keypair(out / "keys", "my-team")
    create_key(out / "keys" / "pseudonym.key")
    led = Ledger.create(out / "ledger.db")
    summary = ingest.labelbox(export, led, pseudonym_key=out / "keys" / "pseudonym.key")
    print(f"ingested {summary.records} labels, {summary.annotators} annotators, {summary.skipped} skipped")

    # 2. manifest: training example id -> label id (here: one example per label); the routing policy
    examples = sim.examples  # {example id: label}; yours comes from your dataset
    manifest = Manifest.create(led, "digits", {ex: lab.label_id for ex, lab in examples.items()})
    (out / "policy.yaml").write_text(POLICY, encoding="utf-8")
    policy = instrument.Policy.load(out / "policy.yaml")

    # 3. train: inputs from your data, targets from the ingested label values
    ids = sorted(manifest)
    pixels = np.stack([sim.images[examples[e].image] for e in ids])
    x = torch.from_numpy((pixels - pixels.mean()) / pixels.std()).unsqueeze(1)
    value = {e: manifest[e].value for e in ids}
    y = torch.tensor([int(value[e]["classifications"][0]["radio_answer"]["name"]) for e in ids])
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    tracker = instrument.attach(
        model, opt, ledger=led, run="cnn-1", policy=policy, labels=manifest, criterion=crit
    )
    for epoch in range(epochs):
        tracker.epoch(epoch)
        for idx in torch.randperm(len(ids)).split(64):
            with tracker.batch([ids[i] for i in idx]):
                crit(model(x[idx]), y[idx]).backward()
                opt.step()
                opt.zero_grad()
    tracker.close()  # final checkpoint entry (sha256 of every layer's parameters)

    # 4. sign the tree head, keep the note outside the database, verify against it with the public key
    note = led.sign_checkpoint(keys.load_private_key(kf.private), kf.verifier_key.name)
    (out / "checkpoint.txt").write_text(note, encoding="utf-8")
    res = led.verify(checkpoint=note, pubkey=keys.load_verifier(kf.public), deep=True)
    print(f"verify: {'intact' if res.ok else res.reason} ({res.size} entries)")

    # 5. which annotators / labels shaped the last layer; memorisation candidates with their baselines
    for row in query.layer(led, "cnn-1", "head", by="annotator", top=10).rows:
        print(f"  head  {row.key}  share {row.share:.1%}  mean routing weight {row.weight:.2f}")
    top = query.layer(led, "cnn-1", "head", by="label", top=3).rows
    print("  top labels: " + ", ".join(f"{r.label_id} ({r.annotator}, consensus {r.consensus})" for r in top))
    mem = rank_memorization(led.steps("cnn-1"))
    print("  AUROC vs the planted truth: " + json.dumps(
        {k: round(v["auroc"], 3) for k, v in mem.evaluate(sim.wrong_examples() & set(mem.example_ids)).items()}
    ))  # fmt: skip

    # 6. lineage graph, signed export, and the auditor's check (bundle + public key only)
    lineage.write(lineage.graph(led, run="cnn-1"), out / "lineage.graphml", "graphml")
    bundle = build_export(
        led, "cnn-1", keys.load_private_key(kf.private), kf.verifier_key.name, evidence=True
    )
    (out / "bundle.json").write_text(json.dumps(bundle), encoding="utf-8")
    led.close()
    report = verify_bundle((out / "bundle.json").read_bytes(), keys.load_verifier(kf.public))
    print("auditor: " + ", ".join(f"{c.name} {c.status}" for c in report.checks))
    return 0 if res.ok else 1


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, required=True, help="empty directory for the ledger, keys and outputs"
    )
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--limit", type=int, default=600, help="digits images used (0: all 1,797)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if (a.out / "ledger.db").exists():
        print(f"error: {a.out / 'ledger.db'} already exists; choose an empty --out", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(a.out, a.epochs, a.limit or None, a.seed))
