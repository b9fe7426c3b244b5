"""The checked entry of the native decode step (``kernels/csrc/decode.c``): the only code that turns tensors into the
pointers and sizes the step reads. :mod:`hf_stochact.runtime.native` decides *what* runs (which modules, which
layout); this module checks *that it can be read*: every tensor plain, on the CPU, strided, contiguous in the layout
named, float32/bfloat16, of exactly the size the spec states. A :class:`Plan` keeps a reference to every tensor it
points into, so the memory it reads stays alive for as long as the plan does, whatever happens to the model.
"""

from __future__ import annotations

import dataclasses

import torch

from . import ops

ROWS, INPUT_ROWS = 0, 1
NORM_RMS, NORM_RMS_ONE_PLUS = 1, 2
ACTIVATIONS = {"silu": 0, "gelu_tanh": 1, "gelu": 2, "relu": 3, "relu2": 4}
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}


def available() -> bool:
    """Whether the compiled loops include the native step and are switched on in this thread."""
    return ops.c_loops_active() and hasattr(ops._C, "decode_step")


def readable(t: torch.Tensor | None) -> bool:
    """A tensor the step can read in place: plain, CPU, strided, float32/bfloat16, non-empty, contiguous."""
    return t is None or (t.__class__ in (torch.Tensor, torch.nn.Parameter) and t.is_cpu and t.layout is torch.strided
                         and t.dtype in _DTYPES and t.numel() > 0 and t.is_contiguous())


@dataclasses.dataclass
class Keep:
    """The tensors a plan points into (aliases: the memory stays alive even if the model drops or swaps them)."""

    tensors: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def ptr(self, t: torch.Tensor) -> int:
        self.tensors.append(t.detach())
        return t.data_ptr()


def linear_spec(keep: Keep, weight: torch.Tensor, bias: torch.Tensor | None, layout: int, d_in: int, d_out: int,
                threshold: float = -1.0, rotation: torch.Tensor | None = None) -> tuple:
    """A linear layer: ``weight`` [d_out, d_in] (``ROWS``) or [d_in, d_out] (``INPUT_ROWS``: inputs with
    ``|x| <= threshold`` skipped, ``threshold < 0``: only exact zeros), contiguous; ``rotation`` R [d_in, d_in]
    float32: the layer reads ``x R``. Raises ValueError otherwise."""
    rot = 0
    if rotation is not None:
        if rotation.dtype != torch.float32 or tuple(rotation.shape) != (d_in, d_in) or not readable(rotation):
            raise ValueError(f"rotation {tuple(rotation.shape)} {rotation.dtype} is not a contiguous float32 "
                             f"[{d_in}, {d_in}] matrix")
        rot = keep.ptr(rotation)
    shape = (d_out, d_in) if layout == ROWS else (d_in, d_out)
    if not readable(weight) or tuple(weight.shape) != shape:
        raise ValueError(f"weight {tuple(weight.shape)} {weight.dtype} is not a contiguous CPU float32/bfloat16 "
                         f"{shape} matrix")
    b = None
    if bias is not None:
        if tuple(bias.shape) != (d_out,):
            raise ValueError(f"bias {tuple(bias.shape)} does not fit {d_out} outputs")
        b = bias.detach().to(torch.float32).contiguous()  # itself when float32 (in-place updates reach the step);
        # a bfloat16 bias is read through this copy, which the runtime's fingerprint re-checks by the bias' version
    return (keep.ptr(weight), 0 if b is None else keep.ptr(b), _DTYPES[weight.dtype], layout, d_in, d_out,
            float(threshold), rot)


def norm_spec(keep: Keep, weight: torch.Tensor, kind: int, eps: float) -> tuple:
    """An RMS norm over ``weight.numel()`` features: ``x / rms(x) * w`` (``NORM_RMS``) or ``* (1 + w)``."""
    if not readable(weight) or weight.dim() != 1:
        raise ValueError(f"norm weight {tuple(weight.shape)} {weight.dtype} is not a CPU float32/bfloat16 vector")
    return keep.ptr(weight), _DTYPES[weight.dtype], kind, float(eps), weight.numel()


def embedding_spec(keep: Keep, weight: torch.Tensor, d: int) -> tuple[int, int, int]:
    if not readable(weight) or weight.dim() != 2 or weight.shape[1] != d:
        raise ValueError(f"embedding {tuple(weight.shape)} {weight.dtype} is not a contiguous CPU float32/bfloat16 "
                         f"[vocab, {d}] matrix")
    return keep.ptr(weight), _DTYPES[weight.dtype], weight.shape[0]


class Plan:
    """A built plan (the C capsule and the tensors it reads)."""

    def __init__(self, model_spec: tuple, layer_specs: tuple, keep: Keep):
        self.capsule = ops._C.decode_plan(model_spec, layer_specs)
        self.keep = keep
        self.vocab = model_spec[3]
        self.n_rope, self.rope_dim = model_spec[8], model_spec[9]
        self.n_layers = len(layer_specs)


def cache_spec(keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor, kv_heads: int, head_dim: int,
               keep: Keep) -> tuple:
    """One layer of HF's static cache: keys/values [1, kv_heads, capacity, head_dim] contiguous, length an int64
    scalar. Raises ValueError otherwise."""
    for t in (keys, values):
        if not readable(t) or t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != kv_heads or t.shape[3] != head_dim:
            raise ValueError(f"cache tensor {tuple(t.shape)} {t.dtype} is not [1, {kv_heads}, capacity, {head_dim}]")
    if values.shape != keys.shape or values.dtype != keys.dtype:
        raise ValueError("cache keys and values differ in shape or dtype")
    if length.__class__ is not torch.Tensor or length.dtype != torch.int64 or length.numel() != 1 \
            or not length.is_cpu or not length.is_contiguous():
        raise ValueError("cache length is not an int64 CPU scalar")
    return keep.ptr(keys), keep.ptr(values), _DTYPES[keys.dtype], keys.shape[2], keep.ptr(length)


def step(plan: Plan, token: int, rope: torch.Tensor | None, rope_offset: int, cache: tuple, seed: int,
         draws: tuple | None, logits: torch.Tensor) -> bool:
    """Run one decode step; ``logits`` float32 [vocab] contiguous (written). False: a full-attention cache is full
    (nothing written). ``rope`` float32 [positions, n_rope, 2, rope_dim], read at row ``rope_offset``. ``draws``:
    None, or per layer None or ``(round(p * 2**32), negative_only, smooth activation code)``: that layer's FFN
    activation is the smooth one with probability p per element (else ReLU), drawn from ``seed``."""
    if logits.dtype != torch.float32 or not logits.is_cpu or not logits.is_contiguous() or \
            logits.numel() != plan.vocab:
        raise ValueError("logits must be a contiguous float32 CPU vector of the vocabulary's size")
    if len(cache) != plan.n_layers:
        raise ValueError("one cache entry per layer expected")
    address = 0
    if plan.rope_dim > 0 and rope is None:
        raise ValueError("this plan needs a rope table")
    if rope is not None:
        if rope.dtype != torch.float32 or not rope.is_cpu or not rope.is_contiguous() or rope.dim() != 4 or \
                tuple(rope.shape[1:]) != (plan.n_rope, 2, plan.rope_dim) or not 0 <= rope_offset < rope.shape[0]:
            raise ValueError("rope table of the wrong shape or out of range")
        address = rope.data_ptr() + rope_offset * rope[0].numel() * 4
    if draws is not None and len(draws) != plan.n_layers:
        raise ValueError("one draw entry per layer expected")
    return ops._C.decode_step(plan.capsule, token, address, cache, seed & (2**64 - 1), draws, logits.data_ptr(),
                              torch.get_num_threads()) == 0
