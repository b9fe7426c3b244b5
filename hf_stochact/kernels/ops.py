"""The ``hf_stochact::*`` PyTorch operators: schema, CPU kernel (the C loops), default kernel for every other device
(the torch ops of :mod:`.reference`), fake (meta) kernel for ``torch.compile``, and autograd where there is a
backward. Data pointers are taken only here, inside the CPU kernels, after the tensors are checked.

=============================  ==========================================================================
operator                        meaning
=============================  ==========================================================================
``silu_relu_draw``              y = SiLU(x) where the seeded mask is set (and x < 0 if negative_only),
                                else ReLU(x); autograd saves x and the seed, backward regenerates the mask
``silu_relu_draw_backward``     its gradient
``sparse_gated_mlp``            (y, k): a gated ReLU/ReLU² FFN reading only the rows of active neurons
``sparse_down``                 (y, k): a linear layer reading only the rows of its non-zero inputs (or, with a
                                threshold, of inputs with |h| > threshold; the others count as 0)
=============================  ==========================================================================

The CPU kernels fall back to the torch implementation for what the loops do not cover (float16/float64,
tensor subclasses, more than :data:`MAX_TOKENS` tokens) or while :func:`hf_stochact.kernels.torch_only` is active.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from . import reference

try:  # built by `pip install` (setup.py); absent without a C compiler
    from . import _C
except ImportError:  # pragma: no cover - depends on the install
    _C = None

NAMESPACE = "hf_stochact"
MAX_TOKENS = 16  # the C loops' limit per sparse call (MAX_T)
MAX_GROUP = 8  # layers per sparse_rows call (MAX_MEMBERS)
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Who computes the dense gate of sparse_gated_mlp: MKL (torch) is faster on large float32 matrices, the C loop on
# small ones and on bfloat16 (measured: docs/sparse_inference.md).
TORCH_GATE_MIN = 4 * 2**20


class _Switch(threading.local):
    """Per-thread switch between the C loops and the torch implementation (tests and benchmarks compare both)."""

    use_c = True


SWITCH = _Switch()


def c_loops_active() -> bool:
    """Whether CPU kernels run the C loops in this thread (built, and not switched off)."""
    return _C is not None and SWITCH.use_c


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def loop_readable(*tensors: torch.Tensor | None) -> bool:
    """Tensors the C loops can read: plain (no subclass), strided, on the CPU, float32/bfloat16, with storage.
    (On the hot path of every sparse call: plain attribute checks only.)"""
    for t in tensors:
        if t is not None and not (t.__class__ in _PLAIN_TYPES and t.is_cpu and t.layout is torch.strided
                                  and t.dtype in DTYPE_CODES and t.numel() > 0):
            return False
    return True


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    """float32 and contiguous (the tensor itself when it already is: no dispatch on the hot path)."""
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


LIB = torch.library.Library(NAMESPACE, "DEF")
LIB.define("silu_relu_draw(Tensor x, Tensor seed, int threshold, bool negative_only) -> Tensor")
LIB.define("silu_relu_draw_backward(Tensor grad, Tensor x, Tensor seed, int threshold, bool negative_only) -> Tensor")
LIB.define("sparse_gated_mlp(Tensor x, Tensor w_gate, Tensor? b_gate, Tensor w_up, Tensor? b_up, Tensor w_down_t, "
           "Tensor? b_down, int act, float max_density) -> (Tensor, Tensor)")
LIB.define("sparse_down(Tensor h, Tensor w_t, Tensor? bias, float max_density, float threshold=0.0) -> "
           "(Tensor, Tensor)")
LIB.define("sparse_rows(Tensor x, Tensor[] weights, Tensor?[] biases, float[] thresholds, float max_density) -> "
           "(Tensor[], Tensor)")
LIB.define("dense_rows(Tensor x, Tensor w, Tensor? bias) -> Tensor")


# ----------------------------------------------------------------------------------------------------------------
# silu_relu_draw


def _draw_cpu(x: torch.Tensor, seed: torch.Tensor, threshold: int, negative_only: bool) -> torch.Tensor:
    if not (c_loops_active() and loop_readable(x)):
        return reference.silu_relu_draw(x, seed, threshold, negative_only)
    x = x.contiguous()
    y = F.silu(x)
    _C.draw_forward(x.data_ptr(), y.data_ptr(), x.numel(), int(seed), threshold, negative_only,
                    DTYPE_CODES[x.dtype], torch.get_num_threads())
    return y


def _draw_backward_cpu(grad: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, threshold: int,
                       negative_only: bool) -> torch.Tensor:
    if not (c_loops_active() and loop_readable(x, grad)) or grad.dtype != x.dtype or grad.shape != x.shape:
        return reference.silu_relu_draw_backward(grad, x, seed, threshold, negative_only)
    grad, x = grad.contiguous(), x.contiguous()
    grad_x = torch.ops.aten.silu_backward(grad, x).contiguous()
    _C.draw_backward(x.data_ptr(), grad.data_ptr(), grad_x.data_ptr(), x.numel(), int(seed), threshold,
                     negative_only, DTYPE_CODES[x.dtype], torch.get_num_threads())
    return grad_x


def _draw_cuda(x, seed, threshold: int, negative_only: bool):
    return reference.fused(reference.silu_relu_draw, x.device)(x, seed, threshold, negative_only)


def _draw_backward_cuda(grad, x, seed, threshold: int, negative_only: bool):
    return reference.fused(reference.silu_relu_draw_backward, x.device)(grad, x, seed, threshold, negative_only)


LIB.impl("silu_relu_draw", reference.silu_relu_draw, "CompositeExplicitAutograd")
LIB.impl("silu_relu_draw", _draw_cpu, "CPU")
LIB.impl("silu_relu_draw", _draw_cuda, "CUDA")  # the torch ops, fused by torch.compile at run time
LIB.impl("silu_relu_draw_backward", reference.silu_relu_draw_backward, "CompositeExplicitAutograd")
LIB.impl("silu_relu_draw_backward", _draw_backward_cpu, "CPU")
LIB.impl("silu_relu_draw_backward", _draw_backward_cuda, "CUDA")


@torch.library.register_fake(f"{NAMESPACE}::silu_relu_draw", lib=LIB)
def _draw_fake(x, seed, threshold, negative_only):
    return torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::silu_relu_draw_backward", lib=LIB)
def _draw_backward_fake(grad, x, seed, threshold, negative_only):
    return torch.empty_like(x)


def _draw_setup_context(ctx, inputs, output):
    x, seed, threshold, negative_only = inputs
    ctx.save_for_backward(x, seed)  # no mask: backward regenerates it from the seed
    ctx.threshold, ctx.negative_only = threshold, negative_only


def _draw_backward_formula(ctx, grad):
    x, seed = ctx.saved_tensors
    grad_x = torch.ops.hf_stochact.silu_relu_draw_backward(grad, x, seed, ctx.threshold, ctx.negative_only)
    return grad_x, None, None, None


torch.library.register_autograd(f"{NAMESPACE}::silu_relu_draw", _draw_backward_formula,
                                setup_context=_draw_setup_context, lib=LIB)


# ----------------------------------------------------------------------------------------------------------------
# sparse_gated_mlp / sparse_down


def _check_gated(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down) -> None:
    tokens, d = x.shape
    d_ff, d_out = w_down_t.shape
    ok = (w_gate.shape == (d_ff, d) and w_up.shape == (d_ff, d) and (b_gate is None or b_gate.shape == (d_ff,))
          and (b_up is None or b_up.shape == (d_ff,)) and (b_down is None or b_down.shape == (d_out,)))
    if not ok:
        raise ValueError(f"sparse_gated_mlp: inconsistent shapes x {tuple(x.shape)}, w_gate {tuple(w_gate.shape)}, "
                         f"w_up {tuple(w_up.shape)}, w_down_t {tuple(w_down_t.shape)} (expected [T, d], [d_ff, d], "
                         "[d_ff, d], [d_ff, d_out])")


def sparse_gated_c(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act: int, max_density: float):
    """The C loops on tensors already validated (:func:`loop_readable`, contiguous, consistent shapes, 1 to
    MAX_TOKENS tokens): ``(y in x's dtype, k as a Python int)``. Called by the CPU kernel below and, in eager mode,
    directly by sparsify's wrapper (which validates the module's weights itself)."""
    tokens, d = x.shape
    d_ff, d_out = w_down_t.shape
    io = 1 if x.dtype == torch.bfloat16 else 0  # bfloat16 in and out: the loop converts
    xc = x.contiguous() if io else _f32(x)
    bg, bu, bd = _f32(b_gate), _f32(b_up), _f32(b_down)
    g = torch.empty(tokens, d_ff)
    y = torch.empty(tokens, d_out, dtype=torch.bfloat16 if io else torch.float32)
    gate_ptr = w_gate.data_ptr()
    if w_gate.dtype == torch.float32 and w_gate.numel() >= TORCH_GATE_MIN:
        torch.mm(xc, w_gate.t(), out=g)
        if bg is not None:
            g += bg
        gate_ptr = 0  # the C call takes the gate pre-activation from g
    k = _C.sparse_gated_mlp(xc.data_ptr(), gate_ptr, _ptr(bg), w_up.data_ptr(), _ptr(bu), w_down_t.data_ptr(),
                            _ptr(bd), g.data_ptr(), y.data_ptr(), d, d_ff, tokens, int(max_density * d_ff), act,
                            DTYPE_CODES[w_gate.dtype], io, torch.get_num_threads())
    if k < 0:  # too many active neurons: finish densely from the gate the loop computed
        y = F.linear(g.to(x.dtype) * F.linear(x, w_up, b_up), w_down_t.t(), b_down)
    elif y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y, k


def sparse_gated_cpu(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act: int, max_density: float):
    _check_gated(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down)
    weights_ok = loop_readable(w_gate, w_up, w_down_t) and w_gate.dtype == w_up.dtype == w_down_t.dtype
    if not (c_loops_active() and weights_ok and loop_readable(x) and 1 <= x.shape[0] <= MAX_TOKENS
            and w_gate.is_contiguous() and w_up.is_contiguous() and w_down_t.is_contiguous()):
        return reference.sparse_gated_mlp(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density)
    y, k = sparse_gated_c(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density)
    return y, torch.scalar_tensor(k, dtype=torch.int64)


def sparse_down_cpu(h, w_t, bias, max_density: float, threshold: float = 0.0):
    if h.shape[-1] != w_t.shape[0] or (bias is not None and bias.shape != (w_t.shape[1],)):
        raise ValueError(f"sparse_down: inconsistent shapes h {tuple(h.shape)}, w_t {tuple(w_t.shape)} (expected "
                         "[T, d_in], [d_in, d_out])")
    if not (c_loops_active() and loop_readable(h, w_t) and 1 <= h.shape[0] <= MAX_TOKENS and w_t.is_contiguous()):
        return reference.sparse_down(h, w_t, bias, max_density, threshold)
    return sparse_down_c(h, w_t, bias, max_density, threshold)


def sparse_down_c(h, w_t, bias, max_density: float, threshold: float = 0.0):
    """The C loop on validated tensors (:func:`loop_readable`, ``w_t`` contiguous, 1 to MAX_TOKENS tokens):
    ``(y in h's dtype, k as a 0-dim int64 tensor)``."""
    tokens, d_in = h.shape
    hf = _f32(h)
    b = _f32(bias)
    y = torch.empty(tokens, w_t.shape[1])
    k = _C.sparse_down(hf.data_ptr(), w_t.data_ptr(), _ptr(b), y.data_ptr(), d_in, w_t.shape[1], tokens,
                       int(max_density * d_in), DTYPE_CODES[w_t.dtype], torch.get_num_threads(), float(threshold))
    if k < 0:
        y = F.linear(reference.magnitude_mask(h, threshold), w_t.t(), bias)
    return y if y.dtype == h.dtype else y.to(h.dtype), torch.scalar_tensor(k, dtype=torch.int64)


LIB.impl("sparse_gated_mlp", reference.sparse_gated_mlp, "CompositeExplicitAutograd")
LIB.impl("sparse_gated_mlp", sparse_gated_cpu, "CPU")
LIB.impl("sparse_down", reference.sparse_down, "CompositeExplicitAutograd")
LIB.impl("sparse_down", sparse_down_cpu, "CPU")


@torch.library.register_fake(f"{NAMESPACE}::sparse_gated_mlp", lib=LIB)
def _sparse_gated_fake(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density):
    return x.new_empty(x.shape[0], w_down_t.shape[1]), x.new_empty((), dtype=torch.int64, device="cpu")


@torch.library.register_fake(f"{NAMESPACE}::sparse_down", lib=LIB)
def _sparse_down_fake(h, w_t, bias, max_density, threshold=0.0):
    return h.new_empty(h.shape[0], w_t.shape[1]), h.new_empty((), dtype=torch.int64, device="cpu")


# ----------------------------------------------------------------------------------------------------------------
# sparse_rows: several input-sparse layers on one input, one call


def rows_member_ok(d_in: int, w_t: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """What the C loop relies on for one member: a plain, contiguous rows-layout weight [d_in, d_out] that an input
    of ``d_in`` features fits, a float32/bfloat16 weight, and a matching bias."""
    return (loop_readable(w_t, bias) and w_t.is_contiguous() and w_t.dim() == 2 and w_t.shape[0] == d_in
            and (bias is None or bias.shape == (w_t.shape[1],)))


#: multiply-adds per call above which sparse_rows splits the work between threads (measured:
#: examples/bench_kernels.py; below it one thread is as fast and a team's wake-up is pure cost)
ROWS_PARALLEL_MIN = 1 << 16


def rows_spec(w_t: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> tuple[int, int, int, int, float]:
    """The C loop's description of one validated member (:func:`rows_member_ok`; ``bias`` float32 contiguous or
    None): pointers, d_out, dtype code, threshold. Valid while those tensors live unchanged."""
    return w_t.data_ptr(), _ptr(bias), w_t.shape[1], DTYPE_CODES[w_t.dtype], float(threshold)


def sparse_rows_run(x: torch.Tensor, specs: tuple, shapes: list[tuple[int, ...]],
                    max_active: int | None = None) -> tuple[list, tuple]:
    """The C loop on members described by :func:`rows_spec`, all in one call, ``x`` [T, d_in] contiguous
    float32/bfloat16 of 1 to MAX_TOKENS rows: ``(outputs, ks)``, output m of shape ``shapes[m]`` (T x d_out_m
    elements, x's dtype). A member with more than ``max_active`` active rows (default: no limit) gets k = -1 and is
    left unwritten (the caller finishes it)."""
    tokens, d_in = x.shape
    ys = [torch.empty(shape, dtype=x.dtype) for shape in shapes]
    ks = _C.sparse_rows(x.data_ptr(), tokens, d_in, d_in if max_active is None else max_active,
                        1 if x.dtype == torch.bfloat16 else 0, torch.get_num_threads(), ROWS_PARALLEL_MIN,
                        tuple(y.data_ptr() for y in ys), specs)
    return ys, ks


def finish_dense(x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, threshold: float) -> torch.Tensor:
    """A member the loop left to the caller (too many active rows): the masked product, accumulated in float32."""
    y = reference.magnitude_mask(x, threshold).float() @ w_t.float()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def sparse_rows_c(x: torch.Tensor, members, max_density: float) -> tuple[list[torch.Tensor], tuple[int, ...]]:
    """The C loop on validated members (:func:`rows_member_ok` each, ``x`` [T, d_in] float32/bfloat16 contiguous,
    1 to MAX_TOKENS tokens), in one call: ``members`` = [(w_t, bias float32 or None, threshold)]. Returns the
    outputs (in x's dtype, contiguous [T, d_out], separate tensors) and each member's k (-1: finished densely)."""
    specs = tuple(rows_spec(w_t, bias, t) for w_t, bias, t in members)
    ys, ks = sparse_rows_run(x, specs, [(x.shape[0], w_t.shape[1]) for w_t, _, _ in members],
                             int(max_density * x.shape[1]))
    for i, (k, (w_t, bias, t)) in enumerate(zip(ks, members)):
        if k < 0:
            ys[i] = finish_dense(x, w_t, bias, t)
    return ys, ks


def sparse_rows_cpu(x, weights, biases, thresholds, max_density: float):
    if not (c_loops_active() and loop_readable(x) and 1 <= x.shape[0] <= MAX_TOKENS and len(weights) <= MAX_GROUP
            and all(rows_member_ok(x.shape[-1], w, b) for w, b in zip(weights, biases))):
        for w_t, b in zip(weights, biases):
            if w_t.shape[0] != x.shape[-1] or (b is not None and b.shape != (w_t.shape[1],)):
                raise ValueError(f"sparse_rows: inconsistent shapes x {tuple(x.shape)}, w_t {tuple(w_t.shape)} "
                                 "(expected [T, d_in], [d_in, d_out])")
        return reference.sparse_rows(x, weights, biases, thresholds, max_density)
    members = [(w, _f32(b), t) for w, b, t in zip(weights, biases, thresholds)]
    ys, ks = sparse_rows_c(x.contiguous(), members, max_density)
    return [y if y.dtype == x.dtype else y.to(x.dtype) for y in ys], torch.tensor(ks, dtype=torch.int64)


LIB.impl("sparse_rows", reference.sparse_rows, "CompositeExplicitAutograd")
LIB.impl("sparse_rows", sparse_rows_cpu, "CPU")


@torch.library.register_fake(f"{NAMESPACE}::sparse_rows", lib=LIB)
def _sparse_rows_fake(x, weights, biases, thresholds, max_density):
    return [x.new_empty(x.shape[0], w.shape[1]) for w in weights], \
        x.new_empty((len(weights),), dtype=torch.int64, device="cpu")


def dense_rows(x2d: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x2d @ w.T + bias`` by the C loops' matrix-vector product, for a caller that checked :func:`loop_readable`,
    the shapes, a contiguous ``w`` [n, d] and ``x2d`` (:func:`hf_stochact.kernels.rows_input_ok`); x's dtype out."""
    tokens, d = x2d.shape
    n = w.shape[0]
    xf, b = _f32(x2d), _f32(bias)
    y = torch.empty(tokens, n)
    _C.dense_rows(xf.data_ptr(), w.data_ptr(), _ptr(b), y.data_ptr(), n, d, tokens, DTYPE_CODES[w.dtype],
                  torch.get_num_threads())
    return y if x2d.dtype == torch.float32 else y.to(x2d.dtype)


def _dense_rows_reference(x, w, bias):
    y = x.float() @ w.float().t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def _dense_rows_cpu(x, w, bias):
    if w.dim() != 2 or x.shape[-1] != w.shape[1] or (bias is not None and bias.shape != (w.shape[0],)):
        raise ValueError(f"dense_rows: inconsistent shapes x {tuple(x.shape)}, w {tuple(w.shape)} (expected [T, d], "
                         "[n, d])")
    if not (c_loops_active() and x.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS and loop_readable(x, w, bias)
            and w.is_contiguous()):
        return _dense_rows_reference(x, w, bias)
    return dense_rows(x.contiguous(), w, bias)


LIB.impl("dense_rows", _dense_rows_reference, "CompositeExplicitAutograd")
LIB.impl("dense_rows", _dense_rows_cpu, "CPU")


@torch.library.register_fake(f"{NAMESPACE}::dense_rows", lib=LIB)
def _dense_rows_fake(x, w, bias):
    return x.new_empty(x.shape[0], w.shape[0])
