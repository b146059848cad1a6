"""Kernel table and the data a kernel sees.

A *kernel* turns what the engine captured for one layer during one forward/backward pass (the inputs of
each call and the gradient w.r.t. each call's outputs) into

* ``norm_sq``: each sample's squared gradient norm over the layer's own trainable parameters, computed
  from the raw backprops (the engine applies the loss-reduction scale), and
* ``grads(scale)``: the layer's parameter gradients ``Σ_i scale_i · g_i`` where ``g_i`` is row ``i``'s
  contribution. ``scale=None`` means all ones, i.e. exactly what plain autograd would accumulate.

Kernels are hand-written (no maintained library computes per-layer norms *and* routed gradients without
materialising every per-sample gradient) and registered per layer type, Opacus ``grad_sample/`` style:
adding a layer type touches one file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

GradsFn = Callable[[Tensor | None], dict[str, Tensor]]


@dataclass
class Call:
    """One call of a layer inside an armed forward pass.

    ``args``/``kwargs`` are the call's inputs (kept by reference, never copied; autograd would keep the
    layer input alive for its own weight gradient anyway). ``grad_outputs`` holds the gradient w.r.t. each
    tapped (floating-point) output leaf: ``None`` when that output did not reach the loss. Only the
    outputs' metadata is kept, so no extra activation stays alive.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out_spec: Any
    n_leaves: int
    tapped: list[int]
    out_meta: list[tuple[torch.Size, torch.dtype, torch.device]]
    grad_outputs: list[Tensor | None] = field(default_factory=list)
    done: bool = False
    saved: Any = None  # what the kernel's ``capture`` took from the call's output at forward (small tensors)

    @property
    def input(self) -> Tensor:
        x = self.args[0] if self.args else None
        if not isinstance(x, Tensor):
            raise TypeError("expected the layer's first positional argument to be a tensor")
        return x

    def grad(self, j: int = 0) -> Tensor:
        """Gradient w.r.t. tapped output ``j`` (zeros if it did not reach the loss)."""
        g = self.grad_outputs[j] if j < len(self.grad_outputs) else None
        if g is None:
            shape, dtype, device = self.out_meta[j]
            return torch.zeros(shape, dtype=dtype, device=device)
        return g

    @property
    def grad_output(self) -> Tensor:
        return self.grad(0)

    def release(self) -> None:
        """Drop the captured inputs and backprops once the kernel has used them.

        The autograd graph keeps this object alive (through the ``_Tap`` node) until the graph itself is
        freed, i.e. past the end of backward; without this every layer's input and output gradient would
        stay resident until then, where plain autograd frees each as soon as its node has run.
        """
        self.args, self.kwargs, self.grad_outputs, self.saved = (), {}, [], None


@dataclass
class LayerGrads:
    """A kernel's answer for one layer and one pass: squared norms [b] and a deferred gradient maker."""

    norm_sq: Tensor
    grads: GradsFn


Kernel = Callable[[nn.Module, list[Call], "Request"], LayerGrads]


@dataclass(frozen=True)
class Request:
    """What the engine will do with a kernel's answer.

    ``deferred=False``: ``grads(scale)`` is called once, right away, with ``scale`` (routing weights or
    None), so a kernel that materialises per-sample gradients chunk by chunk may fold the weighted sum
    into the same pass. ``deferred=True`` (per-sample clipping): the scale is known only after every layer's
    norm, so ``grads`` must keep what it needs (activations and backprops) and be callable later.
    """

    scale: Tensor | None = None
    deferred: bool = False


# Budget (elements) for a chunk of materialised per-sample gradients; bounds a layer's extra memory
# (2 MiB in float32: about L2-sized, so the norm and sum passes read the chunk back from cache).
MATERIALISE_BUDGET = 1 << 19
# On an accelerator a chunk is a handful of kernel launches whatever its size, and the budgets above (tuned
# for a CPU's L2) made the CNN's conv layers hundreds of tiny launches: chunks there are this many times
# larger (still a bound: 64 MiB for a conv layer in float32).
ACCELERATOR_BUDGET_SCALE = 64


def budget_for(base: int, device: torch.device) -> int:
    """The chunk budget (elements) for tensors on ``device``."""
    return base if device.type == "cpu" else base * ACCELERATOR_BUDGET_SCALE


Validator = Callable[[str, nn.Module], None]
Capture = Callable[[Any], Any]

KERNELS: dict[type[nn.Module], Kernel] = {}
VALIDATORS: dict[type[nn.Module], Validator] = {}
CAPTURES: dict[type[nn.Module], Capture] = {}


def register_kernel(
    *types: type[nn.Module], validate: Validator | None = None, capture: Capture | None = None
) -> Callable[[Kernel], Kernel]:
    """Register ``fn`` as the exact kernel for modules whose type is exactly one of ``types``.

    Subclasses are *not* matched: a subclass may override ``forward`` with other maths, so it goes to the
    exact ``torch.func`` fallback instead. ``validate(name, module)`` may raise at engine construction for
    configurations the kernel cannot handle exactly (e.g. ``Embedding(sparse=True)``). ``capture(output)``
    runs on each call's output in the forward pass and its result is kept as ``Call.saved`` (e.g. the
    statistics a normalisation layer's autograd node saved, instead of recomputing them); it must keep no
    large tensor alive and may return None (the kernel then recomputes).
    """

    def deco(fn: Kernel) -> Kernel:
        for t in types:
            KERNELS[t] = fn
            if validate is not None:
                VALIDATORS[t] = validate
            if capture is not None:
                CAPTURES[t] = capture
        return fn

    return deco


def trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's *own* (non-recursive) trainable parameters, by attribute name.

    Same answer as ``named_parameters(recurse=False)`` filtered on ``requires_grad`` (first name of a
    parameter registered twice), read straight from ``_parameters``: kernels call this on every backward.
    """
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for n, p in module._parameters.items():
        if p is not None and id(p) not in seen:
            seen.add(id(p))
            if p.requires_grad:
                out[n] = p
    return out


def sq_norms(t: Tensor) -> Tensor:
    """Per-row squared L2 norm over every dim but 0, as one reduction (no t-sized temporary: on CPU a
    fresh large buffer costs page faults that can exceed the arithmetic)."""
    if t.dim() == 1:
        return t.square()
    return torch.linalg.vector_norm(t, dim=tuple(range(1, t.dim()))).square_()


def scaled_rows(t: Tensor, scale: Tensor | None) -> Tensor:
    """``t`` with row ``i`` (dim 0) multiplied by ``scale[i]``; ``t`` itself when ``scale`` is None.

    A zero weight gives exact zero rows, so a routed-out example adds exact zeros to every GEMM sum.
    """
    if scale is None:
        return t
    return t * scale.reshape((-1,) + (1,) * (t.dim() - 1)).to(t.dtype)


def weighted_sum(per_sample: Tensor, scale: Tensor | None) -> Tensor:
    """``Σ_i scale_i · per_sample[i]`` as one GEMV (all-ones when ``scale`` is None).

    Using the same GEMV for both cases keeps "example j routed out" bit-identical to "example j's loss
    times zero": the other rows are multiplied by exactly 1 and summed in the same order. ``torch.mv`` on
    the [b, n] view rather than ``tensordot`` (a Python wrapper: reshapes, then a one-row GEMM).
    """
    b = per_sample.shape[0]
    if scale is None:
        scale = torch.ones(b, dtype=per_sample.dtype, device=per_sample.device)
    return torch.mv(per_sample.reshape(b, -1).t(), scale.to(per_sample.dtype)).view(per_sample.shape[1:])


ChunkMaker = Callable[[int, int, Tensor], Tensor]


def reduce_per_sample(
    b: int,
    numel: int,
    chunk: int,
    make: ChunkMaker,
    norm_sq: Tensor,
    scale: Tensor | None,
    keep_sum: bool,
    buffered: bool = True,
) -> Tensor | None:
    """Norms and (optionally) the weighted sum of per-sample gradients materialised ``chunk`` samples at a time.

    ``make(lo, hi, out)`` returns samples ``lo:hi``'s gradients as ``[hi - lo, numel]``, written into ``out``
    (a view of one buffer reused by every chunk; an empty tensor when not ``buffered``, for makers whose op
    has no ``out=``). Adds each sample's squared norm to ``norm_sq``; returns ``Σ_i scale_i · g_i`` (flat,
    all-ones when ``scale`` is None) or None if not ``keep_sum``.

    Why one reused buffer and ``addmv_``: a fresh chunk-sized tensor per chunk costs page faults and a
    separate sum pass, which together cost as much as the batched per-sample product itself (CPU, T=32
    transformer layers); a single GEMV per chunk sums into the accumulator while the chunk is still in
    cache. The same GEMV runs with all-ones weights, so "example j routed out" stays bit-identical to
    "example j's loss times zero".
    """
    dt, dev = norm_sq.dtype, norm_sq.device
    chunk = max(1, min(b, chunk))
    buf = torch.empty(chunk * numel if buffered else 0, dtype=dt, device=dev)
    acc = torch.zeros(numel, dtype=dt, device=dev) if keep_sum else None
    w = None
    if acc is not None:
        w = torch.ones(b, dtype=dt, device=dev) if scale is None else scale.to(dt)
    for lo in range(0, b, chunk):
        hi = min(b, lo + chunk)
        ps = make(lo, hi, buf[: (hi - lo) * numel] if buffered else buf)
        norm_sq[lo:hi] += torch.linalg.vector_norm(ps, dim=1).square_()
        if acc is not None:
            assert w is not None
            acc.addmv_(ps.t(), w[lo:hi])
        del ps  # a maker without ``out=`` returns a fresh chunk: free it before making the next one
    return acc
