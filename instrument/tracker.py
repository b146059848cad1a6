"""The training tracker: turns an ordinary PyTorch loop into ``run`` / ``step`` / ``checkpoint`` ledger entries.

Usage (the pattern users adopt)::

    tracker = instrument.attach(model, optimizer, ledger=led, run="exp-1", policy=policy, labels=manifest,
                                criterion=criterion, loss_reduction="mean")
    for epoch in range(n):
        tracker.epoch(epoch)
        for example_ids, x, y in loader:
            with tracker.batch(example_ids):
                loss = criterion(model(x), y)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    tracker.close()           # final checkpoint entry, hooks removed

How it hooks in, and why this way:

* ``tracker.batch(ids)`` routes the ids through the policy (weights [B, L], matched rule per example; cached per
  id because provenance does not change within a run) and arms the ``GradNormEngine`` for the next backward.
  A forward pre-hook on the model checks that the input batch has ``len(ids)`` rows (a clear error otherwise).
* Per-sample losses and AUM margins come from a forward hook on the *criterion module* passed to ``attach``:
  it sees the model output and the targets without changing the user's code. The loss is recomputed under
  ``no_grad`` with ``reduction="none"`` and averaged over each sample's elements (tokens of a sequence,
  skipping ``ignore_index``; inputs flattened batch-major to [B*T, C] are understood): at once for large or
  non-CPU inputs, else from a copy of the inputs and settings on the writer thread (``_DEFER_ELEMS``). A plain
  ``CrossEntropyLoss`` on a [N, C] input reads the log-softmax its own autograd node saved instead of
  recomputing it (``_saved_log_probs``: the same bytes, without a second pass over the logits). Supported:
  ``CrossEntropyLoss``, ``NLLLoss`` (these also give margins for [B, C] inputs: the assigned label's logit minus
  the largest other one), ``MSELoss``, ``L1Loss``, ``SmoothL1Loss``, ``HuberLoss``, ``BCEWithLogitsLoss``,
  ``BCELoss``; any other criterion is refused at attach. ``criterion=None`` records no losses or margins.
  (``CrossEntropyLoss(weight=...)`` records the class-weighted per-sample loss, unnormalised.)
* Optimizer step pre/post hooks close the step: the pre-hook collects the engine's norms, adds DP noise, reads
  each layer's learning rate and copies the parameters into buffers kept from step to step; the post-hook
  computes ``||Δθ_l||`` and hands the step to the ledger writer (``StepWriter``), which builds, encodes and
  appends the ``step`` entry on its own thread, several waiting steps per transaction; a step is either fully
  recorded or absent. The parameter copy costs one copy of the trainable parameters in memory (alive from the
  first step to ``pause()`` / ``close()``) and ~5 passes over them per step; ``update_norms=False`` skips it.
* Gradient accumulation: several ``tracker.batch`` contexts followed by one ``optimizer.step()`` (inside the
  last context or after it) make one step entry covering all their examples in order; ``micro_batches`` records
  the sizes. Each sample's norm is of its own loss within its micro-batch (Opacus scaling per micro-batch).
* ``pause()`` removes every hook (engine, criterion, model, optimizer): a paused step is plain PyTorch, not
  counted and not recorded. ``resume()`` re-installs them. ``step`` indices count recorded steps.
* ``DistributedDataParallel`` (``instrument/distributed.py``): call ``attach`` on every rank; each rank measures
  its local rows, rank 0 gathers them at ``optimizer.step()`` and writes ONE step entry holding the global batch
  (``ledger`` is needed on rank 0 only). DP noise is added once (rank 0), routing and clipping are per sample,
  and the applied gradient equals one process's on the global batch. ``checkpoint``/``close`` are collective.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import hashlib
import math
import platform
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import rfc8785
import torch
import torch.nn.functional as F
from torch import nn

from ledger.records import STEP_VERSION, StepEncoder

from . import distributed as _dist
from .dp import DPConfig, GaussianMechanism
from .policy import BoundPolicy, Policy

# ----- per-sample losses ---------------------------------------------------------------------------


# Input elements per chunk when recomputing losses: bounds the log-softmax temporary (256 KiB in float32), but
# never more than _MAX_CHUNKS chunks per call (a 50k vocabulary would otherwise mean one row per chunk, and each
# chunk costs a few small ops): the temporary then is at most 1/_MAX_CHUNKS of the input, which already exists.
_CHUNK_ELEMS = 1 << 16
_MAX_CHUNKS = 64


@dataclass(frozen=True)
class _LossConfig:
    """A criterion's type and settings as they are at one call: a recomputation that runs later (on the writer
    thread) uses the settings of the step it belongs to, even if the loop changes them afterwards."""

    kind: type
    weight: torch.Tensor | None = None
    pos_weight: torch.Tensor | None = None
    ignore_index: int = -100
    label_smoothing: float = 0.0
    delta: float = 1.0
    beta: float = 1.0

    @classmethod
    def of(cls, crit: nn.Module) -> _LossConfig:
        kind = type(crit)
        names = _SETTINGS.get(kind)
        if names is None:  # a subclass, or a class not seen yet: every setting it may have
            names = _SETTINGS[kind] = tuple(n for n in _DEFAULTS if hasattr(crit, n))
        # only the settings this class has: a missing attribute costs nn.Module.__getattr__'s exception
        # (~2-3 us each, 3-4x that inside a training step), once per micro-batch
        return cls(kind, **{n: getattr(crit, n, _DEFAULTS[n]) for n in names})

    def detached(self) -> _LossConfig:
        """The same settings with private copies of the weight tensors (for a later recomputation)."""
        w, pw = self.weight, self.pos_weight
        if w is None and pw is None:
            return self
        return dataclasses.replace(
            self,
            weight=None if w is None else w.detach().clone(),
            pos_weight=None if pw is None else pw.detach().clone(),
        )


_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(_LossConfig) if f.name != "kind"}
_SETTINGS: dict[type, tuple[str, ...]] = {}  # criterion class -> the _LossConfig settings it has


def _elementwise_loss(cfg: _LossConfig, inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The criterion with reduction='none'."""
    kind = cfg.kind
    if issubclass(kind, nn.CrossEntropyLoss):
        return F.cross_entropy(
            inp, target, weight=cfg.weight, ignore_index=cfg.ignore_index, reduction="none",
            label_smoothing=cfg.label_smoothing,
        )  # fmt: skip
    if issubclass(kind, nn.NLLLoss):
        return F.nll_loss(inp, target, weight=cfg.weight, ignore_index=cfg.ignore_index, reduction="none")
    if issubclass(kind, nn.MSELoss):
        return F.mse_loss(inp, target, reduction="none")
    if issubclass(kind, nn.L1Loss):
        return F.l1_loss(inp, target, reduction="none")
    if issubclass(kind, nn.HuberLoss):
        return F.huber_loss(inp, target, reduction="none", delta=cfg.delta)
    if issubclass(kind, nn.SmoothL1Loss):
        return F.smooth_l1_loss(inp, target, reduction="none", beta=cfg.beta)
    if issubclass(kind, nn.BCEWithLogitsLoss):
        return F.binary_cross_entropy_with_logits(
            inp, target, weight=cfg.weight, pos_weight=cfg.pos_weight, reduction="none"
        )
    if issubclass(kind, nn.BCELoss):
        return F.binary_cross_entropy(inp, target, weight=cfg.weight, reduction="none")
    raise TypeError(kind.__name__)  # pragma: no cover - refused at attach


def _class_losses(cfg: _LossConfig, inp: torch.Tensor, target: torch.Tensor, step: int) -> list[torch.Tensor]:
    """Cross-entropy / NLL with reduction='none', ``step`` rows at a time (the pieces, in order)."""
    rows = inp.shape[0]
    if rows <= step:
        return [_elementwise_loss(cfg, inp, target)]
    if issubclass(cfg.kind, nn.CrossEntropyLoss) and cfg.label_smoothing == 0.0 and inp.dim() >= 2:
        # ATen's cross-entropy is nll_loss(log_softmax(x)) (same bytes, tests/test_tracker.py): one log-softmax
        # buffer for every chunk instead of a new temporary per chunk, which on the CPU could come from a fresh
        # mapping each time, with its page faults (2-3x the chunk's own time, depending on the allocator's state)
        buf = torch.empty((step, *inp.shape[1:]), dtype=inp.dtype, device=inp.device)
        parts = []
        for s in range(0, rows, step):
            x = inp[s : s + step]
            logp = torch.log_softmax(x, 1, out=buf[: x.shape[0]])
            parts.append(
                F.nll_loss(
                    logp,
                    target[s : s + step],
                    weight=cfg.weight,
                    ignore_index=cfg.ignore_index,
                    reduction="none",
                )
            )
        return parts
    return [_elementwise_loss(cfg, inp[s : s + step], target[s : s + step]) for s in range(0, rows, step)]


def _per_sample_loss(
    crit: nn.Module | _LossConfig,
    inp: torch.Tensor,
    target: torch.Tensor,
    n: int,
    logp: torch.Tensor | None = None,
) -> torch.Tensor:
    """One loss per sample: the mean over each sample's elements (tokens, pixels, outputs), skipping
    ``ignore_index`` targets. ``inp`` has ``n`` rows, or ``n * k`` rows flattened batch-major
    (``out.reshape(-1, C)`` of a [n, k, C] output, as token-level losses do).

    Rows are processed in chunks of about ``_CHUNK_ELEMS`` input elements, so the recomputation's temporaries
    (e.g. cross-entropy's log-softmax over a large vocabulary) stay small next to the step's activations.
    ``logp``: cross-entropy's own log-probabilities of ``inp`` (:func:`_saved_log_probs`); the per-element
    losses are then read from them, with no second log-softmax (the same bytes: tests/test_tracker.py).
    """
    cfg = crit if isinstance(crit, _LossConfig) else _LossConfig.of(crit)
    rows = inp.shape[0]
    masked = issubclass(cfg.kind, nn.CrossEntropyLoss | nn.NLLLoss) and not target.is_floating_point()
    weights = (cfg.weight, cfg.pos_weight)
    chunkable = all(w is None or w.dim() <= 1 for w in weights)  # per-element weights would need slicing
    step = max(1, _CHUNK_ELEMS // max(1, inp[0].numel()), -(-rows // _MAX_CHUNKS)) if chunkable else rows
    if masked:
        # the criterion's output has the target's shape (one number per token / pixel, 0 where ignored): the
        # chunks only bound the log-softmax temporaries; the masked mean runs once, over all rows
        if logp is not None:
            parts = [
                F.nll_loss(logp, target, weight=cfg.weight, ignore_index=cfg.ignore_index, reduction="none")
            ]
        else:
            parts = _class_losses(cfg, inp, target, step)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        if rows == n and out.dim() == 1:
            # one number per sample: it is the sample's loss (the masked mean of one element below gives the
            # same bytes: an ignored target's 0, and -0.0 turned into 0.0 by the + 0.0)
            return out.add_(0.0)
        keep = torch.ne(target, cfg.ignore_index).to(out.dtype)
        total = (out * keep).reshape(n, -1).sum(1)
        return total / keep.reshape(n, -1).sum(1).clamp(min=1)
    sums = []
    width = 1
    for s in range(0, rows, step):
        out = _elementwise_loss(cfg, inp[s : s + step], target[s : s + step])
        out = out.reshape(out.shape[0], -1)
        width = out.shape[1]
        sums.append(out.sum(1))
    total = torch.cat(sums).reshape(n, -1).sum(1)
    return total / max(1, width * (rows // n))


SUPPORTED_CRITERIA = (
    nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.L1Loss, nn.HuberLoss, nn.SmoothL1Loss,
    nn.BCEWithLogitsLoss, nn.BCELoss,
)  # fmt: skip


def _margins(inp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """AUM margin (Pleiss et al. 2020): assigned-label logit minus the largest other logit."""
    assigned = inp.gather(1, target.view(-1, 1)).squeeze(1)
    others = inp.scatter(1, target.view(-1, 1), float("-inf"))
    return assigned - others.max(dim=1).values


def _saved_log_probs(
    crit: nn.Module, inp: torch.Tensor, target: torch.Tensor, output: Any
) -> torch.Tensor | None:
    """The log-probabilities that a ``nn.CrossEntropyLoss`` call fed to its ``nll_loss``, read from the autograd
    node the call just made, or None where that is not exactly ``log_softmax(inp, 1)``.

    Why: ATen computes cross-entropy as ``nll_loss(log_softmax(x))`` and saves the log-softmax for backward, so
    per-sample losses need no second log-softmax over the logits. For token-level outputs (a [B*T, V] input)
    that recomputation was ~9% of a small transformer's step (B = 64, T = 32, V = 512). Only the plain class
    (a subclass may compute something else in its forward), class-index targets, a [N, C] input, no label
    smoothing (whose graph is not a bare ``nll_loss``) and a node of the expected type and shape qualify."""
    if type(crit) is not nn.CrossEntropyLoss or crit.label_smoothing != 0.0:
        return None
    if inp.dim() != 2 or target.dim() != 1 or target.is_floating_point():
        return None
    node = getattr(output, "grad_fn", None)
    if node is None or node.name() != "NllLossBackward0":
        return None
    logp = getattr(node, "_saved_self", None)
    if not isinstance(logp, torch.Tensor) or logp.shape != inp.shape:
        return None
    return logp.detach()


def _criterion_values(
    cfg: _LossConfig, inp: torch.Tensor, target: torch.Tensor, n: int, logp: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-sample losses [n], AUM margins [n] or None: classification on [n, C] only), float32, on the
    inputs' device. ``logp``: see :func:`_per_sample_loss`."""
    with torch.no_grad():
        losses = _per_sample_loss(cfg, inp, target, n, logp).float()
        if (
            issubclass(cfg.kind, nn.CrossEntropyLoss | nn.NLLLoss)
            and inp.shape[0] == n
            and inp.dim() == 2
            and target.dim() == 1
            and not target.is_floating_point()
        ):
            return losses, _margins(inp, target).float()
        return losses, None


def _host(t: torch.Tensor) -> torch.Tensor:
    """A CPU tensor as is (read later, as numpy, on the writer thread), any other copied to the host now."""
    return t.detach() if t.device.type == "cpu" else t.detach().float().cpu()


# Criterion inputs up to this many elements, on the CPU, are copied and their losses and margins computed on the
# writer thread: the copy is one op on the training thread instead of the ~10 small ops of the recomputation
# (each 10-25 us inside a training loop, whose kernels have just evicted the interpreter's caches). Larger
# inputs (token-level logits) are recomputed at once, in bounded chunks, as copying them would cost memory.
_DEFER_ELEMS = 1 << 15


# ----- canonical tensor digests (checkpoint entries) ---------------------------------------------


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Canonical bytes: little-endian, C-contiguous raw element bytes (what the digest covers).

    Read through a uint8 view so every dtype works the same way (numpy has no bfloat16).
    """
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
    size = t.element_size()
    if sys.byteorder == "big" and size > 1:  # pragma: no cover - no big-endian CI
        data = np.frombuffer(data, dtype=f">u{size}").astype(f"<u{size}").tobytes()
    return data


def tensor_descriptor(t: torch.Tensor) -> dict[str, Any]:
    """``{"dtype": "float32", "shape": [...], "sha256": hex}`` of a tensor's canonical bytes."""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(tensor_bytes(t)).hexdigest(),
    }


def layer_digest(params: dict[str, dict[str, Any]]) -> str:
    """sha256 of the RFC 8785 bytes of ``{param name: descriptor}`` for one layer's own parameters."""
    return hashlib.sha256(rfc8785.dumps(params)).hexdigest()


def layer_parameters(
    model: nn.Module, layers: Sequence[str], trainable_only: bool = True
) -> dict[str, dict[str, nn.Parameter]]:
    """Each layer's parameters by name relative to the layer, as the engine covers them.

    A parameter belongs to the deepest layer whose name prefixes its module path: a kernel layer's own
    parameters, and for a fallback layer (e.g. ``nn.MultiheadAttention``) also those of children that are not
    layers themselves (``out_proj``). Derived from the layer names alone, so it needs no engine internals.
    """
    names = set(layers)
    out: dict[str, dict[str, nn.Parameter]] = {n: {} for n in layers}
    for qual, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        owner = qual.rsplit(".", 1)[0] if "." in qual else ""
        while owner not in names and owner:
            owner = owner.rsplit(".", 1)[0] if "." in owner else ""
        if owner not in names:
            if p.requires_grad:
                raise ValueError(f"trainable parameter {qual!r} belongs to no instrumented layer")
            continue
        out[owner][qual[len(owner) + 1 :] if owner else qual] = p
    return out


def model_digests(model: nn.Module, layers: Sequence[str]) -> dict[str, Any]:
    """The checkpoint body's digest part; recomputable by anyone holding the model."""
    sd = model.state_dict()
    tensors = {k: tensor_descriptor(v) for k, v in sd.items() if isinstance(v, torch.Tensor)}
    out_layers = {}
    for name, own in layer_parameters(model, layers, trainable_only=False).items():
        params = {pn: tensor_descriptor(p) for pn, p in own.items()}
        out_layers[name] = {"sha256": layer_digest(params), "params": params}
    return {
        "layers": out_layers,
        "state_dict": tensors,
        "state_dict_sha256": hashlib.sha256(rfc8785.dumps(tensors)).hexdigest(),
    }


# ----- helpers ---------------------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
    """Optimizer hyper-parameters as JSON (tuples -> lists, one-element tensors -> numbers, rest -> repr)."""
    if x is None or isinstance(x, bool | int | str):
        return x
    if isinstance(x, float):
        return x
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        return x.item()
    return repr(x)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:  # pragma: no cover - running from a bare checkout
            return "unknown"

    return {
        "gradledger": ver("gradledger"),
        "torch": str(torch.__version__),
        "opacus": ver("opacus"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _seq(result: Any) -> int:
    """``Ledger.append`` returns the new seq (or an entry carrying it)."""
    return int(getattr(result, "seq", result))


def _first_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


@dataclass
class _Micro:
    """One ``tracker.batch`` context's results."""

    ids: list[str]
    weights: np.ndarray
    rules: np.ndarray | None
    epoch: int
    norms: np.ndarray | None = None
    clip: np.ndarray | None = None
    losses: np.ndarray | None = None
    margins: np.ndarray | None = None
    # Host tensors and a deferred recomputation that ``resolve`` turns into the arrays above, on the thread
    # that builds the step entry (normally the writer thread): until then only references are kept.
    norms_t: torch.Tensor | None = None
    clip_t: torch.Tensor | None = None
    criterion_out: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (losses, margins)
    criterion_job: Callable[[], tuple[torch.Tensor, torch.Tensor | None]] | None = None
    ended: bool = False

    def resolve(self) -> None:
        """Fill ``norms`` / ``clip`` / ``losses`` / ``margins`` (float32 numpy) from the kept tensors."""
        if self.norms_t is not None:
            self.norms = self.norms_t.float().numpy()
            self.norms_t = None
        if self.clip_t is not None:
            self.clip = self.clip_t.float().numpy()
            self.clip_t = None
        if self.criterion_job is not None:
            self.criterion_out = self.criterion_job()
            self.criterion_job = None
        if self.criterion_out is not None:
            losses, margins = self.criterion_out
            self.losses = _host(losses).numpy()
            self.margins = None if margins is None else _host(margins).numpy()
            self.criterion_out = None


@dataclass
class _Pending:
    """The optimizer step being assembled."""

    micros: list[_Micro] = field(default_factory=list)
    lr: list[float | None] | None = None
    snapped: bool = False  # the parameters were copied into Tracker._before for the update norms
    eps: float | None = None


# Steps that may wait for the background writer (see StepWriter): it commits them in groups of half this many.
# 16 rather than 8: on small steps (an MLP at B = 64, 4-5 ms) the writer's CPU per step fell by 0.6-1.0 ms in
# groups of 8 against groups of 4 (BENCHMARKS.md); a crash loses at most this many steps, at most ~0.25 s of
# them (the linger), and never half a step.
MAX_PENDING = 16

_EntryArgs = tuple[str, dict[str, Any], dict[str, np.ndarray], int]  # (kind, body, payloads, v)
# A queued step: the entry itself, or a function that builds it (run on the writer thread, so the body's
# assembly and encoding stay off the training thread).
Item = _EntryArgs | Callable[[], _EntryArgs]


class StepWriter:
    """Appends step entries on a background thread, in order, so the ledger's work (encoding, hashing, SQL,
    the indexers, the commit's fsync on SQLite) overlaps the next training steps instead of adding to them.

    Group commit: the writer waits until half of ``max_pending`` steps are queued, or the oldest queued step
    has waited ``linger`` seconds, or someone calls ``flush``/``close``, and appends everything queued in ONE
    ``append_many`` transaction. A transaction has a fixed cost (BEGIN IMMEDIATE, reading the head and Merkle
    frontier, the indexers' per-transaction reads and checks, the commit) on top of ~0.2-0.3 ms of CPU per
    step entry (SQLite, B = 64-256); groups of 8 (the default, ``max_pending=16``) used 0.6-1.0 ms less
    process CPU per step than groups of 4 for an MLP at B = 64 (BENCHMARKS.md).

    A step is still either fully in the ledger or absent (a transaction holds whole entries only). What a
    crash loses: the steps not yet committed, never more than ``max_pending`` (``submit`` blocks while that
    many are uncommitted), and a queued step waits at most about ``linger`` plus a commit in progress;
    ``flush`` waits until everything submitted is committed, and ``close`` (and interpreter exit) flushes. An
    append error is sticky: re-raised (chained) by every later ``submit`` / ``flush`` / ``close``, and no
    later step is appended. ``max_pending=0`` appends synchronously in ``submit``.
    """

    def __init__(self, ledger: Any, max_pending: int = MAX_PENDING, linger: float = 0.25) -> None:
        self.ledger = ledger
        self.sync = max_pending <= 0
        self.max_pending = max(max_pending, 1)
        self.group = (self.max_pending + 1) // 2
        self.linger = linger
        self._cv = threading.Condition()
        self._items: list[Item] = []
        self._oldest = 0.0  # time.monotonic() when the oldest queued item was submitted
        self._uncommitted = 0  # queued + being appended
        self._flushing = 0  # flush() callers waiting
        self._closing = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if not self.sync:
            self._thread = threading.Thread(target=self._run, name="gradledger-step-writer", daemon=True)
            self._thread.start()
            atexit.register(self._close_at_exit)

    def _next_batch(self) -> list[Item] | None:
        """Wait for a group to commit (see the class docstring); None when closing with nothing left."""
        cv = self._cv
        with cv:
            while True:
                n = len(self._items)
                if n and (n >= self.group or self._flushing or self._closing):
                    break
                if not n:
                    if self._closing:
                        return None
                    cv.wait()
                    continue
                left = self._oldest + self.linger - time.monotonic()
                if left <= 0:
                    break
                cv.wait(left)
            batch, self._items = self._items, []
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                if self._error is None:
                    self.ledger.append_many([b() if callable(b) else b for b in batch])
            except BaseException as exc:  # re-raised on the training thread
                self._error = exc
            with self._cv:
                self._uncommitted -= len(batch)
                self._cv.notify_all()

    def _raise(self) -> None:
        if self._error is not None:  # sticky: no step may be recorded after a lost one
            err = self._error
            raise RuntimeError(f"gradledger: appending a step entry failed: {err}") from err

    def submit(
        self, kind: str, body: dict[str, Any], payloads: dict[str, np.ndarray] | None = None, v: int = 1
    ) -> None:
        """Queue one entry (appended in order; see the class docstring)."""
        self.submit_lazy((kind, body, payloads or {}, v))

    def submit_lazy(self, item: Item) -> None:
        """Queue an entry, or a function returning ``(kind, body, payloads, v)`` that the writer thread calls
        just before appending (it must only read data the caller no longer changes)."""
        if self.sync:
            self._raise()  # as in the background path: no step is recorded after a lost one
            try:
                kind, body, payloads, v = item() if callable(item) else item
                self.ledger.append(kind, body, payloads, v=v)
            except BaseException as exc:
                self._error = exc
                raise
            return
        cv = self._cv
        with cv:
            self._raise()
            while self._uncommitted >= self.max_pending:
                cv.wait()
                self._raise()
            if not self._items:
                self._oldest = time.monotonic()
            self._items.append(item)
            self._uncommitted += 1
            if len(self._items) == 1 or len(self._items) >= self.group:
                cv.notify_all()  # the writer starts the linger clock, or commits a full group

    def flush(self) -> None:
        """Wait until every submitted entry is committed (raises a failed append's error)."""
        if not self.sync:
            cv = self._cv
            with cv:
                self._flushing += 1
                cv.notify_all()
                try:
                    while self._uncommitted and self._thread is not None and self._thread.is_alive():
                        cv.wait(1.0)
                finally:
                    self._flushing -= 1
        self._raise()

    def close(self) -> None:
        """Append what is queued, stop the thread; raises a failed append's error."""
        if self._thread is not None and self._thread.is_alive():
            with self._cv:
                self._closing = True
                self._cv.notify_all()
            self._thread.join()
            atexit.unregister(self._close_at_exit)
        self._raise()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except RuntimeError as exc:
            print(f"gradledger: {exc}", file=sys.stderr)


class Tracker:
    """Records one run into a ledger. Build it with :func:`attach`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        ledger: Any,
        run: str,
        policy: Policy | None = None,
        labels: Any = None,
        loss_reduction: str = "mean",
        dp: DPConfig | None = None,
        seed: int | None = None,
        criterion: nn.Module | None = None,
        update_norms: bool = True,
        max_pending: int = MAX_PENDING,
        sketch: Any = None,
        states: Any = None,
    ) -> None:
        # The query aggregates are an indexer: importing it registers it, so they are maintained in the same
        # transaction as every step entry from the first step on (not back-filled by a later query).
        import audit.aggregates  # noqa: F401

        from .engine import (
            GradNormEngine,  # written alongside; imported here so `import instrument` stays light
        )

        if not isinstance(run, str) or not run:
            raise ValueError("attach: run must be a non-empty string")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"attach: loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if criterion is not None:
            if not isinstance(criterion, SUPPORTED_CRITERIA):
                names = ", ".join(c.__name__ for c in SUPPORTED_CRITERIA)
                raise TypeError(
                    f"attach: criterion {type(criterion).__name__} is not supported for per-sample losses "
                    f"(supported: {names}); pass criterion=None to record no losses"
                )
            if getattr(criterion, "reduction", loss_reduction) != loss_reduction:
                raise ValueError(
                    f"attach: criterion has reduction={criterion.reduction!r} but loss_reduction={loss_reduction!r}"
                )
        if policy is not None and labels is None:
            raise ValueError(
                "attach: a routing policy needs labels=<Manifest> to look up each example's provenance"
            )
        self.dist = _dist.context_for(model)
        if sketch is not None and self.dist is not None:
            raise NotImplementedError("attach: gradient sketches are not supported under DDP yet")
        self.sketcher, self.states = sketch, states  # instrument.sketch.Sketcher / StateStore, or None
        if (self.dist is None or self.dist.is_writer) and ledger is None:
            raise ValueError("attach: ledger is required (under DDP: on rank 0, the ledger writer)")

        self.model, self.optimizer, self.ledger, self.run = model, optimizer, ledger, run
        # layer names are relative to the wrapped module under (Distributed)DataParallel, as in the engine
        wrappers = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        self.base: nn.Module = model.module if isinstance(model, wrappers) else model
        self.labels, self.policy, self.criterion = labels, policy, criterion
        self.loss_reduction = loss_reduction
        self.track_updates = update_norms
        self.engine = GradNormEngine(model, loss_reduction=loss_reduction)
        self.layers: list[str] = list(self.engine.layer_names)
        self.layer_param_names = layer_parameters(self.base, self.layers)
        self.layer_params: list[list[nn.Parameter]] = [
            list(self.layer_param_names[n].values()) for n in self.layers
        ]
        self._flat_params: list[torch.Tensor] = [p for ps in self.layer_params for p in ps]
        self._before: list[torch.Tensor] | None = None  # parameter copies for ||Δθ_l|| (see _snapshot)
        try:
            self.device = next(p.device for ps in self.layer_params for p in ps)
        except StopIteration:
            raise ValueError("attach: the model has no trainable parameters") from None
        self.bound: BoundPolicy | None = policy.bind(self.layers) if policy is not None else None
        n_rules = 0 if self.bound is None else len(self.bound.table)
        self._rule_dtype = "<i1" if n_rules < 1 << 7 else "<i2" if n_rules < 1 << 15 else "<i4"
        self._rule_cache: dict[str, int] = {}
        self._ones_row = np.ones(len(self.layers), dtype=np.float32)
        self._ones: dict[int, np.ndarray] = {}
        # step v 3: ids through the run's example table, weights by rule from the run entry (ledger.records)
        self._steps = StepEncoder(
            self.layers, self.bound.table if self.bound is not None else self._ones_row[None]
        )

        self.mechanism: GaussianMechanism | None = None
        if dp is not None:
            if dp.seed is None and seed is not None:
                dp = dataclasses.replace(dp, seed=seed)
            self.mechanism = GaussianMechanism(
                dp, [p for ps in self.layer_params for p in ps], loss_reduction
            )

        self._ddp_sync: bool | None = None  # DDP's require_backward_grad_sync, saved while DP owns the sync
        if self.dist is not None and loss_reduction == "sum" and self.mechanism is None:
            _dist.install_sum_hook(model)  # type: ignore[arg-type]

        def record_run() -> tuple[int | None, int]:
            for r in _run_names(ledger):
                if r == run:
                    raise ValueError(
                        f"attach: run {run!r} already exists in this ledger; pick a new run name"
                    )
            policy_seq: int | None = policy.record(ledger) if policy is not None else None
            self.policy_seq = policy_seq
            return policy_seq, _seq(ledger.append("run", self._run_body(seed)))

        self.policy_seq = None
        self.policy_seq, self.run_seq = record_run() if self.dist is None else self.dist.on_writer(record_run)
        self.step_index = 0
        self._epoch = 0
        self._open: _Micro | None = None
        self._pending = _Pending()
        self._handles: list[Any] = []
        self._paused = False
        self._closed = False
        writes = self.dist is None or self.dist.is_writer
        self.writer = StepWriter(ledger if writes else None, max_pending if writes else 0)
        self._install()

    # ----- run entry ------------------------------------------------------------------------------
    def _run_body(self, seed: int | None) -> dict[str, Any]:
        pid_to_name = {id(p): n for n, p in self.base.named_parameters()}
        arch_layers = []
        for name in self.layers:
            mod = self.base.get_submodule(name)
            arch_layers.append(
                {
                    "name": name,
                    "type": f"{type(mod).__module__}.{type(mod).__qualname__}",
                    "params": {pn: list(p.shape) for pn, p in self.layer_param_names[name].items()},
                }
            )
        groups = []
        for g in self.optimizer.param_groups:
            hyper = {k: _jsonable(v) for k, v in g.items() if k != "params"}
            groups.append({"hyper": hyper, "params": [pid_to_name.get(id(p), "?") for p in g["params"]]})
        body: dict[str, Any] = {
            "run": self.run,
            "architecture": {
                "root": f"{type(self.base).__module__}.{type(self.base).__qualname__}",
                "layers": arch_layers,
                "trainable_parameters": sum(p.numel() for ps in self.layer_params for p in ps),
                "dtype": str(self.layer_params[0][0].dtype).removeprefix("torch."),
                "device": self.device.type,
            },
            "optimizer": {
                "class": f"{type(self.optimizer).__module__}.{type(self.optimizer).__qualname__}",
                "param_groups": groups,
            },
            "seed": seed,
            "loss_reduction": self.loss_reduction,
            "criterion": None if self.criterion is None else type(self.criterion).__name__,
            "policy_seq": self.policy_seq,
            "policy_digest": None if self.policy is None else self.policy.digest,
            "manifest_seq": None if self.labels is None else int(self.labels.seq),
            "manifest_digest": None if self.labels is None else self.labels.digest,
            "manifest_name": None if self.labels is None else self.labels.name,
            "dp": None if self.mechanism is None else self.mechanism.describe(),
            "update_norms": self.track_updates,
            "versions": _versions(),
            **self._steps.run_fields(),
        }
        if self.dist is not None:
            body["distributed"] = self.dist.describe()
        if self.sketcher is not None:  # projection seed, k and digests: anyone can regenerate the projections
            body["sketch"] = self.sketcher.body()
        return body

    # ----- hooks ----------------------------------------------------------------------------------
    def _install(self) -> None:
        self._handles = [
            self.model.register_forward_pre_hook(self._on_model_input, with_kwargs=True),
            self.optimizer.register_step_pre_hook(self._on_step_pre),
            self.optimizer.register_step_post_hook(self._on_step_post),
        ]
        if self.criterion is not None:
            self._handles.append(self.criterion.register_forward_hook(self._on_criterion))
        if self.dist is not None and self.mechanism is not None and self._ddp_sync is None:
            # the engine adds clipped gradients by hand (outside DDP's hooks); the tracker reduces them itself
            self._ddp_sync = bool(getattr(self.model, "require_backward_grad_sync", True))
            setattr(self.model, "require_backward_grad_sync", False)  # noqa: B010 - DDP attribute

    def _uninstall(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._ddp_sync is not None:
            setattr(self.model, "require_backward_grad_sync", self._ddp_sync)  # noqa: B010
            self._ddp_sync = None

    def _on_model_input(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        micro = self._open
        if micro is None or micro.ended:
            return
        x = _first_tensor(args, kwargs)
        if x is not None and x.dim() > 0 and x.shape[0] != len(micro.ids):
            raise ValueError(
                f"tracker.batch got {len(micro.ids)} example ids but the model input batch has {x.shape[0]} rows"
            )

    def _on_criterion(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        micro = self._open
        if micro is None or micro.ended or len(args) < 2:
            return
        inp, target = args[0], args[1]
        n = len(micro.ids)
        rows = inp.shape[0] if inp.dim() else 0
        if rows == 0 or rows % n:
            raise ValueError(
                f"tracker.batch got {n} example ids but the criterion's input has {rows} rows "
                f"(expected {n}, or a multiple of {n} for outputs flattened batch-major)"
            )
        cfg = _LossConfig.of(module)
        inp_d, tgt_d = inp.detach(), target.detach()  # clones of detached tensors record no graph
        if (  # see _DEFER_ELEMS; under autocast the recomputation must run here, in the same context
            inp_d.device.type == "cpu"
            and inp_d.numel() <= _DEFER_ELEMS
            and not torch.is_autocast_enabled("cpu")
        ):
            micro.criterion_out = None
            micro.criterion_job = functools.partial(
                _criterion_values, cfg.detached(), inp_d.clone(), tgt_d.clone(), n
            )
        else:  # _criterion_values runs under no_grad
            micro.criterion_job = None
            logp = _saved_log_probs(module, inp_d, tgt_d, output)
            micro.criterion_out = _criterion_values(cfg, inp_d, tgt_d, n, logp)

    # ----- user API ---------------------------------------------------------------------------------
    def epoch(self, n: int) -> None:
        """Set the epoch recorded on following steps."""
        self._epoch = int(n)

    @contextlib.contextmanager
    def batch(self, example_ids: Sequence[Any], *, epoch: int | None = None) -> Iterator[Tracker]:
        """Record the forward/backward inside as one micro-batch of ``example_ids`` (see module docstring)."""
        self._check_open()
        if epoch is not None:
            self._epoch = int(epoch)
        if self._paused:
            yield self
            return
        if self._open is not None:
            raise RuntimeError("tracker.batch contexts cannot be nested")
        ids = [str(i) for i in example_ids]
        if not ids:
            raise ValueError("tracker.batch: example_ids is empty")
        if self.mechanism is not None and self._pending.micros:
            raise NotImplementedError(
                "DP with gradient accumulation is not supported: call optimizer.step() once per tracker.batch"
            )
        weights, rules = self._route(ids)
        micro = _Micro(ids=ids, weights=weights, rules=rules, epoch=self._epoch)
        w_t = None if self.bound is None else torch.from_numpy(weights).to(self.device)
        max_norm = None if self.mechanism is None else self.mechanism.config.max_grad_norm
        self.engine.begin(len(ids), weights=w_t, max_grad_norm=max_norm)
        self._open = micro
        try:
            yield self
        except BaseException:
            if not micro.ended:
                with contextlib.suppress(Exception):
                    self.engine.end()  # disarm; the micro-batch is discarded
            self._open = None
            raise
        if not micro.ended:
            self._end_micro(micro)
            self._pending.micros.append(micro)
        self._open = None

    def checkpoint(self, tag: str) -> int:
        """Append a ``checkpoint`` entry with per-layer and state-dict sha256 digests; return its seq.

        Under DDP every rank calls it; rank 0 appends and every rank gets the seq.
        """
        self._check_open()
        if self.dist is not None:
            return self.dist.on_writer(lambda: self._checkpoint(tag))
        return self._checkpoint(tag)

    def _checkpoint(self, tag: str) -> int:
        self.writer.flush()  # the steps before this checkpoint precede it in the ledger
        body: dict[str, Any] = {
            "run": self.run,
            "run_seq": self.run_seq,
            "tag": str(tag),
            "step": self.step_index,
        }
        body.update(model_digests(self.base, self.layers))
        if self.states is not None:  # weights beside the ledger, addressed (and later verified) by digest
            self.states.put(self.base.state_dict())
        if self.mechanism is not None:
            eps = self.mechanism.eps
            if self.mechanism.eps_step != self.step_index - 1 and self.step_index > 0:
                eps = self.mechanism.refresh(self.step_index - 1)
            body["dp"] = {
                "eps": eps,
                "delta": self.mechanism.config.delta,
                "steps": self.mechanism.accountant.steps,
            }
        return _seq(self.ledger.append("checkpoint", body))

    def pause(self) -> None:
        """Stop instrumenting: every hook is removed, so training runs as plain PyTorch."""
        self._check_open()
        if self._open is not None or self._pending.micros:
            raise RuntimeError("tracker.pause: finish the pending optimizer step first")
        self.writer.flush()
        if not self._paused:
            self._uninstall()
            self._before = None
            self.engine.pause()
            if self.sketcher is not None:
                self.sketcher.pause()
            self._paused = True

    def resume(self) -> None:
        self._check_open()
        if self._paused:
            self.engine.resume()
            if self.sketcher is not None:
                self.sketcher.resume()
            self._install()
            self._paused = False

    def close(self, tag: str = "final") -> int:
        """Append the final checkpoint entry and remove all hooks; return the checkpoint's seq."""
        self._check_open()
        if self._pending.micros:
            n = sum(len(m.ids) for m in self._pending.micros)
            warnings.warn(
                f"tracker.close: {n} examples were run through tracker.batch without an optimizer.step(); "
                "they are not a step and are not recorded",
                stacklevel=2,
            )
            self._pending = _Pending()
        try:
            seq = self.checkpoint(tag)
        finally:
            self._uninstall()
            self._before = None
            self.engine.remove()
            if self.sketcher is not None:
                self.sketcher.remove()
            self._closed = True
            self.writer.close()
        return seq

    def flush(self) -> None:
        """Wait until every recorded step is committed to the ledger (raises a failed append's error)."""
        self.writer.flush()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._closed:
            self.close()

    # ----- internals ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"tracker for run {self.run!r} is closed")

    def _route(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        labels = self.labels
        if self.bound is None:
            if labels is not None:
                for i in ids:
                    if i not in labels:
                        raise KeyError(
                            f"example id {i!r} is not in manifest {labels.name!r} (seq {labels.seq})"
                        )
            ones = self._ones.get(len(ids))
            if ones is None:  # one read-only all-ones [B, L] array per batch size, shared by the steps
                if len(self._ones) > 64:
                    self._ones.clear()
                ones = self._ones[len(ids)] = np.tile(self._ones_row, (len(ids), 1))
                ones.flags.writeable = False
            return ones, None
        cache = self._rule_cache
        rules = np.empty(len(ids), dtype=np.int32)
        for k, i in enumerate(ids):
            r = cache.get(i)
            if r is None:
                if i not in labels:
                    raise KeyError(f"example id {i!r} is not in manifest {labels.name!r} (seq {labels.seq})")
                r = cache[i] = self.bound.policy.match(labels[i])
            rules[k] = r
        return self.bound.table[rules], rules

    def _end_micro(self, micro: _Micro) -> None:
        res = self.engine.end()
        # the step entry reads these later, on the writer thread: the engine allocates new result tensors at
        # every begin(), so keeping references is enough (tests/test_tracker*.py compare every step's values)
        shape = tuple(res.norms.shape)
        if shape != (len(micro.ids), len(self.layers)):
            raise RuntimeError(
                f"engine returned norms of shape {shape}, expected ({len(micro.ids)}, {len(self.layers)})"
            )
        micro.norms_t = _host(res.norms)
        if res.clip_factors is not None:
            micro.clip_t = _host(res.clip_factors)
        if micro.criterion_out is not None:  # recomputed at once (not deferred): on the host now
            losses, margins = micro.criterion_out
            micro.criterion_out = (_host(losses), None if margins is None else _host(margins))
        micro.ended = True

    def _param_group_lr(self) -> list[float | None]:
        lr_of: dict[int, float] = {}
        for g in self.optimizer.param_groups:
            lr = g.get("lr")
            for p in g["params"]:
                lr_of[id(p)] = (
                    float(lr.item() if isinstance(lr, torch.Tensor) else lr) if lr is not None else math.nan
                )
        return [lr_of.get(id(ps[0])) if ps else None for ps in self.layer_params]

    def _on_step_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        open_micro = self._open
        if open_micro is not None and not open_micro.ended:
            self._end_micro(open_micro)
            self._pending.micros.append(open_micro)
        pending = self._pending
        if not pending.micros:
            return  # an optimizer step with no tracked batch: nothing to record
        if self.dist is not None:
            self._distributed_step(pending)
        elif self.mechanism is not None:
            b = len(pending.micros[0].ids)
            self.mechanism.resolve_sample_rate(b, None if self.labels is None else len(self.labels))
            self.mechanism.add_noise(b)
        pending.lr = self._param_group_lr()
        if self.track_updates and (self.dist is None or self.dist.is_writer):
            self._snapshot()
            pending.snapped = True

    def _snapshot(self) -> None:
        """Copy the trainable parameters into buffers kept from step to step, for ``||Δθ_l||``.

        Kept, not cloned per step: on the CPU a fresh parameter-sized allocation per step cost far more than
        the copy (new pages from the OS each time: ~600 page faults, 0.7 ms per step for the MLP at B=64,
        against 0.16 ms for copying into the kept buffers). The peak is unchanged (the per-step clones were
        alive during ``optimizer.step()``, when parameters and gradients are too); between steps the buffers
        hold one extra copy of the trainable parameters. ``pause()`` and ``close()`` release them.
        """
        params, buf = self._flat_params, self._before
        if buf is None or any(
            b.shape != p.shape or b.dtype != p.dtype or b.device != p.device
            for b, p in zip(buf, params, strict=True)
        ):
            buf = self._before = [torch.empty_like(p.detach()) for p in params]
        with torch.no_grad():
            torch._foreach_copy_(buf, params)

    def _distributed_step(self, pending: _Pending) -> None:
        """DDP: check the ranks agree, reduce DP gradients (noise once, on rank 0), gather the rows to rank 0."""
        assert self.dist is not None
        local = [len(m.ids) for m in pending.micros]
        sizes = self.dist.all_gather(local)
        _dist.check_sizes(sizes, self.loss_reduction, self.mechanism is not None)
        if self.mechanism is not None:
            global_rows = sum(s[0] for s in sizes)
            self.mechanism.resolve_sample_rate(global_rows, None if self.labels is None else len(self.labels))
            if self.dist.is_writer:
                self.mechanism.add_noise(local[0])  # N [/ b_0]: scaled to the global mean by the reduction
            self.dist.reduce_dp_grads(self.mechanism.params, local[0], global_rows, self.loss_reduction)
        for m in pending.micros:
            m.resolve()
        rows = [
            (m.ids, m.norms, m.weights, m.rules, m.losses, m.margins, m.clip, m.epoch) for m in pending.micros
        ]
        gathered = self.dist.gather_to_writer(rows)
        if gathered is None:  # not the writer: nothing to record here
            return
        merged = []
        for j in range(len(local)):  # micro-batch by micro-batch, rank-major rows
            parts = [g[j] for g in gathered]

            def cat(k: int, parts: list[Any] = parts) -> np.ndarray | None:
                arrs = [p[k] for p in parts]
                return None if any(a is None for a in arrs) else np.concatenate(arrs)

            merged.append(
                _Micro(
                    ids=[i for p in parts for i in p[0]], weights=cat(2), rules=cat(3),  # type: ignore[arg-type]
                    epoch=parts[0][7], norms=cat(1), losses=cat(4), margins=cat(5), clip=cat(6), ended=True,
                )
            )  # fmt: skip
        pending.micros = merged

    def _on_step_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending = self._pending
        if not pending.micros:
            return
        update: list[float] | None = None
        if pending.snapped and self._before is not None:
            with torch.no_grad():
                before = self._before
                torch._foreach_sub_(before, self._flat_params)  # before := before - after, in place
                norms = torch.stack(torch._foreach_norm(before)).tolist()  # one sync
            sq = [x * x for x in norms]  # float64, as .double().square() would give
            update, k = [], 0
            for ps in self.layer_params:
                update.append(math.sqrt(math.fsum(sq[k : k + len(ps)])))
                k += len(ps)
        eps = None
        writes = self.dist is None or self.dist.is_writer
        if self.mechanism is not None and writes:
            eps = self.mechanism.account(self.step_index)
        if writes:
            extra = None
            if self.sketcher is not None:  # read on this thread, before the next forward overwrites them
                extra = self.sketcher.collect(expected_rows=sum(len(m.ids) for m in pending.micros))
            m = self.mechanism
            dp_state = None if m is None else (m.eps_step, m.sample_rate)
            # the entry is built (and encoded, hashed, appended) on the writer thread: everything it reads is
            # captured here or no longer changed by this thread (the step's micro-batches, lr, update norms)
            self.writer.submit_lazy(
                functools.partial(
                    self._step_entry,
                    pending.micros,
                    pending.lr,
                    update,
                    eps,
                    extra,
                    self.step_index,
                    dp_state,
                )
            )
        self._pending = _Pending()
        self.step_index += 1

    def _step_entry(
        self,
        micros: list[_Micro],
        lr: list[float | None] | None,
        update: list[float] | None,
        eps: float | None,
        extra: dict[str, np.ndarray] | None,
        step: int,
        dp_state: tuple[int | None, float | None] | None,
    ) -> tuple[str, dict[str, Any], dict[str, np.ndarray], int]:
        """The ``step`` entry ``(kind, body, payloads, v)``; runs on the writer thread (see StepWriter)."""
        for m in micros:
            m.resolve()
        ids = [i for m in micros for i in m.ids]
        norms = np.concatenate([m.norms for m in micros if m.norms is not None]).astype(
            np.float32, copy=False
        )
        weights = np.concatenate([m.weights for m in micros]).astype(np.float32, copy=False)
        payloads: dict[str, np.ndarray] = {"grad_norms": norms, **(extra or {})}
        flags: dict[str, list[int]] = {}
        if all(m.losses is not None for m in micros):
            losses = np.concatenate([m.losses for m in micros if m.losses is not None]).astype(np.float32)
            payloads["losses"] = losses
            bad = np.flatnonzero(~np.isfinite(losses))
            if bad.size:
                flags["nan_loss"] = bad.tolist()
        if all(m.margins is not None for m in micros):
            payloads["margins"] = np.concatenate([m.margins for m in micros if m.margins is not None]).astype(
                np.float32
            )
        if self.bound is not None:
            payloads["rules"] = np.concatenate([m.rules for m in micros if m.rules is not None]).astype(
                self._rule_dtype
            )
        if self.mechanism is not None and all(m.clip is not None for m in micros):
            payloads["clip"] = np.concatenate([m.clip for m in micros if m.clip is not None]).astype(
                np.float32
            )
        bad_norm = np.flatnonzero(~np.isfinite(norms).all(axis=1))
        if bad_norm.size:
            flags["nonfinite_grad_norm"] = bad_norm.tolist()
        body: dict[str, Any] = {
            "run": self.run,
            "run_seq": self.run_seq,
            "step": step,
            "epoch": micros[-1].epoch,
            "example_ids": ids,
            "layers": self.layers,
            "micro_batches": [len(m.ids) for m in micros],
            "lr": lr,
            "update_norms": update,
            "policy_seq": self.policy_seq,
            "flags": flags,
        }
        if self.mechanism is not None and dp_state is not None:
            cfg = self.mechanism.config
            body["dp"] = {
                "eps": eps,
                "eps_step": dp_state[0],
                "delta": cfg.delta,
                "noise_multiplier": cfg.noise_multiplier,
                "max_grad_norm": cfg.max_grad_norm,
                "sample_rate": dp_state[1],
                "accountant": cfg.accountant,
            }
        return "step", *self._steps.encode(body, payloads, weights), STEP_VERSION


def _run_names(ledger: Any) -> list[str]:
    return [e.body.get("run") for e in ledger.entries(kind="run", payloads=False)]


def attach(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    ledger: Any,
    run: str,
    policy: Policy | None = None,
    labels: Any = None,
    loss_reduction: str = "mean",
    dp: DPConfig | None = None,
    seed: int | None = None,
    criterion: nn.Module | None = None,
    update_norms: bool = True,
    max_pending: int = MAX_PENDING,
    sketch: Any = None,
    states: Any = None,
) -> Tracker:
    """Instrument ``model`` / ``optimizer`` and append the ``run`` entry; see the module docstring.

    ``labels``: the dataset :class:`ledger.provenance.Manifest` (required with a policy; every example id must be
    in it). ``seed``: recorded in the run entry and, when ``dp.seed`` is unset, used as the DP noise seed
    (gradledger does not seed torch for you). ``criterion``: the loss module the loop calls, for per-sample
    losses and margins. ``update_norms=False``: skip ``||Δθ_l||`` (saves a kept parameter copy and its passes per
    step). ``max_pending``: at most this many steps wait for the background writer (see :class:`StepWriter`:
    group commit, and what a crash loses); 0 = one synchronous append inside ``optimizer.step()``.
    ``sketch``: an :class:`instrument.sketch.Sketcher` whose per-sample gradient sketches go into each step
    entry (for ``gradledger influence``). ``states``: an :class:`instrument.sketch.StateStore` that keeps each
    checkpoint's weights beside the ledger, addressed by the checkpoint entry's digest.
    """
    return Tracker(
        model, optimizer, ledger=ledger, run=run, policy=policy, labels=labels, loss_reduction=loss_reduction,
        dp=dp, seed=seed, criterion=criterion, update_norms=update_norms, max_pending=max_pending,
        sketch=sketch, states=states,
    )  # fmt: skip
