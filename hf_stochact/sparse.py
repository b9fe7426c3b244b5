"""Exact sparse ReLU FFNs for CPU decoding: ``hf_stochact.sparsify(model)``.

With ReLU (or ReLU²) on the gate, a hidden neuron whose gate pre-activation is <= 0 is exactly zero, so its row of
``W_up`` and its column of ``W_down`` are not needed. For the few tokens of a decode step, ``sparsify`` computes
the gate densely, takes the union of active neurons over the tokens, and reads only those rows of ``W_up`` and of a
transposed copy of ``W_down`` (rows of active neurons contiguous), in two compiled loops that never build a
gathered copy of the weights. The result equals the dense computation up to float summation order.

When sparsity does not pay -- more than ``max_tokens`` tokens (prefill, large batches) or a union of active
neurons denser than ``max_density`` -- the same call finishes densely with the module's own operations.

MLPs are found by walking the model (no per-model code): a module with a ReLU-family activation under one of the
FFN activation attribute names and either gate/up/down projections (``gate_proj``/``up_proj``/``down_proj`` or a
fused ``gate_up_proj``, gate first) or a down projection alone (plain MLPs: ``fc2``, ``c_proj``,
``dense_4h_to_h``, ...; only the down projection can skip work there, its input being the post-ReLU hidden).

The sparse path runs under ``torch.no_grad()`` / ``torch.inference_mode()`` (as in ``generate``); while autograd
records, the dense path runs, so training a sparsified model stays correct. ``sparsify`` overrides ``forward`` on
the instances it converts (the state dict, ``save_pretrained`` and the class are untouched; :func:`unsparsify`
restores them). The transposed ``W_down`` copy (extra memory: one down projection per MLP) is refreshed
automatically if the weights change in place.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FFN_ACTIVATION_ATTRS

try:
    from . import _kernels
except ImportError:  # pragma: no cover
    _kernels = None

GATED_NAMES = (("gate_proj", "up_proj", "down_proj"),)
FUSED_GATED_NAMES = (("gate_up_proj", "down_proj"),)
PLAIN_DOWN_NAMES = ("down_proj", "fc2", "c_proj", "dense_4h_to_h", "fc_out", "wo")
_WEIGHT_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_KERNEL_TOKENS = 16  # the C loops' limit (MAX_T)
# Who computes the dense gate: MKL (torch) is faster on large float32 matrices, the compiled loop on small ones and
# on bfloat16 (measured: docs/sparse_inference.md). None = choose so; True/False force one (benchmarks).
_GATE_BY_TORCH: bool | None = None
_TORCH_GATE_MIN = 4 * 2**20


@dataclasses.dataclass
class SparseConfig:
    """When the sparse path runs (else the dense fallback).

    Args:
        max_tokens: at most this many tokens per call (decode steps, small batches); more -> dense.
        max_density: at most this fraction of neurons active in the union over the tokens; more -> dense. The
            sparse loops break even with the dense MLP at about 75% active neurons (float32, one token, 576x1536
            on a 2-core Xeon: 0.97x at 80% active, 1.05x at 70%; larger MLPs gain earlier: docs/sparse_inference.md).
    """

    max_tokens: int = 4
    max_density: float = 0.7

    def __post_init__(self) -> None:
        if not 1 <= int(self.max_tokens) <= MAX_KERNEL_TOKENS:
            raise ValueError(f"max_tokens must be in [1, {MAX_KERNEL_TOKENS}], got {self.max_tokens}")
        if not 0.0 <= float(self.max_density) <= 1.0:
            raise ValueError(f"max_density must be in [0, 1], got {self.max_density}")


def _is_relu_family(module: nn.Module) -> bool:
    return isinstance(module, nn.ReLU) or type(module).__name__ in {"ReLU", "ReLUSquaredActivation"}


def _activation_of(module: nn.Module) -> tuple[str, nn.Module] | None:
    for attr in FFN_ACTIVATION_ATTRS:
        child = module._modules.get(attr)
        if child is not None:
            return attr, child
    return None


def _linear_parts(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(weight as [out, in], bias, weight as [in, out]) of an nn.Linear or a GPT-2 Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.weight, layer.bias, None
    if type(layer).__name__ == "Conv1D":  # weight is [in, out]: already the transposed layout
        return None, layer.bias, layer.weight
    raise TypeError(f"unsupported projection {type(layer).__name__}")


class _DownRows:
    """W_down stored as [d_ff, d] (rows of neurons contiguous), refreshed when the weight changes in place."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self._version = None
        self.rows: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        weight, _, transposed = _linear_parts(self.layer)
        if transposed is not None:
            return transposed.contiguous()
        key = (weight.data_ptr(), weight.dtype, _version(weight))
        if self.rows is None or self._version != key:
            self.rows = weight.detach().t().contiguous()
            self._version = key
        return self.rows


def _version(t: torch.Tensor) -> int | None:
    # tensors created under inference_mode have no version counter (and cannot change in place); asking raises,
    # and raising costs more than the whole sparse MLP of a small model
    return None if t.is_inference() else t._version


def _kernel_ok(*tensors: torch.Tensor) -> bool:
    return _kernels is not None and all(t.device.type == "cpu" and t.dtype in _WEIGHT_DTYPES for t in tensors)


def gather_dot(weight: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x @ weight[idx].T`` ([T, k]) without copying rows: weight [N, d], x [T, d] float32, idx int64."""
    if not _kernel_ok(weight) or not weight.is_contiguous():
        return x @ weight.index_select(0, idx).to(x.dtype).t()
    x = x.to(torch.float32).contiguous()
    out = torch.empty(x.shape[0], idx.numel(), dtype=torch.float32)
    _kernels.gather_dot(weight.data_ptr(), x.data_ptr(), idx.data_ptr(), out.data_ptr(), weight.shape[1],
                        idx.numel(), x.shape[0], _WEIGHT_DTYPES[weight.dtype], torch.get_num_threads())
    return out


def gather_axpy(rows: torch.Tensor, h: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``h @ rows[idx]`` ([T, d]) without copying rows: rows [N, d], h [T, k] float32, idx int64."""
    if not _kernel_ok(rows) or not rows.is_contiguous():
        return h @ rows.index_select(0, idx).to(h.dtype)
    h = h.to(torch.float32).contiguous()
    out = torch.empty(h.shape[0], rows.shape[1], dtype=torch.float32)
    _kernels.gather_axpy(rows.data_ptr(), h.data_ptr(), idx.data_ptr(), out.data_ptr(), rows.shape[1],
                         idx.numel(), h.shape[0], _WEIGHT_DTYPES[rows.dtype], torch.get_num_threads())
    return out


def _active(h: torch.Tensor) -> torch.Tensor:
    """int64 indices of neurons non-zero for any token of h [T, d_ff]."""
    mask = h[0] != 0 if h.shape[0] == 1 else (h != 0).any(0)
    return mask.nonzero().squeeze(1)


def _needs_grad(module: nn.Module, x: torch.Tensor) -> bool:
    """The compiled loops have no backward: while autograd records (training), stay on the dense path."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _use_sparse(tokens: int, active: int, width: int, cfg: SparseConfig) -> bool:
    return tokens <= cfg.max_tokens and active <= cfg.max_density * width


# ----------------------------------------------------------------------------------------------------------------
# The two forwards


def _gated_forward(self, x: torch.Tensor) -> torch.Tensor:
    st = self._hf_sparse
    cfg: SparseConfig = st["config"]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.shape[0] > cfg.max_tokens or _needs_grad(self, x):
        st["calls"]["dense"] += 1
        return st["dense_forward"](x)
    w_gate, b_gate, w_up, b_up = st["gate_up"]()
    if _kernel_ok(x, w_gate, w_up) and w_gate.is_contiguous() and w_up.is_contiguous():
        return _fused_gated(self, st, x2, w_gate, b_gate, w_up, b_up).to(x.dtype).reshape(*shape[:-1], -1)
    g = getattr(self, st["act"])(F.linear(x2, w_gate, b_gate))
    idx = _active(g)
    if not _use_sparse(x2.shape[0], idx.numel(), g.shape[1], cfg):
        st["calls"]["dense"] += 1
        h = g * F.linear(x2, w_up, b_up)
        return getattr(self, st["down"])(h).reshape(*shape[:-1], -1)
    st["calls"]["sparse"] += 1
    up = gather_dot(w_up, x2, idx)
    if b_up is not None:
        up = up + b_up[idx]
    h = g.index_select(1, idx).to(up.dtype) * up
    y = gather_axpy(st["down_rows"].get(), h, idx)
    _, b_down, _ = _linear_parts(getattr(self, st["down"]))
    if b_down is not None:
        y = y + b_down
    return y.to(x.dtype).reshape(*shape[:-1], -1)


def _fused_gated(self, st, x2, w_gate, b_gate, w_up, b_up) -> torch.Tensor:
    """The whole decode-step MLP in one compiled call (_kernels.sparse_mlp); dense finish if too many active."""
    cfg: SparseConfig = st["config"]
    tokens, d = x2.shape
    d_ff = w_gate.shape[0]
    buffers = st.get("buffers")
    if buffers is None:  # allocated once per module: nothing large is allocated per call
        buffers = st["buffers"] = (torch.empty(MAX_KERNEL_TOKENS, d_ff), torch.empty(d_ff, dtype=torch.int64),
                                   torch.empty(MAX_KERNEL_TOKENS * d_ff))
    g, idx, h = buffers
    down = getattr(self, st["down"])
    _, b_down, _ = _linear_parts(down)
    rows = st["down_rows"].get()
    xf = x2.to(torch.float32).contiguous()
    y = torch.empty(tokens, rows.shape[1])
    biases = [None if b is None else b.detach().to(torch.float32).contiguous() for b in (b_gate, b_up, b_down)]
    ptr = [0 if b is None else b.data_ptr() for b in biases]
    gate_ptr = w_gate.data_ptr()
    by_torch = _GATE_BY_TORCH
    if by_torch is None:
        by_torch = w_gate.dtype == torch.float32 and w_gate.numel() >= _TORCH_GATE_MIN
    if by_torch:
        if w_gate.dtype == torch.float32:
            torch.matmul(xf, w_gate.t(), out=g[:tokens])
            if b_gate is not None:
                g[:tokens] += biases[0]
        else:
            g[:tokens].copy_(F.linear(x2.to(w_gate.dtype), w_gate, b_gate))
        gate_ptr = 0
    k = _kernels.sparse_mlp(xf.data_ptr(), gate_ptr, ptr[0], w_up.data_ptr(), ptr[1], rows.data_ptr(),
                            ptr[2], g.data_ptr(), idx.data_ptr(), h.data_ptr(), y.data_ptr(), d, d_ff, tokens,
                            int(cfg.max_density * d_ff), st["act_kind"], _WEIGHT_DTYPES[w_gate.dtype],
                            torch.get_num_threads())
    if k >= 0:
        st["calls"]["sparse"] += 1
        return y
    st["calls"]["dense"] += 1
    act = g[:tokens].to(x2.dtype)  # too many active neurons: finish densely from the computed gate
    return down(act * F.linear(x2, w_up, b_up))


def _down_forward(self, h: torch.Tensor) -> torch.Tensor:
    """Forward of a down projection whose input is a post-ReLU hidden (plain MLPs)."""
    st = self._hf_sparse
    cfg: SparseConfig = st["config"]
    shape = h.shape
    h2 = h.reshape(-1, shape[-1])
    if h2.shape[0] > cfg.max_tokens or _needs_grad(self, h):
        st["calls"]["dense"] += 1
        return st["dense_forward"](h)
    idx = _active(h2)
    if not _use_sparse(h2.shape[0], idx.numel(), h2.shape[1], cfg):
        st["calls"]["dense"] += 1
        return st["dense_forward"](h)
    st["calls"]["sparse"] += 1
    y = gather_axpy(st["down_rows"].get(), h2.index_select(1, idx), idx)
    _, bias, _ = _linear_parts(self)
    if bias is not None:
        y = y + bias
    return y.to(h.dtype).reshape(*shape[:-1], -1)


# ----------------------------------------------------------------------------------------------------------------
# Finding and converting MLPs


def _gate_up_getter(mlp: nn.Module, names: tuple[str, ...]):
    if len(names) == 3:
        gate, up = getattr(mlp, names[0]), getattr(mlp, names[1])
        return lambda: (gate.weight, gate.bias, up.weight, up.bias)
    fused = getattr(mlp, names[0])

    def split():
        half = fused.weight.shape[0] // 2
        bias = fused.bias
        return (fused.weight[:half], None if bias is None else bias[:half],
                fused.weight[half:], None if bias is None else bias[half:])

    return split


def _plan(module: nn.Module) -> dict[str, Any] | None:
    """How to convert ``module`` (a dict), or None if it is not a ReLU FFN."""
    found = _activation_of(module)
    if found is None or not _is_relu_family(found[1]):
        return None
    children = module._modules
    for names in GATED_NAMES + FUSED_GATED_NAMES:
        if all(isinstance(children.get(n), nn.Linear) for n in names):
            return {"kind": "gated", "act": found[0], "names": names}
    for name in PLAIN_DOWN_NAMES:
        if children.get(name) is not None and type(children[name]).__name__ in {"Linear", "Conv1D"}:
            return {"kind": "down", "act": found[0], "down": name}
    return None


def sparsify(model: nn.Module, config: SparseConfig | None = None, **kwargs: Any) -> nn.Module:
    """Convert in place every ReLU/ReLU² FFN of ``model`` (or ``model`` itself, if it is one) to the exact sparse path.

    Args:
        model: a transformers model, or a single MLP module.
        config: a :class:`SparseConfig`; keyword arguments (``max_tokens``, ``max_density``) build one.

    Returns ``model``.

    Raises:
        ValueError: if no FFN with a ReLU-family activation is found (the message lists the activations found),
            or on bad config values.
    """
    cfg = config or SparseConfig(**kwargs)
    converted = 0
    for module in list(model.modules()):
        plan = _plan(module)
        if plan is None or hasattr(module, "_hf_sparse"):
            continue
        if plan["kind"] == "gated":
            target = module
            down_name = plan["names"][-1]
            act_kind = 1 if type(getattr(module, plan["act"])).__name__ == "ReLUSquaredActivation" else 0
            state = {"config": cfg, "act": plan["act"], "down": down_name, "act_kind": act_kind,
                     "gate_up": _gate_up_getter(module, plan["names"]),
                     "down_rows": _DownRows(getattr(module, down_name))}
            new_forward = _gated_forward
        else:
            target = getattr(module, plan["down"])
            state = {"config": cfg, "down_rows": _DownRows(target)}
            new_forward = _down_forward
        state["dense_forward"] = target.forward
        state["calls"] = {"sparse": 0, "dense": 0}
        target._hf_sparse = state
        target.forward = types.MethodType(new_forward, target)
        converted += 1
    if converted == 0 and not any(hasattr(m, "_hf_sparse") for m in model.modules()):
        kinds = set()
        for m in model.modules():
            found = _activation_of(m)
            if found is not None:
                kinds.add(type(found[1]).__name__)
        kinds = sorted(kinds)
        raise ValueError(f"sparsify: no FFN with a ReLU or ReLU² activation in {type(model).__name__} (FFN "
                         f"activations found: {', '.join(kinds) or 'none'}). Fine-tune to ReLU first, e.g. with "
                         "StochActSchedule or `hf-stochact relufy`.")
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Undo :func:`sparsify` (restore the original forwards, drop the transposed copies). Returns ``model``."""
    for module in model.modules():
        if hasattr(module, "_hf_sparse"):
            del module.forward
            del module._hf_sparse
    return model


def sparse_stats(model: nn.Module) -> dict[str, int]:
    """How many FFN calls took the sparse path and how many fell back to dense, summed over the model."""
    total = {"sparse": 0, "dense": 0}
    for module in model.modules():
        for key, value in getattr(module, "_hf_sparse", {}).get("calls", {}).items():
            total[key] += value
    return total


def is_sparsified(model: nn.Module) -> bool:
    return any(hasattr(m, "_hf_sparse") for m in model.modules())
