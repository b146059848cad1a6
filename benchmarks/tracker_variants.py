"""The tracker's variants for ``benchmarks/step_overhead.py``: the whole product path of one training step.

    ledger          instrument.attach: per-sample per-layer norms, per-sample losses and margins, update
                    norms, and one step entry appended to a SQLite ledger inside the step (``max_pending=0``),
                    so the step's CPU time includes all the append's work (canonical JSON, hashing, SQL) and
                    its wall time the commit's fsync
    ledger_routing  the same under a routing policy: provenance looked up in a manifest of ingested labels,
                    weights [B, L] from the demo's consensus/review/rights/gold rules, routed .grad
    ledger_async    ``ledger`` with the tracker's default background writer (queue of 8 steps): the commit
                    overlaps the next steps. Read its WALL time; its CPU time leaves out the writer thread.

``register(variant)`` adds them to the benchmark's table; ``step_overhead.py`` calls it. The ledgers live in
a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

Step = Callable[[], None]
Maker = Callable[[nn.Module, Tensor, Tensor], Step]

_TMP: list[Path] = []


def _tmpdir() -> Path:
    if not _TMP:
        _TMP.append(Path(tempfile.mkdtemp(prefix="gradledger-bench-")))
        atexit.register(shutil.rmtree, _TMP[0], True)
    return _TMP[0]


def _manifest(led: Any, ids: list[str]) -> Any:
    """Ingest one synthetic label per example (a spread of consensus / review / rights / gold) and pin them."""
    from ledger import ingest
    from ledger.ingest.pseudonym import Pseudonymizer
    from ledger.provenance import Manifest

    g = torch.Generator().manual_seed(3)
    rows = []
    for k, ex in enumerate(ids):
        row: dict[str, Any] = {
            "item_id": ex,
            "label_id": f"lab-{ex}",
            "value": "c",
            "producer": f"ann{k % 7}@x.org",
        }
        row["consensus"] = round(float(torch.rand(1, generator=g)), 3)
        if k % 11 == 0:
            row.update(review="reject", reviewer="rev@x.org")
        if k % 13 == 0:
            row["rights"] = "withdrawn"
        if k % 17 == 0:
            row["gold"] = True
        rows.append(row)
    path = _tmpdir() / f"{uuid.uuid4().hex}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest.ingest("jsonl", path, led, pseudonym_key=Pseudonymizer(bytes(32)))
    return Manifest.create(led, "bench", {ex: f"lab-{ex}" for ex in ids})


def _policy(layers: list[str]) -> Any:
    from instrument import Policy, Rule

    half = max(1, len(layers) // 2)
    return Policy(
        name="bench-consensus-depth",
        groups={"shallow": layers[:half], "deep": layers[half:]} if layers[half:] else {"shallow": layers},
        rules=[
            Rule("excluded", {"*": 0.0}, {"any": [{"review": "reject"}, {"rights": "withdrawn"}]}),
            Rule("gold", {"*": 1.0}, {"gold": True}),
            Rule("low-consensus", {"shallow": 1.0, "*": 0.0}, {"consensus": {"lt": 0.7}}),
        ],
        default={"*": 1.0},
    )


def _flat(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    return out.reshape(-1, out.shape[-1]), y.reshape(-1)


def _tracked(model: nn.Module, x: Tensor, y: Tensor, routed: bool, max_pending: int) -> Step:
    from instrument import GradNormEngine, attach
    from ledger.store import Ledger

    led = Ledger.open(_tmpdir() / f"{uuid.uuid4().hex}.ledger", create=True)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    ids = [f"ex{i}" for i in range(x.shape[0])]
    kwargs: dict[str, Any] = {}
    if routed:
        kwargs["labels"] = _manifest(led, ids)
        kwargs["policy"] = _policy(GradNormEngine(model).layer_names)
    tr = attach(model, opt, ledger=led, run="bench", criterion=crit, max_pending=max_pending, **kwargs)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with tr.batch(ids):
            crit(*_flat(model(x), y)).backward()  # no reference to the logits outlives the loss, as in plain
            opt.step()

    return step


def register(variant: Callable[[str], Callable[[Maker], Maker]]) -> None:
    """Add the tracker's variants to a benchmark's ``@variant(name)`` table."""

    @variant("ledger")
    def make_ledger(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        return _tracked(model, x, y, routed=False, max_pending=0)

    @variant("ledger_routing")
    def make_ledger_routing(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        return _tracked(model, x, y, routed=True, max_pending=0)

    @variant("ledger_async")
    def make_ledger_async(model: nn.Module, x: Tensor, y: Tensor) -> Step:
        return _tracked(model, x, y, routed=False, max_pending=8)
