"""Exact sparse ReLU FFNs for CPU decoding: ``hf_stochact.sparsify(model)``.

With ReLU (or ReLU²) on the gate, a hidden neuron whose gate pre-activation is <= 0 is exactly zero, so its row of
``W_up`` and its column of ``W_down`` are not needed. For the few tokens of a decode step, the sparse path computes
the gate densely, takes the union of active neurons over the tokens and reads only those rows of ``W_up`` and of
``W_down``ᵀ, in one operator call (``hf_stochact::sparse_gated_mlp``; C loops on CPU, no gathered copy). Plain
MLPs (GPT-2, OPT, ...) get ``hf_stochact::sparse_down`` on their down projection, whose input is the post-ReLU
hidden. The result equals the dense computation up to float summation order.

How a model is converted (FFNs found through :func:`hf_stochact.layouts.find_mlps`):

* Each gated MLP is replaced in its parent by a :class:`SparseMLP`, each plain MLP's down projection by a
  :class:`SparseDownProjection`. The wrapper *shares* the original's children, parameters and buffers: the state
  dict, ``save_pretrained`` output and any hooks on the children are unchanged, and no ``forward`` is overwritten.
  An accelerate hook on the wrapped module itself is applied around the wrapper's call. :func:`unsparsify` puts
  the original modules back.
* ``W_down`` is stored once, in the layout the loops read (rows of neurons contiguous): the ``nn.Linear`` keeps a
  transposed *view* of it (``weight.t()``), so there is no second copy and in-place weight updates reach both.
  :func:`unsparsify` restores the contiguous layout.
* Every call decides afresh: the dense path (the original module's own forward) runs for more than ``max_tokens``
  tokens (prefill, large batches), while autograd records, on non-CPU devices, for weights the loops cannot read
  (tensor subclasses such as quantized or DTensor weights, float16, non-contiguous), when the FFN activation is
  no longer ReLU/ReLU² (changed after sparsify) or draws at random in a stochastic ``generate`` call, and inside
  the operator when more than ``max_density`` of the neurons are active. Per-call state only (no scratch buffer
  on the module): safe with many threads.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import warnings
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..activations import scope
from ..kernels import loop_readable
from ..kernels.reference import magnitude_mask, relu_activation
from ..layouts import MLP, PROJECTION_TYPES, down_rows, find_mlps, param, relu_kind
from .thresholds import Thresholds


@dataclasses.dataclass(frozen=True)
class SparseConfig:
    """When the sparse path runs (else the dense fallback).

    Args:
        max_tokens: at most this many tokens per call (decode steps, small batches), in [1, 16]; more -> dense.
        max_density: at most this fraction of neurons active in the union over the tokens, in [0, 1]; more ->
            dense. The sparse loops break even with the dense MLP at about 75% active neurons (float32, one token,
            576x1536 on a 2-core Xeon; larger MLPs gain earlier: docs/sparse_inference.md).
        head: also run the model's output embedding (the LM head, dense) through the C loops' matrix-vector
            product for decode steps (:class:`RowsHead`): the same weights in place, read at about twice MKL's
            batch-1 rate on SmolLM2's 576x49152 head (docs/decode_compare.md). Exact up to summation order.
        input_max_density: the same for thresholded linear layers (:class:`ThresholdedLinear`), in [0, 1]. The
            rows loop reads weights faster than the dense product on the masked input even with every input kept
            (1.3x-2.6x on SmolLM2's shapes, float32; docs/kernels.md), so by default it always runs.

    Raises:
        ValueError: either value out of range (the message names it and the range).
    """

    max_tokens: int = 4
    max_density: float = 0.7
    input_max_density: float = 1.0
    head: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.head, bool):
            raise ValueError(f"head must be True or False, got {self.head!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or \
                not 1 <= self.max_tokens <= kernels.MAX_TOKENS:
            raise ValueError(f"max_tokens must be an integer in [1, {kernels.MAX_TOKENS}], got {self.max_tokens!r}")
        if isinstance(self.max_density, bool) or not isinstance(self.max_density, (int, float)) or \
                not 0.0 <= self.max_density <= 1.0:
            raise ValueError(f"max_density must be a number in [0, 1], got {self.max_density!r}")
        if isinstance(self.input_max_density, bool) or not isinstance(self.input_max_density, (int, float)) or \
                not 0.0 <= self.input_max_density <= 1.0:
            raise ValueError(f"input_max_density must be a number in [0, 1], got {self.input_max_density!r}")


class _CallCounter:
    """Counts sparse and dense calls (callers count eager calls only: compiled graphs do not count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"sparse": 0, "dense": 0}

    def add(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy / pickle / torch.save: a lock is not copyable
        with self._lock:
            return {"counts": dict(self.counts)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._lock = threading.Lock()
        self.counts = dict(state["counts"])


#: The hook tables a wrapper shares with the module it stands in for: hooks registered on the original (before
#: sparsify) fire around the wrapper's call, hooks registered on the wrapper stay on the original after unsparsify.
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _internal(hook: Any) -> bool:
    """hf_stochact's own hooks (the stochastic-decoding draw on stock activations): they do not force the dense
    path (the sparse path reads the activation's draw itself)."""
    return getattr(hook, "_hf_stochact_internal", False)


def _hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has a user forward hook or pre-hook, or a global module hook is registered: a
    module with hooks must be *called* (the dense path does), never skipped by the loops."""
    if _global_hooks():
        return True
    for m in modules:
        if m._forward_pre_hooks or (m._forward_hooks and not all(_internal(h) for h in m._forward_hooks.values())):
            return True
    return False


def _global_hooks() -> bool:
    from torch.nn.modules import module as _module

    return bool(_module._global_forward_hooks or _module._global_forward_pre_hooks)


@functools.cache
def _bf16_products_slow() -> bool:
    """Whether torch's CPU bfloat16 matrix products lack native support here (no AVX512-BF16/AMX: oneDNN declines
    and a scalar fallback runs). Measured on such a CPU (AVX2), 1 thread, 128 x 1536 -> 576: bf16 product 24 ms in
    the original layout and 111 ms with the rows-layout view, float32 product of the upcast operands 5.4 ms
    (``examples/bench_bf16_products.py``)."""
    return not torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _prefill_in_float32(x: torch.Tensor, weights: tuple[torch.Tensor, ...]) -> bool:
    """Route a many-token call through float32 products: bfloat16 weights where bf16 products are slow."""
    return x.dtype == torch.bfloat16 and weights[0].dtype == torch.bfloat16 and loop_readable(*weights) \
        and _bf16_products_slow()


def _rows_product(x2d: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ w_t + bias`` in float32 (``w_t``: a rows-layout weight [d_in, d_out]), returned in ``x2d``'s dtype."""
    y = x2d.float() @ w_t.float()
    return (y if bias is None else y + bias.float()).to(x2d.dtype)


def _gated_consistent(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
                      b_up: torch.Tensor | None, w_down_t: torch.Tensor, b_down: torch.Tensor | None) -> bool:
    """The shapes and dtypes the C loops rely on, checked on every call (a child may have been replaced, resized
    or cast since sparsify): [T, d] x, [d_ff, d] gate and up, [d_ff, d_out] W_downᵀ, matching biases, one weight
    dtype. A few tuple comparisons: cheap next to the call."""
    d_ff, d_out = w_down_t.shape
    shape = (d_ff, x.shape[-1])
    return (w_gate.shape == shape and w_up.shape == shape and w_gate.dtype == w_up.dtype == w_down_t.dtype
            and (b_gate is None or b_gate.shape == (d_ff,)) and (b_up is None or b_up.shape == (d_ff,))
            and (b_down is None or b_down.shape == (d_out,)))


def _rows_consistent(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """A rows-layout weight [d_in, d_out] that ``x`` [..., d_in] and ``bias`` [d_out] fit."""
    return x.shape[-1] == w_t.shape[0] and (bias is None or bias.shape == (w_t.shape[1],))


def _needs_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """The loops have no backward: while autograd records (training), stay on the dense path."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


class _Wrapper(nn.Module):
    """Stands in for ``original`` in its parent, sharing its children, parameters and buffers (same state-dict keys,
    same hooks on the children). ``original`` itself is held outside the module tree; its class's ``forward`` is the
    dense path, and an accelerate hook on it (``_hf_hook``) is applied around the wrapper's call."""

    def __init__(self, original: nn.Module, config: SparseConfig):
        super().__init__()
        self._modules = original._modules
        self._parameters = original._parameters
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        for table in _HOOK_TABLES:
            if hasattr(original, table):
                setattr(self, table, getattr(original, table))
        self._is_full_backward_hook = original._is_full_backward_hook
        object.__setattr__(self, "original", original)
        self.config = config
        self.counter = _CallCounter()
        self.training = original.training

    def train(self, mode: bool = True):
        super().train(mode)
        self.original.training = mode
        return self

    def count(self, kind: str) -> None:
        if not torch.compiler.is_compiling():
            self.counter.add(kind)

    def dense(self, *args: Any) -> Any:
        self.count("dense")
        return type(self.original).forward(self.original, *args)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hook = self.original.__dict__.get("_hf_hook")  # accelerate's hook on the wrapped module, if any
        if hook is not None:
            (x,), _ = hook.pre_forward(self.original, x)
        y = self.sparse_or_dense(x)
        return y if hook is None else hook.post_forward(self.original, y)

    def sparse_or_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__}, max_tokens={self.config.max_tokens}, " \
               f"max_density={self.config.max_density}"


class SparseMLP(_Wrapper):
    """A gated ReLU/ReLU² FFN (gate/up/down, or a fused gate_up) whose decode steps read only active neurons."""

    def __init__(self, mlp: MLP, config: SparseConfig):
        super().__init__(mlp.module, config)
        self.mlp = MLP(mlp.path, self, mlp.layout)  # the same layout, read through the shared children

    @property
    def children_called(self) -> tuple[nn.Module, ...]:
        """The children the dense forward calls (their hooks must fire): gate/up (or fused), down, activation."""
        layout, modules = self.mlp.layout, self._modules
        return tuple(modules[n] for n in (layout.pre, layout.up, layout.down, layout.activation) if n is not None)

    def sparse_or_dense(self, x: torch.Tensor) -> torch.Tensor:
        # on every decode step of every layer: plain dict lookups, no nn.Module.__getattr__
        layout, modules = self.mlp.layout, self._modules
        activation = modules[layout.activation]
        act = relu_kind(activation)  # read every call: an activation changed after sparsify -> dense
        shape = x.shape
        if act is None or scope.draw_for(activation) is not None or not x.is_cpu or _needs_grad(self, x):
            return self.dense(x)
        down = modules[layout.down]
        children = self.children_called
        if _hooked(*children):  # hooks on gate/up/down/act: run them (dense calls every child)
            return self.dense(x)
        if not all(type(m) in PROJECTION_TYPES for m in children[:-1]):
            return self.dense(x)  # a child wrapped after sparsify (a LoRA layer, a quantized linear): its own forward
        many = x.numel() > self.config.max_tokens * shape[-1]
        w_gate, b_gate, w_up, b_up = self.mlp.gate_up()
        w_down_t, b_down = down_rows(down), param(down, "bias")
        if not _gated_consistent(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down):
            return self.dense(x)  # a child replaced or resized after sparsify: the loops must not read it
        if many and _prefill_in_float32(x, (w_gate, w_up, w_down_t)):
            x32 = x.reshape(-1, shape[-1]).float()
            g = nn.functional.linear(x32, w_gate.float(), None if b_gate is None else b_gate.float())
            u = nn.functional.linear(x32, w_up.float(), None if b_up is None else b_up.float())
            h = relu_activation(g, act) * u
            self.count("dense")
            return _rows_product(h, w_down_t, b_down).to(x.dtype).reshape(*shape[:-1], w_down_t.shape[1])
        if many or not (loop_readable(w_gate, b_gate, w_up, b_up, w_down_t, b_down) and w_gate.is_contiguous()
                        and w_up.is_contiguous() and w_down_t.is_contiguous()):
            return self.dense(x)
        args = (x.reshape(-1, shape[-1]), w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, self.config.max_density)
        if torch.compiler.is_compiling():
            y, _ = kernels.sparse_gated_mlp(*args)  # the operator, traced (calls are not counted)
        else:
            y, k = kernels.sparse_gated_mlp_validated(*args)
            self.counter.add("sparse" if k >= 0 else "dense")
        return y.reshape(*shape[:-1], y.shape[-1])


class SparseDownProjection(_Wrapper):
    """The down projection of a plain ReLU FFN (input = the post-activation hidden): reads only rows of non-zero
    inputs. ``wrapped`` (the original projection) lets :func:`~hf_stochact.layouts.find_mlps` still see it."""

    def __init__(self, mlp: MLP, config: SparseConfig):
        super().__init__(mlp.down, config)
        self.mlp = mlp

    @property
    def wrapped(self) -> nn.Module:
        return self.original

    def sparse_or_dense(self, h: torch.Tensor) -> torch.Tensor:
        shape = h.shape
        if relu_kind(self.mlp.activation) is None or h.device.type != "cpu" or _needs_grad(self, h):
            return self.dense(h)
        w_t = down_rows(self.original)
        if h.numel() > self.config.max_tokens * shape[-1]:
            if not _prefill_in_float32(h, (w_t,)):
                return self.dense(h)
            self.count("dense")
            return _rows_product(h.reshape(-1, shape[-1]), w_t, self.original.bias).reshape(*shape[:-1], -1)
        if not (loop_readable(w_t, self.original.bias) and w_t.is_contiguous() and _rows_consistent(h, w_t,
                                                                                                  self.original.bias)):
            return self.dense(h)
        y, k = kernels.sparse_down(h.reshape(-1, shape[-1]), w_t, self.original.bias, self.config.max_density)
        if not torch.compiler.is_compiling():
            self.counter.add("sparse" if int(k) >= 0 else "dense")
        return y.reshape(*shape[:-1], y.shape[-1])


class InputGroup:
    """Thresholded layers that read the same input tensor (q/k/v of an attention, gate/up of an FFN), found at
    calibration (``Thresholds.groups``). In an eager decode step the first member called computes every member's
    output in one operator call (``sparse_rows``: one pass over the input, one OpenMP region); the others, when
    called with the *same* tensor (same object, unmodified since), take their result instead of computing it. Each
    member is still called, so its hooks fire; a member whose input differs (a pre-hook that replaced it, a
    different call order, an in-place change since: the version counter, which inference tensors lack — under
    ``torch.inference_mode`` only the identity is checked) computes its own. The hand-over is per thread
    (``threading.local``): concurrent decodes on one model never see each other's results."""

    def __init__(self, members: list[ThresholdedLinear]):
        self.members = members
        self._local = threading.local()

    def __getstate__(self) -> dict[str, Any]:  # copies: the hand-over state is per call, not copied
        return {"members": self.members}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.members = state["members"]
        self._local = threading.local()

    def take(self, member: ThresholdedLinear, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output if an earlier member computed it from this very ``x`` in this thread, else None."""
        local = self._local
        results = getattr(local, "results", None)
        if results is None or local.x is not x or local.version != _version(x):
            return None
        y = results.pop(id(member), None)
        if not results:
            local.results = local.x = None
        return y

    def compute(self, caller: ThresholdedLinear, x: torch.Tensor, x2d: torch.Tensor) -> torch.Tensor | None:
        """Every member's output from ``x2d`` (the caller's input as [T, d_in], rotated where the group is) in one
        call; returns the caller's, keeps the others' for :meth:`take` (keyed by ``x``, the input as called). None
        where a member's weights are not what the loop reads."""
        members, d_in = self.members, x2d.shape[1]
        plans = []
        for m in members:
            plan = m.plan(d_in)
            if plan is None:
                return None
            plans.append(plan)
        ys, ks = _run_rows(x, x2d, plans, caller.config.input_max_density)
        local = self._local
        local.results = {id(m): y for m, y in zip(members, ys) if m is not caller}
        local.x, local.version = x, _version(x)
        i = members.index(caller)
        caller.counter.add("sparse" if ks[i] >= 0 else "dense")
        return ys[i]


def _version(t: torch.Tensor) -> int | None:
    """A tensor's in-place version counter (None for inference tensors, which have none)."""
    return None if t.is_inference() else t._version


def _run_rows(x: torch.Tensor, x2d: torch.Tensor, plans: list[tuple], max_density: float):
    """The rows loop on validated members (``plans`` from :meth:`ThresholdedLinear.plan`): their outputs, shaped as
    ``x`` with each member's width, and their ks (a member the loop left to the caller is finished densely)."""
    lead = tuple(x.shape[:-1])
    specs = tuple(p[0] for p in plans)
    ys, ks = kernels.sparse_rows_run(x2d, specs, [(*lead, spec[2]) for spec in specs],
                                     int(max_density * x2d.shape[1]))
    for y, plan, k in zip(ys, plans, ks):
        if k < 0:
            y.copy_(kernels.finish_dense(x2d, plan[1], plan[2], plan[0][4]).view(y.shape))
    return ys, ks


class _Exact:
    """The exact original weight of a rotated layer whose weights are not float32 (bfloat16 rounding would change
    ``W`` on every rotate/compute-back cycle: a save would degrade the checkpoint), valid while the parameter's
    version is the one recorded (training or any in-place change since: the weight is computed back instead).
    Trade-off: one more copy of the rotated layers' weights in memory, for checkpoints that survive any number of
    save/load/sparsify cycles bit for bit."""

    def __init__(self, weight: torch.Tensor | None, version: int):
        self.weight, self.version, self.pending = weight, version, None

    def get(self, param: torch.Tensor) -> torch.Tensor | None:
        w = self.weight
        if w is None or param._version != self.version or w.dtype != param.dtype or w.shape != param.shape \
                or w.device != param.device:  # changed since, or converted (.to() swaps .data without a version)
            return None
        return w


class _OriginalBasis:
    """``state_dict`` post-hook of a rotated layer: the weight in the original basis (``W`` from ``W R⁻ᵀ``, or the
    exact original kept for bfloat16). A module-level class, not a closure: a rotated model pickles
    (``torch.save``); found again by unrotate()."""

    _hf_stochact_rotation = True

    def __init__(self, r: torch.Tensor, linear: bool, exact: _Exact | None = None):
        self.r, self.linear, self.exact = r, linear, exact

    def __call__(self, module, state, prefix, local_metadata) -> None:
        from .rotation import original_weight

        key = prefix + "weight"
        if key in state:
            t = state[key]
            kept = None if self.exact is None else self.exact.get(param(module.original, "weight"))
            if kept is not None:
                state[key] = kept.clone()
                return
            state[key] = original_weight(t, self.r) if self.linear else original_weight(t.t(), self.r).t().contiguous()


class _RotatedBasis:
    """``load_state_dict`` pre-hook of a rotated layer: a weight given in the original basis (what ``state_dict``
    writes) is rotated (``W R⁻ᵀ``) before it is copied into the parameter, so ``m.load_state_dict(m.state_dict())``,
    Trainer's best-model reload and resumes leave the model as it was (bit for bit where the exact original is
    kept: :class:`_Exact`, refreshed by the post-hook below)."""

    _hf_stochact_rotation = True

    def __init__(self, r_inv: torch.Tensor, linear: bool, exact: _Exact | None = None):
        self.r_inv, self.linear, self.exact = r_inv, linear, exact

    def __call__(self, module, state, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
        from .rotation import rotated_weight

        key = prefix + "weight"
        t = state.get(key)
        n = self.r_inv.shape[0]
        if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1 if self.linear else 0] == n:  # else torch
            if self.exact is not None:  # in the parameter's dtype, as load_state_dict will copy it
                self.exact.pending = t.detach().to(param(module.original, "weight").dtype, copy=True)
            state[key] = rotated_weight(t, self.r_inv) if self.linear else \
                rotated_weight(t.t(), self.r_inv).t().contiguous()  # reports the size mismatch itself


class _ExactAfterLoad:
    """``load_state_dict`` post-hook: the weight just loaded becomes the kept exact original."""

    _hf_stochact_rotation = True

    def __init__(self, exact: _Exact):
        self.exact = exact

    def __call__(self, module, incompatible_keys) -> None:
        if self.exact.pending is not None:
            self.exact.weight, self.exact.pending = self.exact.pending, None
            self.exact.version = param(module.original, "weight")._version


class ThresholdedLinear(_Wrapper):
    """A linear layer (``nn.Linear`` or ``Conv1D``) whose inputs with ``|x| <= threshold`` count as 0 (TEAL-style
    input sparsity, thresholds from :func:`~hf_stochact.inference.thresholds.calibrate_thresholds`). Every call
    applies the mask (prefill and perplexity see the same approximation as decoding); decode steps read only the
    weight rows of the remaining inputs (``hf_stochact::sparse_rows``, with the other layers of its
    :class:`InputGroup` in the same call where it has one), other calls run the original layer on the masked
    input."""

    def __init__(self, layer: nn.Module, threshold: float, config: SparseConfig):
        super().__init__(layer, config)
        self.threshold = float(threshold)
        self.group: InputGroup | None = None
        self._plan: tuple | None = None  # (key, weight, bias, plan): see plan()
        self.rotation: torch.Tensor | None = None  # R (float32): the input is x R, the weight W R⁻ᵀ (rotate())

    @property
    def wrapped(self) -> nn.Module:
        return self.original

    def plan(self, d_in: int) -> tuple | None:
        """``(C-loop spec, W in rows layout [d_in, d_out], float32 bias)`` if the loop can read this layer's weights
        for inputs of ``d_in`` features, else None. Validated in full once, then re-checked on every call by a cheap
        key (the weight and bias objects, pointers, shapes, strides, dtypes, bias version, threshold): a weight
        replaced, resized, cast or re-laid after sparsify is validated afresh, never read stale."""
        original = self.original
        w, b = param(original, "weight"), param(original, "bias")
        key = (d_in, self.threshold, w.data_ptr(), w.shape, w.stride(), w.dtype,
               None if b is None else (b.data_ptr(), b.shape, b.dtype, _version(b)))
        cached = self._plan
        if cached is not None and cached[0] == key and cached[1] is w and cached[2] is b:
            return cached[3]
        w_t = down_rows(original)
        plan = None
        if kernels.rows_member_ok(d_in, w_t, b):
            b32 = None if b is None else kernels.float32(b)
            plan = (kernels.rows_spec(w_t, b32, self.threshold), w_t, b32)
        self._plan = (key, w, b, plan)
        return plan

    def rotate(self, r: torch.Tensor, r_inv: torch.Tensor) -> None:
        """Rotate this layer's input (:mod:`~hf_stochact.inference.rotation`): the weight becomes ``W R⁻ᵀ`` in
        place (no second copy) and every call computes from ``x R``; ``state_dict`` still gives ``W`` (computed
        back), ``load_state_dict`` takes ``W`` (rotated on the way in), and :func:`unsparsify` restores it. Call
        before the rows layout is set."""
        from .rotation import rotated_weight

        layer = self.original
        with torch.no_grad():
            w = param(layer, "weight")
            kept = w.detach().clone() if w.dtype != torch.float32 else None  # bit-exact saves (_Exact)
            if isinstance(layer, nn.Linear):
                w.data = rotated_weight(w.detach(), r_inv).contiguous()
            else:  # Conv1D: [in, out]
                w.data = rotated_weight(w.detach().t(), r_inv).t().contiguous()
        self.rotation = r.float().contiguous()
        linear = isinstance(layer, nn.Linear)
        exact = None if kept is None else _Exact(kept, w._version)
        self._exact = exact
        # the wrapper's own hook tables (gone with the wrapper): state_dict gives W, load_state_dict takes W
        self.register_state_dict_post_hook(_OriginalBasis(self.rotation, linear, exact))
        self._register_load_state_dict_pre_hook(_RotatedBasis(r_inv.float().contiguous(), linear, exact),
                                                with_module=True)
        if exact is not None:
            self.register_load_state_dict_post_hook(_ExactAfterLoad(exact))

    def unrotate(self) -> None:
        """The weight back in the original basis (``W'' Rᵀ``), the state-dict hook removed."""
        from .rotation import original_weight

        if self.rotation is None:
            return
        layer = self.original
        with torch.no_grad():
            w = param(layer, "weight")
            exact = self.__dict__.get("_exact")
            kept = None if exact is None else exact.get(w)
            if kept is not None:  # the exact original bits (bfloat16)
                w.data = kept.clone()
            elif isinstance(layer, nn.Linear):
                w.data = original_weight(w.detach(), self.rotation).contiguous()
            else:
                w.data = original_weight(w.detach().t(), self.rotation).t().contiguous()
        self._exact = None
        for hooks in (self._state_dict_hooks, self._load_state_dict_pre_hooks, self._load_state_dict_post_hooks):
            for k in [k for k, h in hooks.items() if getattr(getattr(h, "hook", h), "_hf_stochact_rotation", False)]:
                del hooks[k]
        self.rotation = None
        self._plan = None

    def sparse_or_dense(self, x: torch.Tensor) -> torch.Tensor:
        group = self.group
        eager = not torch.compiler.is_compiling()
        if group is not None and eager and not _needs_grad(self, x):  # (a hand-over has no autograd history)
            y = group.take(self, x)
            if y is not None:
                self.counter.add("sparse")
                return y
        key = x
        if self.rotation is not None:
            from .rotation import rotate

            x = rotate(x, self.rotation.to(x.device))
        shape = x.shape
        if x.is_cpu and not _needs_grad(self, x):
            x2d = x.reshape(-1, shape[-1])
            if len(x2d) <= self.config.max_tokens:
                if eager and kernels.rows_input_ok(x2d):
                    if group is not None:
                        y = group.compute(self, key, x2d)
                        if y is not None:
                            return y
                    plan = self.plan(shape[-1])
                    if plan is not None:
                        (y,), (k,) = _run_rows(x, x2d, [plan], self.config.input_max_density)
                        self.counter.add("sparse" if k >= 0 else "dense")
                        return y
            w_t, bias = down_rows(self.original), param(self.original, "bias")
            if loop_readable(w_t, bias, x) and w_t.is_contiguous() and _rows_consistent(x, w_t, bias):
                if len(x2d) <= self.config.max_tokens:  # traced (torch.compile), or inputs the fast path declined
                    y, k = kernels.sparse_down(x2d, w_t, bias, self.config.input_max_density, self.threshold)
                    if eager:
                        self.counter.add("sparse" if int(k) >= 0 else "dense")
                    return y.reshape(*shape[:-1], y.shape[-1])
                if _prefill_in_float32(x, (w_t,)):
                    self.count("dense")
                    y = _rows_product(magnitude_mask(x2d, self.threshold), w_t, bias)
                    return y.reshape(*shape[:-1], y.shape[-1])
        return self.dense(magnitude_mask(x, self.threshold))

    def extra_repr(self) -> str:
        group = "" if self.group is None else f", group of {len(self.group.members)}"
        return f"{super().extra_repr()}, threshold={self.threshold:.4g}{group}"


class RowsHead(_Wrapper):
    """The output embedding (an ``nn.Linear``, often tied to the input embedding) on the C loops' dense
    matrix-vector product for decode steps (``max_tokens`` tokens or fewer, CPU, float32/bfloat16 weights rows
    contiguous, as ``nn.Linear`` holds them: nothing is copied or re-laid). Every other call, and any weight the loop
    cannot read, runs the original layer. Same products as the dense layer, summed in another order. Not counted
    in :func:`sparse_stats` (it skips nothing)."""

    @property
    def wrapped(self) -> nn.Module:
        return self.original

    def dense(self, *args: Any) -> Any:
        return type(self.original).forward(self.original, *args)

    def sparse_or_dense(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cpu or _needs_grad(self, x):
            return self.dense(x)
        w, b = param(self.original, "weight"), param(self.original, "bias")
        x2d = x.reshape(-1, x.shape[-1])
        if len(x2d) > self.config.max_tokens or not loop_readable(x2d, w, b) or not w.is_contiguous() \
                or w.dim() != 2 or w.shape[1] != x2d.shape[1] or (b is not None and b.shape != (w.shape[0],)):
            return self.dense(x)
        if torch.compiler.is_compiling():  # the operator, traced (its CPU kernel is the same loop)
            return torch.ops.hf_stochact.dense_rows(x2d, w, b).view(*x.shape[:-1], w.shape[0])
        if not kernels.rows_input_ok(x2d):
            return self.dense(x)
        return kernels.dense_rows(x2d, w, b).view(*x.shape[:-1], w.shape[0])


def _rows_layout(layer: nn.Module) -> bool:
    """Give an ``nn.Linear`` down projection the loops' layout ([d_ff, d] rows contiguous; the module sees a
    transposed view). Returns whether the layout changed (only plain CPU float32/bfloat16 weights are touched)."""
    if not isinstance(layer, nn.Linear) or not loop_readable(layer.weight) or layer.weight.t().is_contiguous():
        return False
    with torch.no_grad():
        layer.weight.data = layer.weight.detach().t().contiguous().t()
    return True


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def sparsify(model: nn.Module, config: SparseConfig | None = None, *, thresholds: Thresholds | dict | None = None,
             **kwargs: Any) -> nn.Module:
    """Convert ``model`` in place for sparse CPU decoding. Returns ``model`` (for a bare MLP module, which has no
    parent to put a wrapper into, the wrapper: use the return value).

    * Every ReLU/ReLU² FFN gets the exact sparse path (its zeros are skipped, outputs unchanged).
    * With ``thresholds`` (from :func:`~hf_stochact.calibrate_thresholds`, or saved in ``model.config`` by it and
      found there when ``thresholds`` is None), the named linear layers get input thresholds
      (:class:`ThresholdedLinear`): an approximation, TEAL-style, for models without ReLU zeros. Thresholds passed
      here are also written to ``model.config``, so ``save_pretrained`` saves what runs.
    * Calling it again on a sparsified model applies the new settings everywhere: the config to every wrapper, the
      new thresholds to their layers (layers the new thresholds do not name lose theirs).
    * Hooks keep firing: hooks on the FFN or a thresholded layer fire around its wrapper's call; while a child of a
      sparse FFN (gate/up/down/activation) has forward hooks, that FFN takes the dense path, which calls them.

    Args:
        model: a transformers model, or a single MLP module.
        config: a :class:`SparseConfig`; keyword arguments (``max_tokens``, ``max_density``) build one.
        thresholds: a :class:`~hf_stochact.inference.thresholds.Thresholds` or its dict; None = the config's.

    Raises:
        ValueError: if there is nothing to sparsify (no ReLU FFN and no thresholds; the message lists the FFN
            activations found), a threshold names a module that is not a linear layer, or bad config values.
    """
    if config is not None and kwargs:
        raise ValueError(f"sparsify: pass either config or keyword settings ({', '.join(kwargs)}), not both")
    cfg = config or SparseConfig(**kwargs)
    explicit = thresholds is not None
    if thresholds is None:
        thresholds = Thresholds.from_config(model)
    elif isinstance(thresholds, dict):
        thresholds = Thresholds.from_dict(thresholds)
    elif not isinstance(thresholds, Thresholds):
        raise ValueError(f"thresholds must be a Thresholds, its dict or None, got {type(thresholds).__name__}")
    if thresholds is not None and thresholds.rotation != "none":
        thresholds.resolve_rotations(model)
        _check_rotation_sizes(model, thresholds)  # before anything changes: a refusal leaves the model as it was
    mlps = find_mlps(model, need="down")
    relu = [m for m in mlps if relu_kind(m.activation) is not None]
    if not relu and not (thresholds and thresholds.values):
        found = find_mlps(model)
        adapted = _adapter_child(m.module for m in found)
        if adapted and any(relu_kind(m.activation) is not None for m in found):
            raise ValueError(f"sparsify: the ReLU FFNs of {type(model).__name__} have adapter-wrapped projections "
                             f"({adapted}): merge the adapter first (peft's merge_and_unload()), or sparsify before "
                             "adding it")
        kinds = sorted({type(m.activation).__name__ for m in found})
        raise ValueError(f"sparsify: no FFN with a ReLU or ReLU² activation in {type(model).__name__} (FFN "
                         f"activations found: {', '.join(kinds) or 'none'}). Fine-tune to ReLU first, e.g. with "
                         "StochActSchedule or `hf-stochact relufy`, or calibrate input thresholds "
                         "(hf_stochact.calibrate_thresholds) for approximate sparsity without training.")
    targets = {}
    for path, t in (thresholds.values.items() if thresholds else ()):  # validate everything before changing anything
        try:
            targets[path] = (model.get_submodule(path), t)
        except AttributeError as error:
            raise ValueError(f"sparsify: thresholds name {path!r}, which is not a module of "
                             f"{type(model).__name__}") from error
        if not isinstance(getattr(targets[path][0], "wrapped", targets[path][0]), PROJECTION_TYPES):
            layer = targets[path][0]
            if _adapter_child([layer]) or hasattr(layer, "base_layer"):
                raise ValueError(f"sparsify: thresholds name {path!r}, which holds an adapter "
                                 f"({type(layer).__module__}.{type(layer).__name__} around its linear layer): merge "
                                 "the adapter first (peft's merge_and_unload()), or sparsify before adding it")
            raise ValueError(f"sparsify: thresholds name {path!r}, a {type(layer).__name__}, not a linear layer "
                             "(nn.Linear or Conv1D)")
    exact: set[int] = set()
    hooked: list[str] = []
    for mlp in relu:
        exact.update(id(m) for m in (mlp.pre, mlp.up, mlp.down) if m is not None)
        existing = mlp.module if isinstance(mlp.module, SparseMLP) else \
            mlp.down if isinstance(mlp.down, SparseDownProjection) else None
        if existing is not None:  # already sparsified: the new settings
            existing.config = cfg
            continue
        if mlp.layout.gated:
            wrapper: _Wrapper = SparseMLP(mlp, cfg)
            target = mlp.path
            if _hooked(*wrapper.children_called):
                hooked.append(mlp.path or type(mlp.module).__name__)
        else:
            wrapper = SparseDownProjection(mlp, cfg)
            target = f"{mlp.path}.{mlp.layout.down}" if mlp.path else mlp.layout.down
        wrapper.relaid = _rows_layout(mlp.down)
        object.__setattr__(wrapper, "relaid_layer", mlp.down)  # not a child: no second state-dict entry
        if not target:
            return wrapper
        _replace(model, target, wrapper)
    if hooked:
        warnings.warn(f"sparsify: {len(hooked)} FFN(s) have forward hooks on their projections or activation "
                      f"(e.g. {hooked[0]}); they take the dense path while the hooks are registered, so the hooks "
                      "fire as before but those FFNs are not faster", UserWarning, stacklevel=2)
    for path, wrapper in _wrappers(model):  # thresholded layers the new thresholds no longer name
        if isinstance(wrapper, ThresholdedLinear) and path not in targets:
            _unwrap_one(model, path, wrapper)
    for path, (layer, t) in targets.items():
        transform = thresholds.transform(path)
        if isinstance(layer, ThresholdedLinear):
            same = (layer.rotation is None and transform is None) or (
                layer.rotation is not None and transform is not None and torch.equal(layer.rotation, transform[0]))
            if same:
                layer.threshold, layer.config = float(t), cfg
                continue
            layer = _unwrap_one(model, path, layer)  # another rotation: back to the original, wrapped afresh
        if id(layer) in exact or id(getattr(layer, "original", None)) in exact:
            continue  # a ReLU FFN's projection (exact zeros there)
        wrapper = ThresholdedLinear(layer, t, cfg)
        if transform is not None:
            wrapper.rotate(*transform)
        wrapper.relaid = _rows_layout(layer)
        object.__setattr__(wrapper, "relaid_layer", layer)
        _replace(model, path, wrapper)
    _link_groups(model, thresholds)
    _wrap_head(model, cfg)
    if explicit and thresholds is not None and getattr(model, "config", None) is not None:
        thresholds.save_to_config(model)
    return model


def _adapter_child(modules) -> str:
    """The qualified class name of the first adapter layer (a module with a ``base_layer``, as peft's LoRA layers
    have) among ``modules`` and their children, or ''."""
    for module in modules:
        for m in module.modules():
            if hasattr(m, "base_layer") and isinstance(getattr(m, "base_layer", None), nn.Module):
                return f"{type(m).__module__}.{type(m).__name__}"
    return ""


def _check_rotation_sizes(model: nn.Module, thresholds: Thresholds) -> None:
    """Every rotated layer exists and reads as many inputs as its rotation has rows.

    Raises:
        ValueError: naming the first layer that does not fit."""
    for path in thresholds.rotated:
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"sparsify: the thresholds rotate {path!r}, which this model does not have") from None
        layer = getattr(layer, "original", layer)
        transform = thresholds.transform(path)
        w = param(layer, "weight")
        d_in = w.shape[0] if isinstance(layer, PROJECTION_TYPES) and not isinstance(layer, nn.Linear) else \
            w.shape[-1]
        if transform is not None and transform[0].shape != (d_in, d_in):
            raise ValueError(f"sparsify: the rotation of {path!r} is {tuple(transform[0].shape)}, but the layer reads "
                             f"{d_in} inputs (a rotation file from another model?)")


def unwrap_head(model: nn.Module) -> SparseConfig | None:
    """Take a :class:`RowsHead` off ``model``'s output embedding (the original layer back in place); returns its
    config to put it back with :func:`rewrap_head`, or None if there was none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, RowsHead):
        return None
    path = next((p for p, m in model.named_modules() if m is head), None)
    if not path:
        return None
    _unwrap_one(model, path, head)
    return head.config


def rewrap_head(model: nn.Module, config: SparseConfig) -> None:
    """Put a :class:`RowsHead` back on ``model``'s (possibly new) output embedding."""
    _wrap_head(model, config)


def _wrap_head(model: nn.Module, cfg: SparseConfig) -> None:
    """Put the output embedding on :class:`RowsHead` (``cfg.head``), or take it off again (re-sparsify)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    path = next((p for p, m in model.named_modules() if m is head), None) if head is not None else None
    if not path:
        return
    if isinstance(head, RowsHead):
        if cfg.head:
            head.config = cfg
        else:
            _unwrap_one(model, path, head)
        return
    if cfg.head and type(head) is nn.Linear:
        wrapper = RowsHead(head, cfg)
        wrapper.relaid = False
        object.__setattr__(wrapper, "relaid_layer", head)
        _replace(model, path, wrapper)


def _link_groups(model: nn.Module, thresholds: Thresholds | None) -> None:
    """Give the thresholded layers that read one input (``thresholds.groups``) a shared :class:`InputGroup`."""
    wrappers = {p: m for p, m in _wrappers(model) if isinstance(m, ThresholdedLinear)}
    for m in wrappers.values():
        m.group = None
    for paths in (thresholds.groups if thresholds else ()):
        members = [wrappers[p] for p in paths if p in wrappers]
        if 1 < len(members) <= kernels.MAX_GROUP:
            group = InputGroup(members)
            for m in members:
                m.group = group


def _wrappers(model: nn.Module) -> list[tuple[str, _Wrapper]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, _Wrapper)]


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify`: the original modules back in place, ``W_down`` back in its contiguous layout.
    Returns ``model`` (for a bare wrapper, the original module)."""
    for path, wrapper in _wrappers(model):
        if not path:
            return _unwrap_one(model, path, wrapper)
        _unwrap_one(model, path, wrapper)
    return model


def _unwrap_one(model: nn.Module, path: str, wrapper: _Wrapper) -> nn.Module:
    """Put the original module of one wrapper back at ``path`` (``""``: return it), in its original layout."""
    if wrapper.relaid:  # the Parameter is shared by the wrapper and the original projection
        weight = wrapper.relaid_layer.weight
        with torch.no_grad():
            weight.data = weight.detach().contiguous()
    if isinstance(wrapper, ThresholdedLinear):
        wrapper.unrotate()
    wrapper.original.training = wrapper.training
    if path:
        _replace(model, path, wrapper.original)
    return wrapper.original


def sparse_stats(model: nn.Module) -> dict[str, int]:
    """How many FFN calls took the sparse path and how many the dense one, summed over the model (eager calls)."""
    total = {"sparse": 0, "dense": 0}
    for _, wrapper in _wrappers(model):
        for key, value in wrapper.counter.counts.items():
            total[key] += value
    return total


def is_sparsified(model: nn.Module) -> bool:
    return bool(_wrappers(model))
