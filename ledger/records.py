"""Typed, read-only views of the entries the training tracker writes: ``run``, ``step`` and ``checkpoint``.

Readers go through these instead of raw bodies so a field rename is one edit here. ``iter_steps`` streams:
one entry is decoded at a time, so a run of any length reads in constant memory.

Step entry (kind ``step``, v 2; v 1 is still read), written by ``instrument.tracker``:

* body: ``run``, ``run_seq`` (seq of the ``run`` entry), ``step`` (0-based index of the tracked optimizer step),
  ``epoch``, ``example_ids`` [B] (strings), ``layers`` [L] (qualified module names), ``micro_batches``
  (sizes of the ``tracker.batch`` contexts the step covers, in order), ``lr`` [L] (learning rate of each
  layer's param group at the step; null when the layer is not in the optimizer), ``update_norms`` [L]
  (``||θ_after - θ_before||`` per layer, null when disabled), ``policy_seq`` (or null), ``flags``
  (``{"nan_loss": [row, ...], "nonfinite_grad_norm": [row, ...]}``, only the non-empty ones), and when DP is on
  ``dp``: ``{"eps", "eps_step", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "accountant"}``.
* payloads: ``grad_norms`` <f4 [B, L] (each sample's own, unrouted gradient norm, Opacus scaling), ``losses``
  <f4 [B] (when a criterion is attached), ``margins`` <f4 [B] (classification criteria: logit of the assigned
  label minus the largest other logit), ``rules`` <i1/<i2/<i4 [B] (index of the policy rule each example matched,
  -1 = the policy default; with a policy; the narrowest type that holds the policy's rule indices), ``clip`` <f4
  [B] (DP clipping factors).
* routing weights [B, L], compactly (v 2): body ``weight_rows`` = the distinct weight rows of the step (lists of
  L numbers, sorted; float32 values, exact through JSON) and payload ``weight_index`` <u1 (<u2, <u4 for more
  rows) [B] = each sample's row, omitted when there is one row. ``weights = float32(weight_rows)[weight_index]``
  exactly. Routing weights take a handful of distinct rows (one per policy rule), so this stores ~1 byte per
  sample instead of 4·L (v 1 stored ``weights`` <f4 [B, L] as a payload).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

STEP_VERSION = 2


def encode_weights(weights: np.ndarray) -> tuple[list[list[float]], np.ndarray | None]:
    """[B, L] float32 routing weights -> (``weight_rows``, ``weight_index`` or None for a single row)."""
    w = np.ascontiguousarray(weights, dtype=np.float32)
    rows, index = np.unique(w, axis=0, return_inverse=True)
    n = len(rows)
    table = [[float(x) for x in r] for r in rows]
    if n == 1:
        return table, None
    dtype = "<u1" if n <= 1 << 8 else "<u2" if n <= 1 << 16 else "<u4"
    return table, np.asarray(index, dtype=dtype).reshape(-1)


def step_weights(body: dict[str, Any], payloads: dict[str, Any]) -> np.ndarray | None:
    """The step's [B, L] float32 routing weights from either encoding; None when absent or malformed."""
    if "weights" in payloads:  # v 1
        return np.asarray(payloads["weights"])
    rows = body.get("weight_rows")
    ids, layers = body.get("example_ids"), body.get("layers")
    if not isinstance(rows, list) or not rows or not isinstance(ids, list) or not isinstance(layers, list):
        return None
    try:
        table = np.array(rows, dtype=np.float32)
    except (TypeError, ValueError):
        return None
    if table.ndim != 2 or table.shape[1] != len(layers):
        return None
    index = payloads.get("weight_index")
    if index is None:
        return None if len(rows) != 1 else np.repeat(table, len(ids), axis=0)
    index = np.asarray(index)
    if (
        index.shape != (len(ids),)
        or index.dtype.kind != "u"
        or (index.size and int(index.max()) >= len(rows))
    ):
        return None
    return table[index]


def _payload(payloads: dict[str, Any], name: str) -> np.ndarray | None:
    return None if name not in payloads else np.asarray(payloads[name])


def _floats(values: Any) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step of one run (see the module docstring for units)."""

    seq: int
    run: str
    run_seq: int
    step: int
    epoch: int
    example_ids: list[str]
    layers: list[str]
    micro_batches: list[int]
    grad_norms: np.ndarray  # [B, L] float32
    weights: np.ndarray  # [B, L] float32
    losses: np.ndarray | None  # [B]
    margins: np.ndarray | None  # [B]
    lr: np.ndarray  # [L] float64 (NaN: layer not in the optimizer)
    update_norms: np.ndarray | None  # [L] float64
    clip_factors: np.ndarray | None  # [B]
    policy_seq: int | None
    rule_ids: np.ndarray | None  # [B] int32, -1 = policy default
    eps: float | None
    flags: dict[str, list[int]]

    @classmethod
    def from_entry(cls, entry: Any) -> StepRecord:
        if entry.kind != "step":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a step")
        b = entry.body
        pl = entry.payloads  # decoded once per record
        norms = _payload(pl, "grad_norms")
        weights = step_weights(b, pl)
        if norms is None or weights is None:
            raise ValueError(f"step entry {entry.seq} lacks its grad_norms / routing weights")
        upd = b.get("update_norms")
        dp = b.get("dp")
        return cls(
            seq=int(entry.seq),
            run=b["run"],
            run_seq=int(b["run_seq"]),
            step=int(b["step"]),
            epoch=int(b["epoch"]),
            example_ids=list(b["example_ids"]),
            layers=list(b["layers"]),
            micro_batches=[int(x) for x in b.get("micro_batches", [len(b["example_ids"])])],
            grad_norms=norms,
            weights=weights,
            losses=_payload(pl, "losses"),
            margins=_payload(pl, "margins"),
            lr=_floats(b["lr"]),
            update_norms=None if upd is None else _floats(upd),
            clip_factors=_payload(pl, "clip"),
            policy_seq=b.get("policy_seq"),
            rule_ids=None if "rules" not in pl else np.asarray(pl["rules"]).astype(np.int32),
            eps=None if not dp else dp.get("eps"),
            flags={k: list(v) for k, v in (b.get("flags") or {}).items()},
        )


@dataclass(frozen=True)
class RunRecord:
    """The ``run`` entry ``instrument.attach`` writes: what was trained, how, under which policy and labels."""

    seq: int
    run: str
    layers: list[str]
    architecture: dict[str, Any]
    optimizer: dict[str, Any]
    seed: int | None
    loss_reduction: str
    criterion: str | None
    policy_seq: int | None
    policy_digest: str | None
    manifest_seq: int | None
    manifest_digest: str | None
    dp: dict[str, Any] | None
    versions: dict[str, str]
    body: dict[str, Any]

    @classmethod
    def from_entry(cls, entry: Any) -> RunRecord:
        if entry.kind != "run":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a run")
        b = entry.body
        return cls(
            seq=int(entry.seq),
            run=b["run"],
            layers=[layer["name"] for layer in b["architecture"]["layers"]],
            architecture=b["architecture"],
            optimizer=b["optimizer"],
            seed=b.get("seed"),
            loss_reduction=b["loss_reduction"],
            criterion=b.get("criterion"),
            policy_seq=b.get("policy_seq"),
            policy_digest=b.get("policy_digest"),
            manifest_seq=b.get("manifest_seq"),
            manifest_digest=b.get("manifest_digest"),
            dp=b.get("dp"),
            versions=dict(b.get("versions", {})),
            body=b,
        )


@dataclass(frozen=True)
class CheckpointRecord:
    """A ``checkpoint`` entry: parameter digests of a model state at a point of a run."""

    seq: int
    run: str
    tag: str
    step: int
    layer_sha256: dict[str, str]  # layer name -> digest over its parameters
    state_dict_sha256: str
    tensors: dict[str, dict[str, Any]]  # state-dict key -> {dtype, shape, sha256}
    eps: float | None
    body: dict[str, Any]

    @classmethod
    def from_entry(cls, entry: Any) -> CheckpointRecord:
        if entry.kind != "checkpoint":
            raise ValueError(f"entry {entry.seq} is a {entry.kind!r} entry, not a checkpoint")
        b = entry.body
        dp = b.get("dp")
        return cls(
            seq=int(entry.seq),
            run=b["run"],
            tag=b["tag"],
            step=int(b["step"]),
            layer_sha256={k: v["sha256"] for k, v in b["layers"].items()},
            state_dict_sha256=b["state_dict_sha256"],
            tensors=b["state_dict"],
            eps=None if not dp else dp.get("eps"),
            body=b,
        )


def iter_steps(ledger: Any, run: str) -> Iterator[StepRecord]:
    """Stream the run's step records in ledger order."""
    for entry in ledger.entries(kind="step"):
        if entry.body.get("run") == run:
            yield StepRecord.from_entry(entry)


def runs(ledger: Any) -> list[RunRecord]:
    """Every ``run`` entry, in ledger order."""
    return [RunRecord.from_entry(e) for e in ledger.entries(kind="run", payloads=False)]


def run_record(ledger: Any, run: str) -> RunRecord:
    """The ``run`` entry named ``run``; KeyError naming the runs that exist otherwise."""
    found = [r for r in runs(ledger) if r.run == run]
    if not found:
        names = sorted({r.run for r in runs(ledger)})
        raise KeyError(f"no run named {run!r} in this ledger (runs: {', '.join(names) or 'none'})")
    return found[-1]


def checkpoints(ledger: Any, run: str) -> list[CheckpointRecord]:
    """The run's checkpoint entries, in ledger order."""
    return [
        CheckpointRecord.from_entry(e)
        for e in ledger.entries(kind="checkpoint", payloads=False)
        if e.body.get("run") == run
    ]
