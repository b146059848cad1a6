"""A tiny transformer on synthetic multi-domain token sequences with planted label noise; entropy depth profiles.

    python examples/tiny_transformer.py --out /tmp/tiny-transformer [--n 1200] [--epochs 8]

Four classes; a sequence of its class is filler tokens plus a few of the class's signal tokens. Three domains
(the ``domain`` tag of each label, ingested through the generic JSONL format):

* ``clean``: three signal tokens, labels right;
* ``ambiguous``: two signal tokens of the class and one of another class: weaker, mixed evidence in the input
  (labels right);
* ``flipped``: clean inputs, but 30% of the labels were flipped to another class (label noise).

The model (token + position embeddings, two pre-norm attention blocks, mean pooling, a linear head: Embedding,
Linear and LayerNorm layers, all with exact per-sample norms) is trained with ``instrument.attach``. Then:

* entropy depth profiles per domain (``audit.profiles``: cross-fitted linear probes on each block's output of
  held-out sequences, bootstrap CIs), recorded as a ``profile`` entry;
* two separate annotation-priority queues (``audit.priorities``): **ambiguity** (late-layer probe entropy:
  needs guidelines or more data) should put ``ambiguous`` first; **label disagreement** (memorisation
  ranking: needs relabelling) should put ``flipped`` first. (When the input carries no usable evidence at all,
  e.g. one signal token of the class and one of another, its labels look like label noise to the training
  dynamics too, and both queues put that domain first: the two signals are not independent.)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import instrument
from audit.memorization import rank_memorization
from audit.priorities import ambiguity_queue, disagreement_queue
from audit.profiles import ProbeSettings, collect_activations, entropy_profile
from ledger import Ledger, ingest
from ledger.ingest.pseudonym import create_key
from ledger.provenance import Manifest

VOCAB, LENGTH, CLASSES, SIGNAL = 48, 12, 4, 4  # tokens 0..15 are signal (4 per class), 16..47 filler
DOMAINS = ("clean", "ambiguous", "flipped")


def make_sequences(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Token sequences [n, LENGTH], true classes, given labels (with planted flips), domain tags."""
    x = rng.integers(CLASSES * SIGNAL, VOCAB, size=(n, LENGTH))
    y = rng.integers(0, CLASSES, size=n)
    domains = [DOMAINS[i % 3] for i in range(n)]
    labels = y.copy()
    for i in range(n):
        pos = rng.choice(LENGTH, size=3, replace=False)
        own = y[i] * SIGNAL + rng.integers(0, SIGNAL, size=3)
        x[i, pos] = own
        if domains[i] == "ambiguous":  # one signal token becomes another class's: weaker, mixed evidence
            other = (y[i] + rng.integers(1, CLASSES)) % CLASSES
            x[i, pos[2]] = other * SIGNAL + rng.integers(0, SIGNAL)
        if domains[i] == "flipped" and rng.random() < 0.3:
            labels[i] = (y[i] + rng.integers(1, CLASSES)) % CLASSES
    return x, y, labels, domains


class Block(nn.Module):
    """Pre-norm self-attention (one head, written with Linear layers) and an MLP."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.norm1(h)
        att = torch.softmax(self.q(a) @ self.k(a).transpose(1, 2) / a.shape[-1] ** 0.5, dim=-1)
        h = h + self.o(att @ self.v(a))
        return h + self.down(torch.relu(self.up(self.norm2(h))))


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, d), nn.Embedding(LENGTH, d)
        self.blocks = nn.Sequential(Block(d), Block(d))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(x.shape[1]).expand_as(x)
        h = self.blocks(self.tok(x) + self.pos(pos))
        return self.head(self.norm(h.mean(dim=1)))


def write_labels(path: Path, ids: list[str], labels: np.ndarray, domains: list[str]) -> None:
    """The labels in gradledger's generic JSONL format (one row per label, with its domain tag)."""
    with open(path, "w", encoding="utf-8") as fh:
        for i, (ex, lab, dom) in enumerate(zip(ids, labels, domains, strict=True)):
            who = f"annotator{i % 4}@seq.example.net"
            row = {"item_id": ex, "label_id": f"lab-{i}", "value": int(lab), "producer": who, "domain": dom}
            fh.write(json.dumps(row) + "\n")


def run(out: Path, n: int = 1200, epochs: int = 8, seed: int = 0) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, y_true, labels, domains = make_sequences(n, rng)
    x_held, y_held, _, dom_held = make_sequences(max(300, n // 2), rng)
    ids = [f"seq-{i:05d}" for i in range(n)]

    led = Ledger.create(out / "ledger.db")
    create_key(out / "pseudonym.key")
    write_labels(out / "labels.jsonl", ids, labels, domains)
    ingest.jsonl(out / "labels.jsonl", led, pseudonym_key=out / "pseudonym.key")
    manifest = Manifest.create(led, "sequences", {ex: f"lab-{i}" for i, ex in enumerate(ids)})

    model = TinyTransformer()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    crit = nn.CrossEntropyLoss()
    tracker = instrument.attach(
        model, opt, ledger=led, run="tiny-transformer", labels=manifest, criterion=crit
    )
    xt, yt = torch.from_numpy(x), torch.from_numpy(labels)
    for epoch in range(epochs):
        tracker.epoch(epoch)
        for idx in torch.randperm(n).split(64):
            with tracker.batch([ids[i] for i in idx]):
                crit(model(xt[idx]), yt[idx]).backward()
                opt.step()
                opt.zero_grad()
    cp = tracker.close()
    with torch.no_grad():
        acc = {d: float((model(torch.from_numpy(x_held)).argmax(1).numpy() == y_held)[np.array(dom_held) == d].mean())
               for d in DOMAINS}  # fmt: skip
    print(f"trained: {tracker.step_index} steps, checkpoint seq {cp}; held-out accuracy per domain: "
          + ", ".join(f"{d} {a:.0%}" for d, a in acc.items()))  # fmt: skip

    # entropy depth profiles per domain on held-out sequences, recorded in the ledger
    layers = ["blocks.0", "blocks.1", "norm", "head"]
    acts = collect_activations(model, torch.from_numpy(x_held), layers)
    with torch.no_grad():
        final = model(torch.from_numpy(x_held)).argmax(1).numpy()
    prof = entropy_profile(acts, y_held, dom_held, layers=layers, final_predictions=final,
                           settings=ProbeSettings(folds=3, n_boot=200, seed=seed))  # fmt: skip
    pseq = led.append("profile", prof.entry_body(run="tiny-transformer", data="held-out synthetic sequences"))
    print(f"entropy depth profile (profile entry seq {pseq}); normalised probe entropy per layer:")
    for d in prof.domains:
        cells = "  ".join(f"{lay} {prof.entropy[d][lay].mean:.2f}" for lay in layers)
        print(f"   {d:10s} {cells}   depth {prof.depth[d].mean:.2f}")

    # two separate queues: ambiguity (the inputs) and label disagreement (the labels)
    amb = ambiguity_queue(prof, [f"held-{i}" for i in range(len(y_held))], dom_held)
    mem = rank_memorization(led.steps("tiny-transformer"))
    dis = disagreement_queue(mem, {ex: d for ex, d in zip(ids, domains, strict=True)})
    flipped = {ex for ex, a, b in zip(ids, labels, y_true, strict=True) if a != b}
    ev = mem.evaluate(flipped)
    print("ambiguity queue (domains):  " + " > ".join(e.domain for e in amb.domains))
    print("disagreement queue (domains): " + " > ".join(e.domain for e in dis.domains))
    print("flipped-label AUROC: " + ", ".join(f"{k} {v['auroc']:.3f}" for k, v in ev.items()))
    res = led.verify()
    led.close()
    return {
        "accuracy": acc,
        "profile_seq": pseq,
        "entropy": {d: {lay: prof.entropy[d][lay].mean for lay in layers} for d in prof.domains},
        "ambiguity_order": [e.domain for e in amb.domains],
        "disagreement_order": [e.domain for e in dis.domains],
        "auroc": {k: v["auroc"] for k, v in ev.items()},
        "verify_ok": res.ok,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="empty directory for the ledger and labels")
    ap.add_argument("--n", type=int, default=1200, help="training sequences")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if (a.out / "ledger.db").exists():
        print(f"error: {a.out / 'ledger.db'} already exists; choose an empty --out", file=sys.stderr)
        return 2
    return 0 if run(a.out, a.n, a.epochs, a.seed)["verify_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
