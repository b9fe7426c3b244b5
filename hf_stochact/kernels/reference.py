"""The operators' math in plain torch ops: runs on any device, traces under ``torch.compile`` (inductor fuses it into
one kernel per direction), and defines what the C loops must reproduce bit for bit.

Random bits are counter-based: element ``i`` of a draw with seed ``s`` gets

    u(i) = mix32(mix32(lo32(i) ^ k0) ^ (k1 + hi32(i)))      k0, k1 = low / high 32 bits of s

(``mix32`` is the "lowbias32" integer hash), so a mask is a pure function of (seed, index): backward regenerates
it instead of storing it, the same seed gives the same mask on every device and thread count, and gradient
checkpointing (which restores torch's RNG, hence the seed) recomputes the same mask. Integer work is done in int64
with the values kept in [0, 2^32); products wrap, and only their low 32 bits are kept.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

M32 = 0xFFFFFFFF
TWO32 = 1 << 32
GRANULARITIES = ("element", "token", "tensor")


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def random_bits(seed: torch.Tensor, shape: tuple[int, ...], device: torch.device | str) -> torch.Tensor:
    """int64 tensor of ``shape`` with uniform values in [0, 2^32): u(i) for i = 0 .. numel - 1 in row-major order."""
    i = torch.arange(math.prod(shape), device=device, dtype=torch.int64)
    k0 = seed & M32
    k1 = (seed >> 32) & M32
    return _mix32(_mix32((i & M32) ^ k0) ^ ((k1 + (i >> 32)) & M32)).view(shape)


def threshold(p: float) -> int:
    """The integer t with P(u < t) = round(p * 2^32) / 2^32 for u uniform in [0, 2^32); p = 0 and p = 1 exact."""
    return round(float(p) * TWO32)


def mask_shape(shape: tuple[int, ...], granularity: str) -> tuple[int, ...]:
    """Shape of the draw for ``granularity``: every element, one per token (last dim shared), or one per tensor."""
    if granularity == "element":
        return tuple(shape)
    if granularity == "token":
        return (*shape[:-1], 1) if len(shape) else ()
    if granularity == "tensor":
        return (1,) * len(shape)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def bernoulli(seed: torch.Tensor, shape: tuple[int, ...], p_threshold: int, device) -> torch.Tensor:
    """Bool tensor of ``shape``, True with probability ``p_threshold / 2^32`` per element."""
    return random_bits(seed, shape, device) < p_threshold


def uniform(seed: torch.Tensor, shape: tuple[int, ...], device, dtype=torch.float32) -> torch.Tensor:
    """Floats uniform in the open interval (0, 1): 24 random bits per element (exact in float32)."""
    return ((random_bits(seed, shape, device) >> 8).to(dtype) + 0.5) * 2.0**-24


def categorical(seed: torch.Tensor, shape: tuple[int, ...], cumulative: tuple[int, ...], device) -> torch.Tensor:
    """uint8 index per element: the number of ``cumulative`` thresholds (increasing, in [0, 2^32]) at or below u."""
    bits = random_bits(seed, shape, device)
    index = torch.zeros(shape, dtype=torch.uint8, device=device)
    for t in cumulative:
        index += (bits >= t).to(torch.uint8)
    return index


def _draw_mask(x: torch.Tensor, seed: torch.Tensor, p_threshold: int, negative_only: bool,
               granularity: str) -> torch.Tensor:
    mask = bernoulli(seed, mask_shape(tuple(x.shape), granularity), p_threshold, x.device)
    return mask & (x < 0) if negative_only else mask


def silu_relu_draw(x: torch.Tensor, seed: torch.Tensor, p_threshold: int, negative_only: bool,
                   granularity: str = "element") -> torch.Tensor:
    """SiLU(x) where the drawn mask is set (and x < 0 if ``negative_only``), ReLU(x) elsewhere."""
    mask = _draw_mask(x, seed, p_threshold, negative_only, granularity)
    return torch.where(mask, F.silu(x), torch.relu(x))


def silu_relu_draw_backward(grad: torch.Tensor, x: torch.Tensor, seed: torch.Tensor, p_threshold: int,
                            negative_only: bool, granularity: str = "element") -> torch.Tensor:
    """Gradient of :func:`silu_relu_draw` with the mask regenerated from ``seed``."""
    mask = _draw_mask(x, seed, p_threshold, negative_only, granularity)
    silu_grad = torch.ops.aten.silu_backward(grad, x)
    relu_grad = torch.ops.aten.threshold_backward(grad, x, 0)
    return torch.where(mask, silu_grad, relu_grad)


#: Off the CPU, the eager draw runs these through ``torch.compile`` (one fused kernel per direction instead of a
#: dozen elementwise kernels and their int64 temporaries); inside a compiled model they are traced like any code.
#: Set ``reference.FUSE_OFF_CPU = False`` to run the plain ops (e.g. where no compiler backend is available).
FUSE_OFF_CPU = True
_FUSED: dict = {}
# one compiled variant per (dtype, variant, granularity, p in {0, 1, other}): more than dynamo's default limit of 8
# for one function, and past the limit dynamo would quietly run it unfused
_RECOMPILE_LIMIT = 64


def fused(fn, device: torch.device):
    if not FUSE_OFF_CPU or device.type in ("cpu", "meta") or torch.compiler.is_compiling():
        return fn
    if fn not in _FUSED:
        compiled = torch.compile(fn, dynamic=True)

        def call(*args):
            with torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT):
                return compiled(*args)

        _FUSED[fn] = call
    return _FUSED[fn]


class SiluReluDraw(torch.autograd.Function):
    """Autograd for the torch-op path: saves x and the seed (8 bytes), regenerates the mask in backward."""

    @staticmethod
    def forward(ctx, x, seed, p_threshold: int, negative_only: bool, granularity: str):
        ctx.save_for_backward(x, seed)
        ctx.draw = (p_threshold, negative_only, granularity)
        return fused(silu_relu_draw, x.device)(x, seed, p_threshold, negative_only, granularity)

    @staticmethod
    def backward(ctx, grad):
        x, seed = ctx.saved_tensors
        grad_x = fused(silu_relu_draw_backward, x.device)(grad, x, seed, *ctx.draw)
        return grad_x, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Sparse FFN of a decode step (the operators' default implementation on any device; exact like the C loops)


def relu_activation(g: torch.Tensor, act: int) -> torch.Tensor:
    """ReLU (``act=0``) or ReLU² (``act=1``) of a gate pre-activation, as the sparse operators number them."""
    g = torch.relu(g)
    return g * g if act == 1 else g


def sparse_gated_mlp(x, w_gate, b_gate, w_up, b_up, w_down_t, b_down, act: int, max_density: float):
    """(y, k): y = W_down (act(W_gate x + b) * (W_up x + b)) + b reading only active rows; k = -1 if dense."""
    g = relu_activation(F.linear(x, w_gate, b_gate), act)
    idx = (g != 0).any(0).nonzero().squeeze(1)
    if idx.numel() > max_density * g.shape[1]:
        y = F.linear(g * F.linear(x, w_up, b_up), w_down_t.t(), b_down)
        return y, torch.tensor(-1, dtype=torch.int64)
    up = F.linear(x, w_up.index_select(0, idx), None if b_up is None else b_up.index_select(0, idx))
    y = (g.index_select(1, idx) * up) @ w_down_t.index_select(0, idx).to(x.dtype)
    if b_down is not None:
        y = y + b_down
    return y, torch.tensor(idx.numel(), dtype=torch.int64)


def magnitude_mask(h: torch.Tensor, threshold: float) -> torch.Tensor:
    """``h`` where ``|h| > threshold``, else 0 (threshold 0: ``h`` itself; NaN is kept, as the C loops do)."""
    if threshold <= 0.0:
        return h
    a = h.abs() if h.dtype in (torch.float32, torch.float64) else h.abs().float()  # compared in float32, as the
    return torch.where(a <= threshold, torch.zeros((), dtype=h.dtype, device=h.device), h)  # C loops do


def sparse_down(h, w_t, bias, max_density: float, threshold: float = 0.0):
    """(y, k): y = m(h) W + b reading only the rows of W (= ``w_t``, [d_in, d_out]) where m(h) is non-zero;
    m(h) = h where ``|h| > threshold`` else 0 (:func:`magnitude_mask`)."""
    h = magnitude_mask(h, threshold)
    idx = (h != 0).any(0).nonzero().squeeze(1)
    if idx.numel() > max_density * h.shape[1]:
        return F.linear(h, w_t.t(), bias), torch.tensor(-1, dtype=torch.int64)
    y = h.index_select(1, idx) @ w_t.index_select(0, idx).to(h.dtype)
    if bias is not None:
        y = y + bias
    return y, torch.tensor(idx.numel(), dtype=torch.int64)


def sparse_rows(x, weights, biases, thresholds, max_density: float):
    """(ys, ks): for each member m, ``y_m = m(x) W_m + b_m`` with its own threshold (:func:`sparse_down` per member,
    all reading the same input ``x`` [T, d_in]); ks[m] = active rows or -1 (finished densely)."""
    ys, ks = [], []
    for w_t, bias, t in zip(weights, biases, thresholds):
        y, k = sparse_down(x, w_t, bias, max_density, t)
        ys.append(y)
        ks.append(k)
    return ys, torch.stack(ks)
