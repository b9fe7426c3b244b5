"""Kernels: the ``hf_stochact::*`` PyTorch operators and the device dispatch in front of them.

* CPU: the operators, whose CPU kernels are the C loops (``kernels/csrc/kernels.c``) and which have fake kernels,
  so ``torch.compile`` traces through them without graph breaks.
* Any other device (CUDA, MPS, XPU, meta, ...): the same math as torch ops (:mod:`.reference`), called directly so
  that under ``torch.compile`` inductor fuses the draw into one kernel per direction; a Triton kernel for a device
  would be registered on the operator and routed here, in :func:`silu_relu_draw`.

Randomness is counter-based (:mod:`.reference`): a draw is a pure function of a seed tensor taken from torch's RNG
(:func:`new_seed`) and the element index, identical on every device and thread count, and regenerated in
backward rather than stored.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from . import ops, reference
from .ops import (
    MAX_GROUP,
    MAX_TOKENS,
    c_loops_active,
    dense_rows,
    finish_dense,
    loop_readable,
    rows_member_ok,
    rows_spec,
    sparse_rows_run,
)
from .ops import _f32 as float32
from .reference import GRANULARITIES, bernoulli, categorical, mask_shape, threshold, uniform

__all__ = [
    "GRANULARITIES",
    "MAX_GROUP",
    "MAX_TOKENS",
    "bernoulli",
    "built",
    "c_loops_active",
    "categorical",
    "loop_readable",
    "mask_shape",
    "new_seed",
    "silu_relu_draw",
    "sparse_down",
    "sparse_gated_mlp",
    "sparse_rows",
    "sparse_rows_validated",
    "rows_input_ok",
    "rows_member_ok",
    "dense_rows",
    "rows_spec",
    "sparse_rows_run",
    "finish_dense",
    "float32",
    "threshold",
    "torch_only",
    "uniform",
]

_SEED_HIGH = 2**62
#: On CUDA, route the element-wise draw through the operator (opaque to a compiled graph, which then saves only x and
#: the seed for backward) instead of the traced torch ops (which inductor fuses with their neighbours, but whose
#: partitioner stored the mask: +1 byte/element on the H100, docs/activation_cost_gpu.md). Off by default: this route
#: is covered by tests/test_gpu.py and examples/bench_gpu_activation.py but has not yet run on a device.
CUDA_THROUGH_OPERATOR = False
_U64 = 2**64 - 1


def built() -> bool:
    """Whether the C loops were compiled at install time (else every CPU kernel runs its torch implementation)."""
    return ops._C is not None


@contextlib.contextmanager
def torch_only() -> Iterator[None]:
    """In this thread, run every operator's torch implementation instead of the C loops (tests, benchmarks)."""
    previous = ops.SWITCH.use_c
    ops.SWITCH.use_c = False
    try:
        yield
    finally:
        ops.SWITCH.use_c = previous


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _rank_salt() -> int:
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return 0 if rank == 0 else _splitmix64(rank) % _SEED_HIGH


def new_seed(device: torch.device | str, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 0-dim int64 seed on ``device``, drawn from torch's RNG (or ``generator``), salted with the distributed rank.

    Drawing from torch's RNG keeps ``torch.manual_seed`` reproducibility and makes gradient checkpointing (which
    restores that RNG) redraw the same seed, hence the same mask. Data-parallel ranks are seeded identically by the
    Trainer; the rank salt gives each rank its own masks, as independent replicas should have.
    """
    if generator is not None:
        seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=generator.device, generator=generator)
        seed = seed.to(device)
    else:
        seed = torch.randint(0, _SEED_HIGH, (), dtype=torch.int64, device=device)
    salt = _rank_salt()
    return seed if salt == 0 else seed ^ salt


def silu_relu_draw(x: torch.Tensor, seed: torch.Tensor, p: float, negative_only: bool = True,
                   granularity: str = "element") -> torch.Tensor:
    """SiLU(x) with probability ``p`` (to 2^-32), else ReLU(x), drawn per element / token / tensor from ``seed``.

    ``negative_only=True`` is the paper's StochA (x >= 0 passes as x); False is the blog's sign-independent draw.
    Differentiable; backward saves only ``x`` and the seed.
    """
    t = threshold(p)
    if granularity == "element" and (x.device.type == "cpu" or (CUDA_THROUGH_OPERATOR and x.device.type == "cuda")):
        return torch.ops.hf_stochact.silu_relu_draw(x, seed, t, negative_only)
    return reference.SiluReluDraw.apply(x, seed, t, negative_only, granularity)


def sparse_gated_mlp(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None, w_up: torch.Tensor,
                     b_up: torch.Tensor | None, w_down_t: torch.Tensor, b_down: torch.Tensor | None, act: int,
                     max_density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, k)`` for a gated ReLU (``act=0``) or ReLU² (``act=1``) FFN on ``x`` [T, d], reading only the rows of
    ``w_up`` and ``w_down_t`` (= W_downᵀ, [d_ff, d_out]) of neurons active for some token; k = number of active
    neurons, or -1 where more than ``max_density * d_ff`` were active and the FFN was finished densely.

    In eager mode on CPU the operator's CPU kernel is called directly (the dispatcher would add ~20 us to a call that
    takes ~60 us in a small model's decode step); traced code (``torch.compile``) calls the operator."""
    if x.is_cpu and not torch.compiler.is_compiling():
        return ops.sparse_gated_cpu(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density)
    return torch.ops.hf_stochact.sparse_gated_mlp(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density)


def sparse_gated_mlp_validated(x: torch.Tensor, w_gate: torch.Tensor, b_gate: torch.Tensor | None,
                               w_up: torch.Tensor, b_up: torch.Tensor | None, w_down_t: torch.Tensor,
                               b_down: torch.Tensor | None, act: int, max_density: float) -> tuple[torch.Tensor, int]:
    """Eager fast path of :func:`sparse_gated_mlp` for a caller that has checked the weights (plain, CPU,
    float32/bfloat16, contiguous, consistent): skips the checks, returns k as a Python int. Anything the C loops do
    not take (C loops off, a non-contiguous or float16 x, too many tokens) goes through :func:`sparse_gated_mlp`."""
    if c_loops_active() and 1 <= x.shape[0] <= MAX_TOKENS and loop_readable(x) and x.is_contiguous():
        return ops.sparse_gated_c(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density)
    y, k = sparse_gated_mlp(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act, max_density)
    return y, int(k)


def sparse_down(h: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None, max_density: float,
                threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, k)`` for ``y = m(h) @ w_t + bias`` (``w_t`` [d_in, d_out]) reading only rows where some token of
    ``m(h)`` [T, d_in] is non-zero, ``m(h) = h`` where ``|h| > threshold`` else 0 (a ReLU hidden's exact zeros at
    threshold 0; TEAL-style input sparsity above); k as in :func:`sparse_gated_mlp` (eager CPU calls go straight to
    the CPU kernel)."""
    if h.is_cpu and not torch.compiler.is_compiling():
        return ops.sparse_down_cpu(h, w_t, bias, max_density, threshold)
    return torch.ops.hf_stochact.sparse_down(h, w_t, bias, max_density, threshold)


def sparse_rows(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor | None],
                thresholds: list[float], max_density: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``(ys, ks)``: :func:`sparse_down` for several layers that read the same input ``x`` [T, d_in] (q/k/v,
    gate/up), each with its own rows-layout weight [d_in, d_out_m], bias and threshold, in one call (one pass over
    ``x``, one parallel region); ks[m] = active rows of member m, or -1 where it was finished densely."""
    if x.is_cpu and not torch.compiler.is_compiling():
        return ops.sparse_rows_cpu(x, weights, biases, thresholds, max_density)
    return torch.ops.hf_stochact.sparse_rows(x, weights, biases, thresholds, max_density)


def rows_input_ok(x2d: torch.Tensor) -> bool:
    """Whether the eager fast path (:func:`sparse_rows_validated`) takes this input: C loops on, a plain contiguous
    float32/bfloat16 CPU tensor of 1 to MAX_TOKENS rows."""
    return c_loops_active() and 1 <= x2d.shape[0] <= MAX_TOKENS and loop_readable(x2d) and x2d.is_contiguous()


def sparse_rows_validated(x2d: torch.Tensor, members, max_density: float):
    """Eager path of :func:`sparse_rows` for a caller that checked :func:`rows_input_ok` and
    :func:`rows_member_ok` for every member ``(w_t, float32 bias, threshold)``: no further checks, ks as ints."""
    return ops.sparse_rows_c(x2d, members, max_density)
