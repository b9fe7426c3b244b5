"""Stochastic activations: the math.

``StochasticActivation`` draws, per element and at every forward pass, which non-linearity to apply.

* ``variant="paper"`` (default, the StochA of Lomeli et al. 2025): for x >= 0 the output is x; for x < 0 it is
  SiLU(x) with probability ``p`` and 0 (ReLU) with probability ``1 - p``.
* ``variant="blog"`` ("Fun with stochastic activations"): every element, whatever its sign, is ReLU(x) or SiLU(x).
* ``choices={"relu": 0.5, "silu": 0.3, "gelu": 0.2}``: a draw among k activations from transformers' ``ACT2FN``
  over the same stochastic region (x < 0 for ``paper``, every element for ``blog``).

**``p`` is the probability of SiLU** (the paper's Figure 1: "SILU: p", "RELU: 1-p"). ``p = 0`` is ReLU;
``p = 1`` with the paper variant is *not* SiLU (positive inputs still pass as x).

The two-way SiLU/ReLU draw is the fast path: a custom autograd Function that keeps only ``x`` (which SiLU keeps
too) and a one-byte mask for backward, and draws its mask from 16-bit slices of 64-bit random words (4 draws
per call into torch's generator instead of one slow float per element). ``p`` is therefore realised to
1/65536; p = 0 and p = 1 are exact.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("paper", "blog")
GRANULARITIES = ("element", "token", "tensor")
MEAN = "mean"
_FAST_PAIR = frozenset({"relu", "silu"})
_UINT16_LEVELS = 65536
_U64 = 2**64 - 1
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

try:  # the compiled loops (hf_stochact/_kernels.c); without them the same math runs as torch ops
    from . import _kernels
except ImportError:  # pragma: no cover - depends on the install
    _kernels = None


def _check_probability(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}") from None
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _known_activations() -> list[str]:
    from transformers.activations import ACT2FN

    return sorted(k for k in ACT2FN if not k.startswith(("stochastic", "learnable_stoch", "gumbel_stoch")))


@dataclasses.dataclass(frozen=True)
class StochasticSpec:
    """Validated settings of a :class:`StochasticActivation` (what ``config.stochastic_activation`` stores).

    Args:
        p: probability of SiLU in the two-way draw, in [0, 1]. Ignored when ``choices`` is given.
        variant: ``"paper"`` (draw only where x < 0, x passes for x >= 0) or ``"blog"`` (draw on every element).
        choices: optional ``{activation name: probability}`` for a k-way draw; names come from ``ACT2FN`` and the
            probabilities must be >= 0 and sum to 1 (tolerance 1e-6). ``{"silu": p, "relu": 1 - p}`` is the
            two-way case and is normalised to ``p``.
        eval_mode: what a module does when it is not sampling (``eval()`` without forced sampling): the name of
            one candidate (deterministically take that branch, e.g. ``"relu"``) or ``"mean"`` (the expectation of
            the draw). Default ``"relu"`` when ReLU is a candidate, else ``"mean"``.
        granularity: ``"element"`` (independent draw per element, the default), ``"token"`` (one draw per token
            shared by all its features) or ``"tensor"`` (one draw per forward pass).

    Raises:
        ValueError: any argument outside the allowed values; the message names it and lists what is allowed.
    """

    p: float = 0.5
    variant: str = "paper"
    choices: tuple[tuple[str, float], ...] | None = None
    eval_mode: str | None = None
    granularity: str = "element"

    def __post_init__(self) -> None:
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        set_("p", _check_probability("p", self.p))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.choices is not None:
            choices = dict(self.choices) if not isinstance(self.choices, Mapping) else dict(self.choices)
            if len(choices) < 2:
                raise ValueError(f"choices needs at least two activations, got {choices!r}")
            known = _known_activations()
            for name, prob in choices.items():
                if name not in known:
                    raise ValueError(f"choices: unknown activation {name!r}; allowed: {', '.join(known)}")
                _check_probability(f"choices[{name!r}]", prob)
            total = sum(float(v) for v in choices.values())
            if abs(total - 1.0) > 1e-6:
                raise ValueError(f"choices probabilities must sum to 1, got {total:.6g} for {choices!r}")
            if set(choices) == _FAST_PAIR:  # the two-way case: keep one canonical form
                set_("p", float(choices["silu"]))
                set_("choices", None)
            else:
                set_("choices", tuple((k, float(v)) for k, v in choices.items()))
        names = self.candidates
        if self.eval_mode is None:
            set_("eval_mode", "relu" if "relu" in names else MEAN)
        allowed = (*names, MEAN)
        if self.eval_mode not in allowed:
            raise ValueError(f"eval_mode must be one of {allowed}, got {self.eval_mode!r}")

    @property
    def candidates(self) -> tuple[str, ...]:
        return ("silu", "relu") if self.choices is None else tuple(k for k, _ in self.choices)

    @property
    def probabilities(self) -> tuple[float, ...]:
        return (self.p, 1.0 - self.p) if self.choices is None else tuple(v for _, v in self.choices)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["choices"] = None if self.choices is None else dict(self.choices)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> StochasticSpec:
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            allowed = [f.name for f in dataclasses.fields(cls)]
            raise ValueError(f"unknown stochastic activation setting(s) {sorted(unknown)}; allowed: {allowed}")
        return cls(**d)

    def replace(self, **changes: Any) -> StochasticSpec:
        merged = self.to_dict()
        if "p" in changes and "choices" not in changes:
            merged["choices"] = None  # setting p means the two-way draw
        if "choices" in changes and changes["choices"] is not None and "eval_mode" not in changes:
            merged["eval_mode"] = None  # re-derive the default for the new candidates
        merged.update(changes)
        return StochasticSpec.from_dict(merged)


# ----------------------------------------------------------------------------------------------------------------
# Random draws


def _mask_shape(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    if granularity == "element":
        return tuple(x.shape)
    if granularity == "token":
        return (*x.shape[:-1], 1) if x.dim() else ()
    return (1,) * x.dim()


def _uniform16(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """int16 tensor of uniform draws over all 65536 values, 4 per 64-bit word of torch's generator."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64)
    words.random_(-(2**63), None, generator=generator)  # the full 64-bit range: every 16-bit slice is uniform
    return words.view(torch.int16)[:n].view(shape)


def _threshold16(prob: float) -> int:
    """r < threshold has probability round(prob * 65536) / 65536 for r uniform over int16."""
    return round(prob * _UINT16_LEVELS) - _UINT16_LEVELS // 2


def draw_seed(generator: torch.Generator | None = None) -> int:
    """A 64-bit seed for one draw, taken from torch's RNG (or ``generator``) and salted with the distributed rank.

    Taking the seed from torch's RNG keeps ``torch.manual_seed`` reproducibility and makes gradient checkpointing
    (which restores that RNG) redraw the same mask. Trainer seeds every rank identically; the rank salt gives each
    rank its own masks, as independent data-parallel replicas should have.
    """
    seed = torch.empty((), dtype=torch.int64).random_(-(2**63), None, generator=generator).item() & _U64
    rank = _rank()
    return seed if rank == 0 else _splitmix64(seed ^ _splitmix64(rank))


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _U64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _U64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _U64
    return z ^ (z >> 31)


def _seeded(seed: int, device) -> torch.Generator:
    """A fresh generator on ``device`` seeded with ``seed`` (the torch-ops fallback's source of the mask)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed & (2**63 - 1))
    return gen


def bernoulli_mask(
    shape: tuple[int, ...], p: float, generator: torch.Generator | None = None, device: torch.device | None = None
) -> torch.Tensor:
    """Bool tensor, True with probability ``p`` (to 1/65536), drawn from torch's generator (or ``generator``)."""
    if p <= 0.0:
        return torch.zeros(shape, dtype=torch.bool, device=device)
    if p >= 1.0:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if device is not None and torch.device(device).type != "cpu":
        return torch.rand(shape, generator=generator, device=device) < p
    return _uniform16(shape, generator) < _threshold16(p)


def categorical_draw(
    shape: tuple[int, ...], probs: tuple[float, ...], generator: torch.Generator | None = None, device=None
) -> torch.Tensor:
    """uint8 tensor of indices into ``probs``, drawn per element (to 1/65536)."""
    cumulative = torch.tensor(probs, dtype=torch.float64).cumsum(0)[:-1]
    if device is not None and torch.device(device).type != "cpu":
        u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
        return torch.bucketize(u, cumulative.to(device), right=True).to(torch.uint8)
    bounds = torch.tensor([_threshold16(float(c)) for c in cumulative], dtype=torch.int16)
    return torch.bucketize(_uniform16(shape, generator), bounds, right=True).to(torch.uint8)


# ----------------------------------------------------------------------------------------------------------------
# The fast two-way path


def _silu_excess(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x) - ReLU(x) = SiLU(-|x|), with the limit 0 at +-inf (torch's SiLU gives NaN at -inf)."""
    return torch.nan_to_num(F.silu(-x.abs()), nan=0.0)


def _draw_and_apply(x, p: float, negative_only: bool, granularity: str, generator):
    """(output, bool mask of SiLU draws, the input as used: contiguous on the compiled path)."""
    seed = draw_seed(generator)
    if _fused_ok(x) and granularity == "element":
        x = x.contiguous()
        y = F.silu(x)
        mask = torch.empty(x.shape, dtype=torch.bool)
        _kernels.draw_blend(x.data_ptr(), y.data_ptr(), mask.data_ptr(), x.numel(), seed,
                            round(p * _UINT16_LEVELS), negative_only, _DTYPE_CODES[x.dtype],
                            torch.get_num_threads())
    else:
        mask = bernoulli_mask(_mask_shape(x, granularity), p, _seeded(seed, x.device), x.device)
        if negative_only:
            mask = mask & (x < 0)
        y = torch.where(mask, F.silu(x), torch.relu(x))
    return y, mask, x


class _SiluReluDraw(torch.autograd.Function):
    """y = SiLU(x) where the drawn bool mask m is True, ReLU(x) elsewhere (each branch exactly as torch computes it,
    so NaN stays NaN, +inf stays +inf, and -inf gives SiLU's NaN or ReLU's 0 by the draw).

    Saved for backward: x (SiLU saves it too) and m (1 byte per element; less at coarser granularity). Gradient:
    SiLU'(x) where SiLU was drawn, ReLU'(x) elsewhere. With the compiled loops (CPU, float32/bfloat16, one draw per
    element) the mask is drawn and applied in one pass over x; otherwise ``bernoulli_mask`` and torch ops do it.
    """

    @staticmethod
    def forward(ctx, x, p: float, negative_only: bool, granularity: str, generator):
        y, mask, x = _draw_and_apply(x, p, negative_only, granularity, generator)
        ctx.save_for_backward(x, mask)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, mask = ctx.saved_tensors
        if _fused_ok(x) and mask.shape == x.shape:
            grad = grad.contiguous()
            grad_x = torch.ops.aten.silu_backward(grad, x)
            _kernels.blend_grad(x.data_ptr(), grad.data_ptr(), mask.data_ptr(), grad_x.data_ptr(), x.numel(),
                                _DTYPE_CODES[x.dtype], torch.get_num_threads())
            return grad_x, None, None, None, None
        silu_grad = torch.ops.aten.silu_backward(grad, x)
        relu_grad = torch.ops.aten.threshold_backward(grad, x, 0)
        return torch.where(mask, silu_grad, relu_grad), None, None, None, None


def _fused_ok(x: torch.Tensor) -> bool:
    return _kernels is not None and x.device.type == "cpu" and x.dtype in _DTYPE_CODES and x.numel() > 0


def silu_relu_draw(x: torch.Tensor, p: float, negative_only: bool = True, granularity: str = "element",
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw SiLU with probability ``p`` (else ReLU) per element (or token/tensor) of ``x`` and apply it.

    ``negative_only=True`` is the paper's StochA (x >= 0 passes as x); False is the blog's sign-independent draw.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        return _SiluReluDraw.apply(x, p, negative_only, granularity, generator)
    return _draw_and_apply(x, p, negative_only, granularity, generator)[0]  # no graph: skip autograd bookkeeping


# ----------------------------------------------------------------------------------------------------------------
# The module


class StochasticActivation(nn.Module):
    """A per-element random choice of activation, resampled at every forward pass.

    Args:
        p: probability of **SiLU** (``1 - p`` is the probability of ReLU). Default 0.5.
        variant: ``"paper"`` (default; the draw happens only where x < 0, x >= 0 gives x) or ``"blog"``.
        choices: ``{name: probability}`` over ``ACT2FN`` names for a k-way draw (overrides ``p``).
        eval_mode: behaviour when not sampling: a candidate name (default ``"relu"``) or ``"mean"``.
        granularity: ``"element"`` (default), ``"token"`` or ``"tensor"``.
        generator: optional ``torch.Generator``; by default torch's global RNG (``torch.manual_seed`` reproduces a
            run, and gradient checkpointing, which restores the global RNG state, recomputes the same mask).

    Sampling happens in ``train()`` mode. In ``eval()`` mode the module is deterministic (``eval_mode``) unless
    ``sampling`` is set to True (generation uses this); ``sampling=False`` forces the deterministic path in
    training too. ``sampling=None`` (default) follows ``self.training``.

    Raises:
        ValueError: on invalid settings (see :class:`StochasticSpec`).
    """

    def __init__(
        self,
        p: float = 0.5,
        variant: str = "paper",
        choices: Mapping[str, float] | None = None,
        eval_mode: str | None = None,
        granularity: str = "element",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.spec = StochasticSpec(p=p, variant=variant, choices=choices, eval_mode=eval_mode,
                                   granularity=granularity)
        self.generator = generator
        self.sampling: bool | None = None

    # ---- settings (plain Python attributes: nothing here is a buffer that from_pretrained could clobber)
    @property
    def spec(self) -> StochasticSpec:
        return self._spec

    @spec.setter
    def spec(self, spec: StochasticSpec) -> None:
        if not isinstance(spec, StochasticSpec):
            raise TypeError(f"spec must be a StochasticSpec, got {type(spec).__name__}")
        self._spec = spec
        self._fns = {name: _activation(name) for name in spec.candidates}

    @property
    def p(self) -> float:
        return self._spec.p

    def configure(self, **changes: Any) -> StochasticActivation:
        """Update settings in place (``p``, ``variant``, ``choices``, ``eval_mode``, ``granularity``)."""
        self.spec = self._spec.replace(**changes)
        return self

    @property
    def is_sampling(self) -> bool:
        return self.training if self.sampling is None else bool(self.sampling)

    def extra_repr(self) -> str:
        s = self._spec
        draw = f"p={s.p:g}" if s.choices is None else "choices=" + ", ".join(f"{k}:{v:g}" for k, v in s.choices)
        return f"{draw}, variant={s.variant}, eval_mode={s.eval_mode}, granularity={s.granularity}"

    # ---- math
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self._spec
        if not self.is_sampling:
            return self._deterministic(x)
        if s.choices is None:
            return silu_relu_draw(x, s.p, s.variant == "paper", s.granularity, self.generator)
        return self._k_way(x)

    def _region(self, x: torch.Tensor) -> torch.Tensor | None:
        return (x < 0) if self._spec.variant == "paper" else None

    def _deterministic(self, x: torch.Tensor) -> torch.Tensor:
        s = self._spec
        if s.eval_mode == "relu":
            return torch.relu(x)
        if s.choices is None:  # silu or mean of the two-way draw: ReLU + weight * (SiLU - ReLU) over the region
            weight = 1.0 if s.eval_mode == "silu" else s.p
            if s.variant == "blog" and weight == 1.0:
                return F.silu(x)
            excess = _silu_excess(x) if s.variant == "blog" else _silu_excess(x.clamp(max=0))
            return torch.relu(x) + weight * excess
        if s.eval_mode == MEAN:
            y = sum(prob * self._fns[name](x) for name, prob in s.choices)
        else:
            y = self._fns[s.eval_mode](x)
        region = self._region(x)
        return y if region is None else torch.where(region, y, x)

    def _k_way(self, x: torch.Tensor) -> torch.Tensor:
        s = self._spec
        generator = _seeded(draw_seed(self.generator), x.device)
        index = categorical_draw(_mask_shape(x, s.granularity), s.probabilities, generator, x.device)
        region = self._region(x)
        y = x if region is not None else torch.zeros_like(x)
        for k, name in enumerate(s.candidates):
            chosen = index == k
            if region is not None:
                chosen = chosen & region
            y = torch.where(chosen, self._fns[name](x), y)
        return y


def _activation(name: str) -> nn.Module:
    from transformers.activations import ACT2FN

    return ACT2FN[name]
