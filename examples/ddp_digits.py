"""Digits on DistributedDataParallel into one ledger: the same run in one process or in several.

    python examples/ddp_digits.py --ledger /tmp/ddp.db [--epochs 2] [--seed 0]
    python -m torch.distributed.run --nproc_per_node 2 examples/ddp_digits.py --ledger /tmp/ddp2.db

Each global batch of ``--batch`` examples is split evenly over the ranks (rank r takes rows
``[r*b, (r+1)*b)``); every rank measures its own rows and rank 0 writes ONE ``step`` entry per optimizer step
holding the whole global batch. With the same ``--seed`` the one-process and the two-process ledgers hold the same
example ids per step and the same per-sample norms (to float rounding): ``tests/test_ddp.py`` checks it, with the
routing policy and DP on. Ledger setup (simulated Labelbox labels, ingest, manifest) runs on rank 0 when the
ledger has no ``digits`` manifest yet; the other ranks read the manifest from the same ledger (a shared file here;
a PostgreSQL URL across machines). gloo on CPU, nccl when CUDA is available (nccl is untested here).

``--kill-rank R --kill-after K`` is fault injection for the crash test: rank R SIGKILLs itself right after its
K-th optimizer step. ``torchrun`` then stops the job; the ledger keeps the steps rank 0 committed, each complete.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from collections import OrderedDict
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import instrument
from ledger import Ledger, ingest
from ledger.provenance import Manifest

POLICY = """\
gradledger_policy: 1
name: consensus-depth
groups: {shallow: ["conv1", "fc"], deep: ["head"]}
rules:
  - {name: excluded, when: {any: [{review: reject}, {rights: withdrawn}]}, weights: {"*": 0.0}}
  - {name: gold, when: {gold: true}, weights: {"*": 1.0}}
  - {name: low-consensus, when: {consensus: {lt: 0.7}}, weights: {shallow: 1.0, deep: 0.0}}
default: {"*": 1.0}
"""


def cnn() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 4, 3, padding=1), a1=nn.ReLU(), pool=nn.MaxPool2d(2), flat=nn.Flatten(),
        fc=nn.Linear(64, 32), a2=nn.ReLU(), head=nn.Linear(32, 10),
    ))  # fmt: skip


def prepare_ledger(path: str, seed: int, limit: int) -> None:
    """Rank 0, once per ledger: simulated Labelbox labels, ingest, the ``digits`` manifest."""
    from audit.demo_data import SimulationConfig, simulate, write_labelbox_export
    from ledger.ingest.pseudonym import create_key

    with Ledger.open(path, create=True) as led:
        if any(e.body.get("name") == "digits" for e in led.entries(kind="manifest", payloads=False)):
            return
        sim = simulate(SimulationConfig(seed=seed, limit=limit))
        with tempfile.TemporaryDirectory() as tmp:
            export = write_labelbox_export(sim, Path(tmp) / "labelbox.ndjson")
            create_key(Path(tmp) / "pseudonym.key")
            ingest.labelbox(export, led, pseudonym_key=Path(tmp) / "pseudonym.key")
        Manifest.create(led, "digits", {ex: lab.label_id for ex, lab in sim.examples.items()})


def load_data(led: Ledger, seed: int, limit: int) -> tuple[list[str], torch.Tensor, torch.Tensor, Manifest]:
    """Inputs from the simulated images, targets from the ingested label values (as a user's loader would)."""
    from audit.demo_data import SimulationConfig, simulate

    manifest = Manifest.load(led, "digits")
    sim = simulate(SimulationConfig(seed=seed, limit=limit))
    ids = sorted(manifest)
    pixels = np.stack([sim.images[sim.examples[e].image] for e in ids]).astype(np.float32)
    x = torch.from_numpy((pixels - pixels.mean()) / pixels.std()).unsqueeze(1)
    y = torch.tensor([int(manifest[e].value["classifications"][0]["radio_answer"]["name"]) for e in ids])
    return ids, x, y, manifest


def _exit_once(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the exit's flush
    sys.exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ledger", required=True, help="ledger path or SQLAlchemy URL (created if missing)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=64, help="GLOBAL batch size (split evenly over the ranks)")
    ap.add_argument("--limit", type=int, default=512, help="digits images used")
    ap.add_argument("--run", default="ddp-digits")
    ap.add_argument("--dp", action="store_true", help="DP-SGD (noise 1.0, clip 1.0, delta 1e-5, RDP)")
    ap.add_argument("--timeout", type=float, default=60.0, help="process-group timeout, seconds")
    ap.add_argument("--kill-rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kill-after", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=a.timeout))
        # torchrun sends SIGTERM when another rank dies: exit normally (once) so the step writer flushes
        signal.signal(signal.SIGTERM, _exit_once)
    rank = dist.get_rank() if distributed else 0
    if a.batch % world:
        print(f"error: --batch {a.batch} is not divisible by {world} ranks", file=sys.stderr)
        return 2
    device = torch.device(
        f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    )

    if rank == 0:
        prepare_ledger(a.ledger, a.seed, a.limit)
    if distributed:
        dist.barrier()
    led = Ledger.open(a.ledger)  # rank 0 writes; the other ranks only read the manifest
    ids, x, y, manifest = load_data(led, a.seed, a.limit)

    torch.manual_seed(a.seed)
    model = cnn().to(device)
    net: nn.Module = nn.parallel.DistributedDataParallel(model) if distributed else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    dp = instrument.DPConfig(1.0, 1.0, 1e-5, accountant="rdp", seed=a.seed) if a.dp else None
    tracker = instrument.attach(
        net, opt, ledger=led if rank == 0 else None, run=a.run, policy=instrument.Policy.from_yaml(POLICY),
        labels=manifest, criterion=crit, seed=a.seed, dp=dp,
    )  # fmt: skip

    b = a.batch // world
    for epoch in range(a.epochs):
        tracker.epoch(epoch)
        order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(a.seed * 1000 + epoch))
        for glob in order.split(a.batch):
            if len(glob) < a.batch:
                break  # equal global batches (and equal local shares) in both modes
            idx = glob[rank * b : (rank + 1) * b]
            with tracker.batch([ids[i] for i in idx]):
                crit(net(x[idx].to(device)), y[idx].to(device)).backward()
                opt.step()
                opt.zero_grad()
            if a.kill_rank == rank and tracker.step_index == a.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
    tracker.close()

    if rank == 0:
        res = led.verify()
        steps = sum(1 for _ in led.steps(a.run))
        print(f"ranks {world}: {steps} step entries, verify: {'intact' if res.ok else res.reason}")
    led.close()
    if distributed:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
