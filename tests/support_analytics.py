"""A small, real ledger for the analytics CLI and report tests.

Digits with three planted domains (:func:`tests.support_digits.planted_domains`: clean, pixel-noised, 30%
flipped labels), a subset of the training set ingested as generic JSONL labels from three annotators
(e-mail identities, so the tests can check that only pseudonyms come out), consensus scores, reviewer
decisions on some flipped labels, a manifest with domains, a routing policy, an MLP 64-128-128-10 trained
with ``instrument.attach`` into a SQLite ledger with a checkpoint per epoch, the final weights saved in the
ledger's state store, and an .npz profile data file (held-out inputs of the three domains).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import instrument
from instrument.sketch import StateStore
from ledger import ingest
from ledger.ingest.pseudonym import Pseudonymizer
from ledger.provenance import Manifest
from ledger.store import Ledger
from tests.support_digits import make_mlp, one_thread, planted_domains

RUN = "digits"
ANNOTATORS = ("ana@example.com", "ben@example.org", "cara@example.net")
POLICY = """\
gradledger_policy: 1
name: consensus-routing
groups:
  shallow: ["0", "2"]
  deep: ["4"]
rules:
  - name: low-consensus
    when: {consensus: {lt: 0.5}}
    weights: {shallow: 1.0, deep: 0.5}
default: {"*": 1.0}
"""


def digits_mlp() -> nn.Sequential:
    """Model factory for ``gradledger profile --model tests.support_analytics:digits_mlp``."""
    return make_mlp(0)


@dataclass
class Built:
    path: Path  # the SQLite ledger file
    data: Path  # profile data file (.npz)
    ids: list[str]
    flipped: set[str]
    domains: dict[str, str]
    reviewed_fix: set[str]


def build(tmp: Path, *, n_train: int = 360, epochs: int = 8, batch_size: int = 60) -> Built:
    """Write the ledger, the state store and the profile data file under ``tmp``."""
    pd = planted_domains(seed=0)
    rng = np.random.default_rng(3)
    sel = np.sort(rng.choice(len(pd.y_assigned), size=n_train, replace=False))
    x = pd.data.x_train[sel]
    y = pd.y_assigned[sel]
    doms = [pd.train_domains[i] for i in sel]
    flipped_mask = pd.flipped[sel]
    ids = [f"ex-{k:04d}" for k in range(n_train)]
    rows = []
    reviewed_fix = set()
    for k, ex in enumerate(ids):
        row: dict[str, object] = {
            "item_id": f"item-{k}",
            "label_id": f"lab-{k}",
            "value": str(int(y[k])),
            "producer": ANNOTATORS[k % 3],
            "consensus": [0.9, 0.7, 0.3][k % 3] if not flipped_mask[k] else 0.2,
            "domain": doms[k],
        }
        if flipped_mask[k] and k % 2 == 0:  # a reviewer later corrected half of the flipped labels
            row["reviews"] = [
                {"decision": "fix", "reviewer": "rev@example.com", "at": "2026-01-02T00:00:00Z"}
            ]
            reviewed_fix.add(ex)
        rows.append(row)
    labels = tmp / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    path = tmp / "run.db"
    led = Ledger.open(path, create=True)
    try:
        ingest.ingest("jsonl", labels, led, pseudonym_key=Pseudonymizer(bytes(range(32))))
        domains = dict(zip(ids, doms, strict=True))
        man = Manifest.create(led, "train", {ex: f"lab-{k}" for k, ex in enumerate(ids)}, domains)
        policy = instrument.Policy.from_yaml(POLICY, "policy.yaml")
        with one_thread():
            model = make_mlp(0)
            opt = torch.optim.SGD(model.parameters(), lr=0.5)
            crit = nn.CrossEntropyLoss()
            tr = instrument.attach(
                model,
                opt,
                ledger=led,
                run=RUN,
                policy=policy,
                labels=man,
                criterion=crit,
                seed=0,
                max_pending=0,
            )
            xt, yt = torch.as_tensor(x), torch.as_tensor(y, dtype=torch.int64)
            gen = torch.Generator().manual_seed(1)
            for epoch in range(epochs):
                tr.epoch(epoch)
                perm = torch.randperm(n_train, generator=gen)
                for start in range(0, n_train, batch_size):
                    idx = perm[start : start + batch_size]
                    with tr.batch([ids[i] for i in idx.tolist()]):
                        crit(model(xt[idx]), yt[idx]).backward()
                        opt.step()
                        opt.zero_grad()
                if epoch < epochs - 1:
                    tr.checkpoint(f"epoch-{epoch}")
            tr.close()
        StateStore(StateStore.beside(path)).put(model.state_dict())
    finally:
        led.close()
    data = tmp / "probe.npz"
    n_test = 240
    np.savez(
        data,
        x=pd.data.x_test[:n_test],
        y=pd.data.y_test[:n_test].astype(np.int64),
        domain=np.array(pd.test_domains[:n_test]),
        ids=np.array([f"test-{i:04d}" for i in range(n_test)]),
        model=np.array("tests.support_analytics:digits_mlp"),
    )
    return Built(
        path, data, ids, {e for e, f in zip(ids, flipped_mask, strict=True) if f}, domains, reviewed_fix
    )


def add_dp_run(path: Path, *, run: str = "digits-dp", n_train: int = 120, epochs: int = 2) -> None:
    """Append a short DP-SGD run (RDP accountant) on the first ``n_train`` manifest examples."""
    pd = planted_domains(seed=0)
    with Ledger.open(path) as led, one_thread():
        man = Manifest.load(led, "train")
        ids = sorted(man)[:n_train]
        x = torch.as_tensor(pd.data.x_train[:n_train])
        y = torch.as_tensor(pd.y_assigned[:n_train], dtype=torch.int64)
        model = make_mlp(1)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        crit = nn.CrossEntropyLoss()
        dp = instrument.DPConfig(
            noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, accountant="rdp", seed=7
        )
        tr = instrument.attach(
            model, opt, ledger=led, run=run, labels=man, criterion=crit, dp=dp, max_pending=0
        )
        for epoch in range(epochs):
            tr.epoch(epoch)
            for start in range(0, n_train, 40):
                with tr.batch(ids[start : start + 40]):
                    crit(model(x[start : start + 40]), y[start : start + 40]).backward()
                    opt.step()
                    opt.zero_grad()
        tr.close()


_GOLDEN: Built | None = None


def build_copy(tmp_path_factory: Any, dest: Path) -> Built:
    """A private copy of one ledger built once per test process (the build costs seconds; copies are cheap).

    Each test module mutates its copy (profile entries, extra runs, signed checkpoints) without affecting
    the others."""
    global _GOLDEN
    if _GOLDEN is None:
        _GOLDEN = build(tmp_path_factory.mktemp("analytics-golden"))
    g = _GOLDEN
    dest.mkdir(parents=True, exist_ok=True)
    for name in (g.path.name, g.data.name):
        shutil.copy(g.path.parent / name, dest / name)
    shutil.copytree(StateStore.beside(g.path), StateStore.beside(dest / g.path.name))
    return replace(g, path=dest / g.path.name, data=dest / g.data.name)
