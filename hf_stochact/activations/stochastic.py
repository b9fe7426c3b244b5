"""Stochastic activations: the math.

``StochasticActivation`` draws, per element and at every forward pass, which non-linearity to apply.

* ``variant="paper"`` (default, the StochA of Lomeli et al. 2025): for x >= 0 the output is x; for x < 0 it is
  SiLU(x) with probability ``p`` and 0 (ReLU) with probability ``1 - p``.
* ``variant="blog"`` ("Fun with stochastic activations"): every element, whatever its sign, is ReLU(x) or SiLU(x).
* ``choices={"relu": 0.5, "silu": 0.3, "gelu": 0.2}``: a draw among k activations from transformers' ``ACT2FN``
  over the same stochastic region (x < 0 for ``paper``, every element for ``blog``).

**``p`` is the probability of SiLU** (the paper's Figure 1: "SILU: p", "RELU: 1-p"). ``p = 0`` is ReLU;
``p = 1`` with the paper variant is *not* SiLU (positive inputs still pass as x).

The two-way SiLU/ReLU draw is the operator ``hf_stochact::silu_relu_draw`` (:mod:`hf_stochact.kernels`): the mask
is a counter-based hash of a seed taken from torch's RNG and the element index, so backward regenerates it and
keeps only ``x`` (which SiLU keeps too) and the 8-byte seed. ``p`` is realised to 2^-32; p = 0 and p = 1 are exact.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import scope

VARIANTS = ("paper", "blog")
GRANULARITIES = kernels.GRANULARITIES
MEAN = "mean"
_FAST_PAIR = frozenset({"relu", "silu"})


def check_probability(name: str, value: Any) -> float:
    """``value`` as a float in [0, 1]; anything else (a bool, a string, NaN, out of range) raises naming ``name``."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype == torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number in [0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return value


def _choices_dict(choices: Any) -> dict[str, Any]:
    """``{name: probability}`` from a mapping or a sequence of (name, probability) pairs, in the given order."""
    if isinstance(choices, Mapping):
        return dict(choices)
    try:
        pairs = [(name, prob) for name, prob in choices]
    except (TypeError, ValueError):
        raise ValueError(f"choices must be a {{name: probability}} mapping or a list of [name, probability] pairs, "
                         f"got {choices!r}") from None
    return dict(pairs)


def known_activations() -> list[str]:
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
        set_("p", check_probability("p", self.p))
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.choices is not None:
            choices = _choices_dict(self.choices)
            if len(choices) < 2:
                raise ValueError(f"choices needs at least two activations, got {choices!r}")
            known = known_activations()
            for name, prob in choices.items():
                if name not in known:
                    raise ValueError(f"choices: unknown activation {name!r}; allowed: {', '.join(known)}")
                check_probability(f"choices[{name!r}]", prob)
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
        d["choices"] = None if self.choices is None else [[k, v] for k, v in self.choices]  # order kept in JSON
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None, where: str | None = None) -> StochasticSpec:
        """Build from a settings mapping (e.g. ``config.stochastic_activation``). ``where`` (e.g.
        ``"stochastic_activation"``) prefixes every error, so it names the field: ``stochastic_activation.p ...``.

        Raises:
            ValueError: ``d`` is not a mapping, has unknown keys, or a value is invalid.
        """
        prefix = f"{where}." if where else ""
        if d is None:
            d = {}
        if not isinstance(d, Mapping):
            raise ValueError(f"{where or 'stochastic activation settings'} must be a mapping such as "
                             f"{{'p': 0.5, 'variant': 'paper'}}, got {type(d).__name__} {d!r}")
        d = dict(d)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = set(d) - set(allowed)
        if unknown:
            what = f"{where}: unknown setting(s)" if where else "unknown stochastic activation setting(s)"
            raise ValueError(f"{what} {sorted(map(str, unknown))}; allowed: {allowed}")
        try:
            return cls(**d)
        except ValueError as error:  # every message starts with the field's name
            raise ValueError(f"{prefix}{error}") from None

    def replace(self, **changes: Any) -> StochasticSpec:
        merged = self.to_dict()
        if "p" in changes and "choices" not in changes:
            merged["choices"] = None  # setting p means the two-way draw
        if "choices" in changes and changes["choices"] is not None and "eval_mode" not in changes:
            merged["eval_mode"] = None  # re-derive the default for the new candidates
        merged.update(changes)
        return StochasticSpec.from_dict(merged)


def _silu_excess(x: torch.Tensor) -> torch.Tensor:
    """SiLU(x) - ReLU(x) = SiLU(-|x|), with the limit 0 at +-inf (torch's SiLU gives NaN at -inf)."""
    return torch.nan_to_num(F.silu(-x.abs()), nan=0.0)


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
        generator: optional ``torch.Generator`` for the draw's seed; by default torch's global RNG of the input's
            device (``torch.manual_seed`` reproduces a run, and gradient checkpointing, which restores that RNG,
            recomputes the same mask; a generator of your own is not rewound by checkpointing).

    Sampling happens in ``train()`` mode. In ``eval()`` mode the module is deterministic (``eval_mode``) unless
    ``sampling`` is set to True; ``sampling=False`` forces the deterministic path in training too.
    ``sampling=None`` (default) follows ``self.training``. A stochastic ``generate`` call does not touch these
    settings: it samples through per-call state (:mod:`hf_stochact.activations.scope`), in its own thread only.

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
        s = scope.draw_for(self)  # set for the duration of a stochastic generate call, in its thread only
        if s is None:
            if not self.is_sampling:
                return self._deterministic(x)
            return self._draw(kernels.new_seed(x.device, self.generator), x, self._spec)
        return scope.draw_seeded(lambda seed, rows: self._draw(seed, rows, s), x, generator=self.generator)

    def _draw(self, seed: torch.Tensor, x: torch.Tensor, s: StochasticSpec) -> torch.Tensor:
        if s.choices is None:
            return kernels.silu_relu_draw(x, seed, s.p, s.variant == "paper", s.granularity)
        return self._k_way(x, seed, s)

    @staticmethod
    def _region(x: torch.Tensor, s: StochasticSpec) -> torch.Tensor | None:
        """Where the draw happens: x < 0 for the paper's variant, everywhere (None) for the blog's."""
        return (x < 0) if s.variant == "paper" else None

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
        region = self._region(x, s)
        return y if region is None else torch.where(region, y, x)

    def _k_way(self, x: torch.Tensor, seed: torch.Tensor, s: StochasticSpec) -> torch.Tensor:
        cumulative, total = [], 0.0
        for prob in s.probabilities[:-1]:
            total += prob
            cumulative.append(kernels.threshold(total))
        index = kernels.categorical(seed, kernels.mask_shape(tuple(x.shape), s.granularity), tuple(cumulative),
                                    x.device)
        region = self._region(x, s)
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
