"""Typed, read-only views of the entries the training tracker writes: ``run``, ``step`` and ``checkpoint``.

Readers go through these instead of raw bodies so a field rename is one edit here. ``iter_steps`` streams:
one entry is decoded at a time, so a run of any length reads in constant memory.

Step entry (kind ``step``, v 1), written by ``instrument.tracker``:

* body: ``run``, ``run_seq`` (seq of the ``run`` entry), ``step`` (0-based index of the tracked optimizer step),
  ``epoch``, ``example_ids`` [B] (strings), ``layers`` [L] (qualified module names), ``micro_batches``
  (sizes of the ``tracker.batch`` contexts the step covers, in order), ``lr`` [L] (learning rate of each
  layer's param group at the step; null when the layer is not in the optimizer), ``update_norms`` [L]
  (``||θ_after - θ_before||`` per layer, null when disabled), ``policy_seq`` (or null), ``flags``
  (``{"nan_loss": [row, ...], "nonfinite_grad_norm": [row, ...]}``, only the non-empty ones), and when DP is on
  ``dp``: ``{"eps", "eps_step", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "accountant"}``.
* payloads: ``grad_norms`` <f4 [B, L] (each sample's own, unrouted gradient norm, Opacus scaling), ``weights``
  <f4 [B, L] (routing weights applied), ``losses`` <f4 [B] (when a criterion is attached), ``margins`` <f4 [B]
  (classification criteria: logit of the assigned label minus the largest other logit), ``rules`` <i4 [B]
  (index of the policy rule each example matched, -1 = the policy default; with a policy), ``clip`` <f4 [B]
  (DP clipping factors).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

STEP_VERSION = 1


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
        weights = _payload(pl, "weights")
        if norms is None or weights is None:
            raise ValueError(f"step entry {entry.seq} lacks its grad_norms / weights payloads")
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
            rule_ids=_payload(pl, "rules"),
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
    return [RunRecord.from_entry(e) for e in ledger.entries(kind="run")]


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
        CheckpointRecord.from_entry(e) for e in ledger.entries(kind="checkpoint") if e.body.get("run") == run
    ]
