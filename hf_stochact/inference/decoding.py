"""Stochastic decoding: FFN activations drawn at random at every forward of ``generate`` (prefill and each step).

One rule per kind of FFN activation (:data:`RULES`; ``stochastic_p`` always means the probability of the smooth
branch -- SiLU or the model's own activation -- and ``1 - p`` that of ReLU):

=====================================  ===============================================  =========================
the model's FFN activation             what each element draws at every forward         default ``stochastic_p``
=====================================  ===============================================  =========================
``"stochastic"`` (our module)          its own spec (paper / blog variant, k-way mix);  the spec's own ``p``
                                       ``stochastic_p`` replaces P(SiLU) (two-way only)
ReLU (every model ``StochActSchedule``  StochA, as in the paper's generation experiment:  0.5 (StochA's training
or ``relufy`` produced)                x >= 0 -> x; x < 0 -> SiLU(x) with prob. p,      default)
                                       else 0
SiLU (Llama, Qwen, Mistral, SmolLM...)  SiLU(x) with prob. p, else ReLU(x)               0.9
any other f (GELU, ReLU², learned)      f(x) with prob. p, else ReLU(x)                  0.9
=====================================  ===============================================  =========================

A call in which no element can be drawn at random (``p`` = 0 or 1 everywhere) warns: it decodes deterministically.

How: a call's draws are *per-call state* (:mod:`hf_stochact.activations.scope`), read by the activation modules at
every forward; the model's modules are never changed during a call, so concurrent plain and stochastic ``generate``
calls on one model (threads of a server) do not leak into each other, and ``torch.compile`` sees the decision
through Dynamo's guards. Stochastic modules read it in their ``forward``; stock activation modules get one forward
hook (:func:`attach`), put on every FFN activation when a transformers model is built after ``import hf_stochact``
(so a later ``torch.compile`` traces it) and by :func:`~hf_stochact.set_activation`; it does nothing outside a
stochastic call. A model built before the import gets it at its first stochastic call: compile it after that.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from .. import kernels
from ..activations import StochasticActivation, StochasticSpec, scope
from ..activations.stochastic import check_probability
from ..layouts import find_mlps, relu_kind

#: Draw kinds for stock (non-stochastic) activations.
STOCHA = "stocha"  # ReLU models: x >= 0 -> x, x < 0 -> SiLU w.p. p else 0
SILU_OR_RELU = "silu_or_relu"  # SiLU models: the fused SiLU/ReLU draw on every element
OWN_OR_RELU = "own_or_relu"  # anything else: the module's own output w.p. p, else ReLU(x)
#: Default ``stochastic_p`` of ReLU models (StochA's default training p) and of other stock activations.
DEFAULT_RELU_P = 0.5
DEFAULT_STOCK_P = 0.9


@dataclasses.dataclass(frozen=True)
class Rule:
    """One row of the decoding table: for FFN activations of ``kind``, what a stochastic forward draws."""

    kind: str
    draws: str
    p_means: str
    default_p: float | None


RULES = (
    Rule("stochastic", "the module's own spec (paper/blog variant or k-way mix)",
         "P(SiLU); replaces the spec's p (two-way draws only)", None),
    Rule("relu", "StochA: x >= 0 -> x; x < 0 -> SiLU(x) with probability p, else 0", "P(SiLU) on negatives",
         DEFAULT_RELU_P),
    Rule("silu", "SiLU(x) with probability p, else ReLU(x), on every element", "P(SiLU)", DEFAULT_STOCK_P),
    Rule("other", "f(x) (the model's own activation) with probability p, else ReLU(x)", "P(own activation)",
         DEFAULT_STOCK_P),
)


def rule_for(module: nn.Module) -> Rule:
    """The :data:`RULES` row that applies to an FFN activation module."""
    if isinstance(module, StochasticActivation):
        return RULES[0]
    if relu_kind(module) == 0:
        return RULES[1]
    if _is_silu(module):
        return RULES[2]
    return RULES[3]


def _is_silu(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(module, (nn.SiLU, SiLUActivation))


# ---------------------------------------------------------------------------------------------------------------
# The hook on stock activation modules (the modules hf_stochact does not own)


def _stock_draw(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook of a stock FFN activation: its output for the current call's draw, or None (unchanged)."""
    draw = scope.draw_for(module)
    if draw is None:
        return None
    kind, p = draw
    return scope.draw_seeded(lambda seed, x, out: _stock_output(kind, p, seed, x, out), inputs[0], output)


def _stock_output(kind: str, p: float, seed: torch.Tensor, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    if kind == STOCHA:
        return kernels.silu_relu_draw(x, seed, p, negative_only=True)
    if kind == SILU_OR_RELU:
        return kernels.silu_relu_draw(x, seed, p, negative_only=False)
    keep = kernels.bernoulli(seed, tuple(x.shape), kernels.threshold(p), x.device)
    return torch.where(keep, output, torch.relu(x))


_stock_draw._hf_stochact_internal = True  # sparsify: not a user hook (does not force the dense path)


def attach_module(module: nn.Module) -> bool:
    """Give one stock activation module the decoding hook (idempotent). Returns whether it was added."""
    if isinstance(module, StochasticActivation) or _stock_draw in module._forward_hooks.values():
        return False
    module.register_forward_hook(_stock_draw)
    return True


def attach(model: nn.Module) -> int:
    """Give every stock FFN activation of ``model`` the decoding hook (idempotent; returns how many were added).

    Runs at the end of every transformers model's ``post_init`` after ``import hf_stochact``."""
    return sum(attach_module(mlp.activation) for mlp in find_mlps(model))


# ---------------------------------------------------------------------------------------------------------------
# A call's draws

#: One object per distinct spec (stable Dynamo guards), for the most recently used specs only: a caller sweeping
#: ``stochastic_p`` over many values must not grow memory (or a compiled model's guards) without bound.
_SPECS: collections.OrderedDict[StochasticSpec, StochasticSpec] = collections.OrderedDict()
_SPECS_MAX = 64
_SPECS_LOCK = threading.Lock()


def _intern(spec: StochasticSpec) -> StochasticSpec:
    with _SPECS_LOCK:
        found = _SPECS.get(spec)
        if found is not None:
            _SPECS.move_to_end(spec)
            return found
        _SPECS[spec] = spec
        if len(_SPECS) > _SPECS_MAX:
            _SPECS.popitem(last=False)
        return spec


def plan(model: nn.Module, p: float | None = None) -> dict[int, object]:
    """The draws of a stochastic call on ``model``: FFN activation module id -> what it draws (see :data:`RULES`).

    Raises:
        ValueError: ``p`` is not a number in [0, 1]; ``model`` has no FFN activation module; ``p`` given for a
            stochastic module that draws among k activations (``p`` is a two-way probability).
    """
    if p is not None:
        p = check_probability("stochastic_p", p)
    found = find_mlps(model)
    if not found:
        raise ValueError(f"stochastic_activation=True, but {type(model).__name__} has no FFN activation module "
                         "(looked for activation modules under act_fn / act / activation_fn / intermediate_act_fn / "
                         "activation), so decoding could not be made stochastic")
    draws: dict[int, object] = {}
    for mlp in found:
        module = mlp.activation
        rule = rule_for(module)
        if rule.kind == "stochastic":
            spec = module.spec
            if p is not None:
                if spec.choices is not None:
                    raise ValueError(
                        f"stochastic_p sets P(SiLU) of a two-way SiLU/ReLU draw, but the stochastic activation at "
                        f"{mlp.activation_path!r} draws among {', '.join(spec.candidates)}; call generate without "
                        "stochastic_p (the model's own mix is used), or change the mix with "
                        "hf_stochact.configure(model, choices=...)")
                spec = spec.replace(p=p)
            draws[id(module)] = _intern(spec)
        else:
            attach_module(module)
            kind = {"relu": STOCHA, "silu": SILU_OR_RELU}.get(rule.kind, OWN_OR_RELU)
            draws[id(module)] = (kind, rule.default_p if p is None else p)
    if not any(_random(d) for d in draws.values()):
        warnings.warn(f"stochastic_activation=True draws nothing at random on {type(model).__name__}: every FFN "
                      f"activation has probability 0 or 1 for its smooth branch ({_describe(draws)}), so decoding is "
                      "deterministic. Use a stochastic_p strictly between 0 and 1.", UserWarning, stacklevel=4)
    return draws


def _random(draw: object) -> bool:
    if isinstance(draw, StochasticSpec):
        return any(0.0 < q < 1.0 for q in draw.probabilities)
    return 0.0 < draw[1] < 1.0


def _describe(draws: Mapping[int, object]) -> str:
    parts = set()
    for d in draws.values():
        parts.add(f"stochastic {d.probabilities}" if isinstance(d, StochasticSpec) else f"{d[0]} p={d[1]:g}")
    return ", ".join(sorted(parts))


@contextlib.contextmanager
def stochastic_decoding(model: nn.Module, p: float | None = None, *,
                        assistant: nn.Module | None = None) -> Iterator[int]:
    """Within the block, in this thread, every FFN activation of ``model`` (and of ``assistant`` if given) draws at
    random at each forward, by the rules of :data:`RULES`. Nothing on the models changes; other threads and other
    models are unaffected. Yields the number of FFN activation modules that draw.

    Args:
        model: any model with FFN activation modules.
        p: ``stochastic_p``, the probability of the smooth branch (SiLU or the model's own activation); default per
            kind (:data:`RULES`).
        assistant: a second model (assisted decoding's draft) that draws by the same rules.

    Raises:
        ValueError: see :func:`plan`.
    """
    draws = plan(model, p)
    if assistant is not None:
        draws.update(plan(assistant, p))
    with scope.active(draws):
        yield len(draws)
