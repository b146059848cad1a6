"""The hook engine: exact per-sample, per-layer gradient norms and depth-selective routing in one backward.

How it works (and why this way):

* A *layer* is a module that directly owns trainable parameters (its qualified module name). Layers of a
  type in the kernel table (``instrument/kernels``) cover their own parameters; any other parametrised
  module goes to the exact ``torch.func`` fallback, which covers its whole subtree (its ``forward`` may use
  a child's parameters directly, as ``nn.MultiheadAttention`` does with ``out_proj``).
* While a window is armed (``begin`` … ``end``), each layer call runs with its own parameters swapped for
  detached aliases, so autograd builds *no* weight-gradient work for it; the call's outputs then pass
  through a tiny identity ``autograd.Function`` (``_Tap``) whose inputs include the real parameters. In
  backward, ``_Tap`` receives the layer's backprops, hands them on unchanged (so earlier layers get the
  exact, unrouted backward signal), and has the layer's kernel compute the per-sample norms and the
  routed parameter gradient ``Σ_i w_il·(row-i gradient)``: the same GEMMs as a normal backward, with rows
  scaled. The gradients are returned *through autograd*, so ``.grad`` accumulates exactly as in plain
  PyTorch (gradient accumulation, ``AccumulateGrad`` hooks, later DDP bucketing).
* With ``max_grad_norm`` (DP), a sample's clip factor needs every layer's norm, so the kernels keep their
  inputs and the gradients are formed in an end-of-backward callback (``queue_callback``) and added to
  ``.grad`` by hand.
* A parameter hook checks that the gradient autograd accumulates is exactly the one ``_Tap`` returned:
  a parameter used outside its layer's call (weights tied through ``F.linear``, a parent using a child's
  weight) would otherwise get an unrouted, un-normed contribution, so that raises instead.

Scaling convention (Opacus's): ``norms[i, l]`` is the norm of the gradient of sample i's *own* loss, i.e.
the row gradient × b under ``loss_reduction="mean"`` (b = rows in the forward pass). Parameter gradients:
``.grad += Σ_i c_i·w_il·∇ℓ_i / b`` for "mean" (``Σ_i c_i·w_il·∇ℓ_i`` for "sum"), which with ``w=1, c=1`` is
plain autograd's gradient. This is what Opacus's DPOptimizer holds before adding noise (it sums clipped
per-sample gradients, adds noise, then divides by the expected batch size for "mean"). Clip factors follow
Opacus exactly: ``c_i = min(1, C / (‖(w_il·g_il)_l‖ + 1e-6))``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from .kernels import (
    CAPTURES,
    KERNELS,
    VALIDATORS,
    Call,
    Capture,
    Kernel,
    LayerGrads,
    Request,
    fallback_kernel,
    trainable,
)

__all__ = ["EngineError", "EngineResult", "GradNormEngine", "UnsupportedLayerError"]

CLIP_EPS = 1e-6  # Opacus adds this to the per-sample norm before dividing
_FIRST = [0]  # Call.tapped for a single-tensor output (shared, never mutated)
_PLAIN = Request()  # the request of an unrouted, unclipped pass (frozen, shared)


class UnsupportedLayerError(ValueError):
    """A module the engine cannot instrument exactly (raised at construction, or at forward for BN mode)."""


class EngineError(RuntimeError):
    """A window was used in a way whose per-sample numbers would not be exact."""


@dataclass(frozen=True)
class EngineResult:
    """What one ``begin``/``end`` window measured."""

    norms: Tensor  # [B, L]: each sample's own (unrouted, unclipped) gradient norm per layer
    clip_factors: Tensor | None  # [B] when max_grad_norm was given


@dataclass(eq=False)
class _Layer:
    index: int
    name: str
    module: nn.Module
    kernel: Kernel
    params: dict[str, nn.Parameter]  # trainable parameters this layer covers, by (relative) name
    subtree: bool  # fallback layers swap the parameters of their whole subtree
    capture: Capture | None = None  # the kernel's forward-time capture (kernels.base.register_kernel)
    slots: list[tuple[nn.Module, str]] = field(default_factory=list)  # (owner module, attribute) per param
    plist: list[nn.Parameter] = field(default_factory=list)  # params.values(), precomputed for the hot path
    pnames: list[str] = field(default_factory=list)  # params.keys()
    in_pass: bool = False
    calls: list[Call] = field(default_factory=list)
    pending: int = 0
    entered: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)
    deferred: LayerGrads | None = None
    expected: dict[str, Tensor] = field(default_factory=dict)


def _owner_and_attr(root: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    if "." not in qualified:
        return root, qualified
    mod_path, attr = qualified.rsplit(".", 1)
    return root.get_submodule(mod_path), attr


def _refusal(name: str, module: nn.Module) -> str | None:
    """Why a module cannot be instrumented exactly in its current state (None if it can)."""
    label = f"layer {name or '<root>'!r} ({type(module).__name__})"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.track_running_stats:
            return (
                f"{label} normalises with batch statistics even in eval mode (track_running_stats=False), "
                "so each sample's gradient depends on the other samples and per-sample gradients are not "
                "defined; use GroupNorm or LayerNorm instead"
            )
        if module.training:
            return (
                f"{label} is in training mode: BatchNorm normalises with statistics of the whole batch, so "
                "a sample's gradient depends on the other samples and per-sample gradient norms are not "
                "defined; use GroupNorm or LayerNorm (e.g. opacus.validators.ModuleValidator.fix(model)), "
                "or put the BatchNorm layers in eval mode (frozen statistics)"
            )
    if isinstance(module, nn.RNNBase):
        return (
            f"{label}: fused recurrent layers have no exact per-sample kernel here; use "
            "opacus.layers.DPLSTM / DPGRU / DPRNN (built from nn.Linear, which the engine handles exactly)"
        )
    return None


class GradNormEngine:
    """Per-sample, per-layer gradient norms, routing and per-sample clipping for ``model``.

    Raises ``UnsupportedLayerError`` at construction for modules it cannot handle exactly.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean") -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        base: nn.Module = model
        ddp_types: tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
        if isinstance(model, ddp_types):
            inner = model.module
            assert isinstance(inner, nn.Module)
            base = inner  # names without the leading "module."
        self.model = base
        self.loss_reduction = loss_reduction
        self._layers: list[_Layer] = []
        self._by_module: dict[int, _Layer] = {}
        self._checked: list[tuple[str, nn.Module]] = []  # modules whose mode is re-checked at forward
        self._discover()
        self.layer_names: list[str] = [lay.name for lay in self._layers]
        self._handles: list[RemovableHandle] = []
        self._removed = False
        self._paused = False
        # window state
        self._armed = False
        self._inside_kernel = False
        self._B = 0
        self._weights: Tensor | None = None
        self._max_norm: float | None = None
        self._norms: Tensor | None = None
        self._clip: Tensor | None = None
        self._row = 0
        self._pass_b: int | None = None
        self._pass_layers: list[_Layer] = []
        self._cb_queued = False
        self._pass_sq: dict[int, Tensor] = {}  # layer index → squared norms of this pass (raw backprops)
        self._error: EngineError | None = None
        self._attach_hooks()

    # ------------------------------------------------------------------ construction
    def _discover(self) -> None:
        claimed: list[str] = []
        owner_of: dict[int, str] = {}
        for name, module in self.model.named_modules():
            if any(name == c or name.startswith(c + ".") or c == "" for c in claimed):
                continue
            why = _refusal(name, module)
            if why is not None:
                raise UnsupportedLayerError(why)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._checked.append((name, module))
            own = trainable(module)
            if not own:
                continue
            kernel = KERNELS.get(type(module))
            if kernel is not None:
                validate = VALIDATORS.get(type(module))
                if validate is not None:
                    validate(name, module)
                params, subtree = own, False
            else:
                kernel = fallback_kernel
                params = {n: p for n, p in module.named_parameters() if p.requires_grad}
                subtree = True
                claimed.append(name)
            for pname, p in params.items():
                prev = owner_of.get(id(p))
                if prev is not None:
                    raise UnsupportedLayerError(
                        f"parameter {name + '.' + pname if name else pname!r} is shared with layer {prev!r} "
                        "(tied weights): a per-layer norm would need cross terms between two layers; untie "
                        "the weights or share them through one module called twice"
                    )
                owner_of[id(p)] = name
            lay = _Layer(len(self._layers), name, module, kernel, params, subtree)
            lay.capture = None if subtree else CAPTURES.get(type(module))
            lay.slots = (
                [_owner_and_attr(module, n) for n in params] if subtree else [(module, n) for n in params]
            )
            lay.plist, lay.pnames = list(params.values()), list(params)
            self._layers.append(lay)
            self._by_module[id(module)] = lay
        if not self._layers:
            raise UnsupportedLayerError("the model has no trainable parameters to instrument")

    def _attach_hooks(self) -> None:
        for lay in self._layers:
            m = lay.module
            # prepend: the engine's hooks run before any hook the user (or a Sketcher) registered earlier, so
            # those see the instrumented output, whose grad_output reaches them in backward
            self._handles.append(m.register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True))
            self._handles.append(
                m.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True, prepend=True)
            )
            for pname, p in lay.params.items():
                self._handles.append(p.register_hook(self._guard(lay, pname)))
        for name, module in self._checked:
            self._handles.append(module.register_forward_pre_hook(self._mode_check(name)))

    def _detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ------------------------------------------------------------------ public API
    def pause(self) -> None:
        """Remove every hook: the model runs exactly as without the engine, at no cost."""
        if self._armed:
            raise EngineError("pause() inside a begin()/end() window; call end() first")
        if not self._paused and not self._removed:
            self._detach_hooks()
            self._paused = True

    def resume(self) -> None:
        if self._removed:
            raise EngineError("resume() after remove(): build a new GradNormEngine")
        if self._paused:
            self._attach_hooks()
            self._paused = False

    def remove(self) -> None:
        """Remove every hook for good."""
        self._detach_hooks()
        self._armed = False
        self._removed = True

    def begin(
        self, batch_size: int, weights: Tensor | None = None, max_grad_norm: float | None = None
    ) -> None:
        """Arm the engine for the next forward/backward of ``batch_size`` samples.

        ``weights`` [B, L] (routing; None = all ones). ``max_grad_norm``: flat per-sample clipping of the
        routed gradient. Several forward+backward passes may run inside one window (micro-batches): their
        rows are concatenated in order and must add up to ``batch_size``.
        """
        if self._removed or self._paused:
            raise EngineError("begin() on a paused or removed engine")
        if self._armed:
            raise EngineError("begin() while a window is open; call end() first")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        p0 = next(iter(self._layers[0].params.values()))
        L = len(self._layers)
        if weights is not None:
            if not isinstance(weights, Tensor) or tuple(weights.shape) != (batch_size, L):
                shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
                raise ValueError(
                    f"weights must be a tensor of shape [{batch_size}, {L}] (batch, layers), got {shape}"
                )
            weights = weights.detach().to(device=p0.device, dtype=p0.dtype)
            if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
                raise ValueError("routing weights must be finite and >= 0")
        if max_grad_norm is not None:
            max_grad_norm = float(max_grad_norm)
            if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
                raise ValueError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
        self._B = batch_size
        self._weights = weights
        self._max_norm = max_grad_norm
        self._norms = torch.zeros(batch_size, L, dtype=p0.dtype, device=p0.device)
        self._clip = torch.ones(batch_size, dtype=p0.dtype, device=p0.device) if max_grad_norm else None
        self._row = 0
        self._pass_b = None
        self._pass_layers = []
        self._pass_sq = {}
        self._error = None
        for lay in self._layers:
            lay.calls, lay.pending, lay.deferred, lay.expected, lay.in_pass = [], 0, None, {}, False
        self._armed = True

    def end(self) -> EngineResult:
        """Close the window; ``.grad`` already holds the routed (and clipped) gradients."""
        if not self._armed:
            raise EngineError("end() without begin()")
        try:
            if self._error is not None:
                raise self._error
            if self._pass_b is not None:  # a forward whose backward never came: no gradient for it
                self._close_pass()
            if self._row != self._B:
                raise EngineError(
                    f"begin({self._B}) but the forward passes in this window covered {self._row} rows; "
                    "batch_size must equal the number of samples run through the model"
                )
            assert self._norms is not None
            return EngineResult(self._norms, self._clip)
        finally:
            self._armed = False
            for lay in self._layers:
                lay.calls, lay.pending, lay.deferred, lay.expected, lay.entered = [], 0, None, {}, []
                lay.in_pass = False
            self._weights = None

    # ------------------------------------------------------------------ forward hooks
    def _mode_check(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if self._armed and not self._inside_kernel:
                why = _refusal(name, module)
                if why is not None:
                    raise UnsupportedLayerError(why)

        return hook

    def _batch_of(self, lay: _Layer, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        if x is None or x.dim() == 0:
            raise EngineError(f"layer {lay.name!r} was called without a batched tensor input")
        dim = 1 if lay.subtree and getattr(lay.module, "batch_first", True) is False else 0
        return int(x.shape[dim])

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._armed or self._inside_kernel or not torch.is_grad_enabled():
            return
        lay = self._by_module[id(module)]
        x = args[0] if args else None
        if not lay.subtree and isinstance(x, Tensor) and x.dim() > 0:
            b = x.shape[0]  # the common case: a batch-first tensor as first argument
        else:
            b = self._batch_of(lay, args, kwargs)
        if b == self._pass_b:
            pass
        elif self._pass_b is None:
            if self._row + b > self._B:
                raise EngineError(
                    f"begin({self._B}) but layer {lay.name!r} received a batch of {b} rows "
                    f"({self._row} rows already seen in this window)"
                )
            self._pass_b = b
        elif b != self._pass_b:
            raise EngineError(
                f"layer {lay.name!r} was called with a leading dim of {b} but this forward pass has a batch of "
                f"{self._pass_b}: inputs must be batch-first, and a layer applied to unbatched input (e.g. a "
                "positional embedding indexed by arange(T) and broadcast over the batch) has no per-sample "
                "gradient at its output; index it with a [batch, T] tensor (positions.expand(batch, T))"
            )
        for (owner, attr), p in zip(lay.slots, lay.plist, strict=True):
            owner._parameters[attr] = p.detach()  # type: ignore[assignment]
        lay.entered.append((args, kwargs))

    def _post_hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> Any:
        lay = self._by_module.get(id(module))
        if lay is None or not lay.entered:
            return None
        args, kwargs = lay.entered.pop()
        for (owner, attr), p in zip(lay.slots, lay.plist, strict=True):
            owner._parameters[attr] = p
        if isinstance(output, Tensor):  # the common case, without pytree
            if not output.is_floating_point():
                return None
            call = Call(args, kwargs, None, 1, _FIRST, [(output.shape, output.dtype, output.device)])
            if lay.capture is not None:
                call.saved = lay.capture(output)
            (out,) = _tap(self, lay, call, len(lay.plist), *lay.plist, output)
            self._register_call(lay, call)
            return out
        if output is None:
            return None
        leaves, spec = tree_flatten(output)
        tapped = [i for i, v in enumerate(leaves) if isinstance(v, Tensor) and v.is_floating_point()]
        if not tapped:
            return None
        meta = [(leaves[i].shape, leaves[i].dtype, leaves[i].device) for i in tapped]
        call = Call(args, kwargs, spec, len(leaves), tapped, meta)
        if lay.capture is not None:
            call.saved = lay.capture(output)
        outs = _tap(self, lay, call, len(lay.plist), *lay.plist, *(leaves[i] for i in tapped))
        for i, t in zip(tapped, outs, strict=True):
            leaves[i] = t
        self._register_call(lay, call)
        return tree_unflatten(leaves, spec)

    def _register_call(self, lay: _Layer, call: Call) -> None:
        lay.calls.append(call)
        lay.pending += 1
        if not lay.in_pass:
            lay.in_pass = True
            self._pass_layers.append(lay)

    # ------------------------------------------------------------------ backward side
    def _guard(self, lay: _Layer, pname: str) -> Any:
        def hook(grad: Tensor | None) -> None:
            if not self._armed:
                return
            expected = lay.expected.pop(pname, None)
            if grad is not None and grad is not expected:
                raise EngineError(
                    f"parameter {pname!r} of layer {lay.name!r} ({type(lay.module).__name__}) received a "
                    "gradient from outside a call of that layer in an armed window (e.g. weights tied "
                    "through F.linear, a parent module using a child's parameter directly, or a forward "
                    "run before begin()); its per-sample norm and routing would miss that part"
                )

        return hook

    def _queue_callback(self) -> None:
        if not self._cb_queued:
            self._cb_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _rows(self) -> slice:
        assert self._pass_b is not None
        return slice(self._row, self._row + self._pass_b)

    def _scale(self, lay: _Layer) -> Tensor | None:
        if self._weights is None:
            return None
        return self._weights[self._rows(), lay.index]

    def _finish(self, lay: _Layer) -> dict[str, Tensor] | None:
        """Run the layer's kernel on its finished calls; gradients now (routing) or None (clipping)."""
        calls = lay.calls if len(lay.calls) == 1 and lay.calls[0].done else [c for c in lay.calls if c.done]
        lay.calls, lay.pending = [], 0
        if not calls:
            return None
        assert self._norms is not None and self._pass_b is not None
        scale = self._scale(lay)
        clipping = self._max_norm is not None
        self._inside_kernel = True
        grad_mode = torch.is_grad_enabled()  # off inside backward unless create_graph=True
        try:
            if grad_mode:
                torch.set_grad_enabled(False)
            try:
                req = _PLAIN if scale is None and not clipping else Request(scale=scale, deferred=clipping)
                res = lay.kernel(lay.module, calls, req)
            except Exception as exc:
                self._error = EngineError(f"layer {lay.name!r} ({type(lay.module).__name__}): {exc}")
                raise self._error from exc
            for c in calls:  # the kernel's answer holds what it still needs; free the rest now
                c.release()
            self._pass_sq[lay.index] = res.norm_sq
            if clipping:
                lay.deferred = res
                return None
            return res.grads(scale)
        finally:
            self._inside_kernel = False
            if grad_mode:
                torch.set_grad_enabled(True)

    def _backward(self, lay: _Layer, call: Call, grads: tuple[Tensor | None, ...]) -> list[Tensor | None]:
        if call.done:
            self._error = EngineError(
                f"layer {lay.name!r} received a second backward pass through the same forward call in one "
                "window; per-sample norms of a sum of backward passes are not computed: sum the losses "
                "before one backward(), or end() and begin() between passes"
            )
            raise self._error
        call.grad_outputs = list(grads)
        call.done = True
        if not self._cb_queued:
            self._queue_callback()
        lay.pending -= 1
        out: list[Tensor | None] = [None] * len(lay.plist)
        if lay.pending == 0:
            got = self._finish(lay)
            if got is not None:
                expected = lay.expected
                for k, pname in enumerate(lay.pnames):
                    g = got.get(pname)
                    if g is not None:
                        expected[pname] = g
                        out[k] = g
        return out

    def _after_backward(self) -> None:
        self._cb_queued = False
        if not self._armed or self._pass_b is None:
            return
        try:
            with torch.no_grad():
                for lay in self._pass_layers:
                    if lay.calls:  # some calls never got a gradient: finish with those that did
                        got = self._finish(lay)
                        if got is not None:
                            self._accumulate(lay, got)
                if self._max_norm is not None:
                    self._clip_and_apply()
        finally:
            self._close_pass()

    def _clip_and_apply(self) -> None:
        assert self._norms is not None and self._clip is not None and self._max_norm is not None
        self._flush_norms()
        rows = self._rows()
        n = self._norms[rows]
        if self._weights is not None:
            n = n * self._weights[rows]
        total = n.square().sum(1).sqrt()
        c = (self._max_norm / (total + CLIP_EPS)).clamp(max=1.0)
        self._clip[rows] = c
        for lay in self._pass_layers:
            if lay.deferred is None:
                continue
            w = self._scale(lay)
            got = lay.deferred.grads(c if w is None else c * w)
            lay.deferred = None
            self._accumulate(lay, got)

    @staticmethod
    def _accumulate(lay: _Layer, got: dict[str, Tensor]) -> None:
        for pname, g in got.items():
            p = lay.params[pname]
            if p.grad is None:
                p.grad = g.contiguous().view(p.shape) if g.shape != p.shape else g
            else:
                p.grad += g.view(p.shape)

    def _flush_norms(self) -> None:
        """Write this pass's norms: sqrt, Opacus scale (× rows for "mean"), one batched op for all layers."""
        if not self._pass_sq:
            return
        assert self._norms is not None and self._pass_b is not None
        pass_sq = self._pass_sq
        self._pass_sq = {}
        factor = float(self._pass_b) if self.loss_reduction == "mean" else 1.0
        rows = self._rows()
        norms = self._norms
        if len(pass_sq) == norms.shape[1] and all(v.dtype == norms.dtype for v in pass_sq.values()):
            # every layer: stack straight into the output rows (contiguous), then finish in place
            out = norms[rows]
            torch.stack([pass_sq[c] for c in range(len(pass_sq))], 1, out=out)
            out.clamp_(min=0).sqrt_().mul_(factor)
            return
        cols = list(pass_sq)
        sq = torch.stack([pass_sq[c] for c in cols], 1).to(norms.dtype)
        norms[rows.start : rows.stop, cols] = sq.clamp_(min=0).sqrt_().mul_(factor)

    def _close_pass(self) -> None:
        assert self._pass_b is not None
        self._flush_norms()
        for lay in self._pass_layers:
            lay.calls, lay.pending, lay.deferred, lay.in_pass = [], 0, None, False
        self._row += self._pass_b
        self._pass_b = None
        self._pass_layers = []


class _Tap(torch.autograd.Function):
    """Identity on a layer's outputs whose backward runs the layer's kernel.

    Inputs are ``(engine, layer, call, n_params, *params, *outputs)``; the real parameters are inputs so the
    outputs require grad (even for a first layer fed by data) and the returned gradients reach ``.grad``
    through ``AccumulateGrad``. Outputs are ``detach()`` aliases (not views), so in-place ops after the
    layer (``ReLU(inplace=True)``) behave as in plain PyTorch.
    """

    @staticmethod
    def forward(ctx: Any, engine: GradNormEngine, lay: _Layer, call: Call, n: int, *tensors: Tensor) -> Any:
        ctx.info = (engine, lay, call)
        ctx.set_materialize_grads(False)
        if len(tensors) == n + 1:
            return (tensors[n].detach(),)
        return tuple(t.detach() for t in tensors[n:])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        engine, lay, call = ctx.info
        return (None, None, None, None, *engine._backward(lay, call, grads), *grads)


_tap_raw = super(torch.autograd.Function, _Tap).apply  # the C++ apply, bound to _Tap


def _tap(*args: Any) -> Any:
    """``_Tap.apply`` minus its Python prologue (signature binding, functorch dead-wrapper unwrapping: ~5 µs
    per layer call), which only matters under functorch transforms; those take the full path."""
    if torch._C._are_functorch_transforms_active():
        return _Tap.apply(*args)
    return _tap_raw(*args)
