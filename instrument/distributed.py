"""DistributedDataParallel support for the tracker: one ledger step entry per optimizer step, written by rank 0.

Why one writer rank: a step entry must hold the *global* batch (every rank's examples) so that a query, a
memorisation ranking or an export sees the same step whatever the number of processes. Gathering each rank's
small per-step record (ids, norms [b, L], weights, losses...) to rank 0 over ``torch.distributed`` costs one
collective per step and keeps the ledger's writer single (one process appends; the sequencer still admits
ingest jobs or signers writing beside it). Appending one partial entry per rank would split a step over
several entries that a reader would have to re-assemble and that a crash could leave half-written.

What "the same as one process" means (``docs/scaling.md`` has the derivation):

* The global batch of a step is the concatenation, micro-batch by micro-batch, of rank 0's rows, then rank 1's,
  ... (rank-major within each micro-batch). ``micro_batches`` records the global micro-batch sizes.
* Norms are of each sample's *own* loss (Opacus convention). Under ``loss_reduction="mean"`` the engine scales
  each rank's row gradients by its local rows, which gives the same per-sample number as one process scaling by
  the global rows: no correction is needed.
* The applied gradient equals one process's on the global batch: under "mean" DDP's all-reduce average is the
  global-batch mean when every rank runs the same number of rows per micro-batch (checked at every step: a clear
  error otherwise); under "sum" the tracker registers a summing communication hook (DDP would average).
* DP: DDP's own gradient sync is switched off while the tracker is attached (the engine adds clipped gradients
  by hand, outside DDP's hooks); at ``optimizer.step()`` rank 0 adds the Gaussian noise ONCE from the run's seeded
  generator, each rank scales its clipped local gradient from its local mean to its share of the global mean
  (``b_r / B``), and one summing all-reduce gives every rank ``(Σ_i c_i w_il ∇ℓ_i + N) / B`` exactly as one
  process computes it (``Σ ... + N`` under "sum"). Uneven local batches are exact here too.

Collectives: every rank must call ``attach``, ``optimizer.step()``, ``checkpoint`` and ``close`` together. A rank
that dies leaves the others blocked in a collective until the process group's timeout (set it in
``init_process_group(timeout=...)``) or until ``torchrun`` tears the job down; the ledger keeps every step rank 0
committed, each complete (one transaction per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")

WRITER_RANK = 0


class DistributedError(RuntimeError):
    """The ranks disagree about a step (different micro-batch counts or sizes), or rank 0 failed."""


@dataclass
class DistContext:
    """This process's place in the job, and the group used for the small per-step object collectives."""

    rank: int
    world_size: int
    backend: str
    object_group: Any  # gloo group for CPU objects when the default backend is not gloo, else None

    @property
    def is_writer(self) -> bool:
        return self.rank == WRITER_RANK

    def describe(self) -> dict[str, Any]:
        """Recorded in the ``run`` entry."""
        return {"world_size": self.world_size, "backend": self.backend, "writer_rank": WRITER_RANK}

    # ----- collectives -----------------------------------------------------------------------------------
    def all_gather(self, obj: T) -> list[T]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.object_group)
        return out

    def gather_to_writer(self, obj: T) -> list[T] | None:
        out: list[Any] | None = [None] * self.world_size if self.is_writer else None
        dist.gather_object(obj, out, dst=WRITER_RANK, group=self.object_group)
        return out

    def on_writer(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the writer rank only and hand its result (or its failure) to every rank.

        Every rank raises when the writer's ``fn`` raised, so no rank goes on alone into a collective.
        """
        box: list[Any] = [None]
        err: BaseException | None = None
        if self.is_writer:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # re-raised below on the writer, as a DistributedError elsewhere
                err = exc
                box[0] = ("error", f"{type(exc).__name__}: {exc}")
        dist.broadcast_object_list(box, src=WRITER_RANK, group=self.object_group)
        status, value = box[0]
        if err is not None:
            raise err
        if status != "ok":
            raise DistributedError(f"gradledger: rank {WRITER_RANK} (the ledger writer) failed: {value}")
        return value

    # ----- gradients -------------------------------------------------------------------------------------
    @torch.no_grad()
    def reduce_dp_grads(
        self, params: Sequence[nn.Parameter], local_rows: int, global_rows: int, loss_reduction: str
    ) -> None:
        """Sum the ranks' clipped (and, on rank 0, noised) gradients into the global-batch gradient.

        Before: rank r holds ``g_r = S_r / b_r`` ("mean") or ``S_r`` ("sum"), S_r = its clipped, routed sum, with
        rank 0's noise already added at the same scale. After (every rank): ``(Σ_r S_r + N) / B`` or ``Σ_r S_r + N``.
        """
        grads = []
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        if loss_reduction == "mean":
            flat.mul_(local_rows / global_rows)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
            g.copy_(reduced)


def _sum_hook(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook that sums instead of averaging (``loss_reduction="sum"``)."""
    fut = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


# DDP checks the hook's annotations as objects; with postponed annotations they would be strings
_sum_hook.__annotations__ = {
    "state": object,
    "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


def install_sum_hook(model: nn.parallel.DistributedDataParallel) -> None:
    """Make DDP's gradient all-reduce a sum, so a "sum"-reduced loss trains as in one process."""
    try:
        model.register_comm_hook(None, _sum_hook)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(
            "attach: loss_reduction='sum' under DistributedDataParallel needs gradledger's summing "
            f"communication hook, but the model refused it ({exc}); register no comm hook of your own, or use "
            "loss_reduction='mean'"
        ) from exc


def context_for(model: nn.Module) -> DistContext | None:
    """A :class:`DistContext` when ``model`` is DDP-wrapped in an initialised process group of > 1 rank."""
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    world = dist.get_world_size()
    if world == 1:
        return None
    backend = str(dist.get_backend())
    group = None if backend == "gloo" else dist.new_group(backend="gloo")
    return DistContext(rank=dist.get_rank(), world_size=world, backend=backend, object_group=group)


def check_sizes(sizes: list[list[int]], loss_reduction: str, dp: bool) -> None:
    """Every rank ran the same number of micro-batches; under "mean" without DP, of equal sizes (see module doc)."""
    counts = {len(s) for s in sizes}
    if len(counts) != 1:
        raise DistributedError(
            f"gradledger: the ranks ran different numbers of tracker.batch contexts before optimizer.step(): "
            f"{[len(s) for s in sizes]} (rank order); every rank must run the same micro-batches per step"
        )
    if loss_reduction == "mean" and not dp:
        for j, col in enumerate(zip(*sizes, strict=True)):
            if len(set(col)) != 1:
                raise DistributedError(
                    f"gradledger: micro-batch {j} has {list(col)} rows on the ranks (rank order): DDP averages "
                    "the ranks' mean gradients, which equals the global-batch mean only for equal local batches; "
                    "give every rank the same number of examples (e.g. drop_last=True)"
                )
