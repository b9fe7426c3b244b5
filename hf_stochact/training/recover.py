"""Sparsity-aware recovery training for input thresholds (TEAL-style sparsity, :mod:`hf_stochact.inference.thresholds`):
fine-tune a model *with* its thresholds active in the forward pass, so it learns to do without the inputs the
thresholds drop.

Pieces, usable with any ``Trainer`` (the ``hf-stochact recover`` command puts them together):

* :class:`InputSparsityHooks`: forward pre-hooks on every thresholded layer (found by path in the model, or in a
  PEFT model's base model: a LoRA-wrapped layer is hooked as a whole, so the adapter sees the same sparse input as
  the frozen weight and a merged adapter computes what was trained). In the forward pass the input becomes
  ``m(x)`` (``x`` where ``|x| > t``, else 0), as :class:`~hf_stochact.inference.sparse.ThresholdedLinear` computes
  at inference (rotated thresholds, ``calibrate_thresholds(rotate=...)``: ``m(x R) R⁻¹``, the same product in the
  layer's own basis). The backward pass:

  * ``gradient="ste"`` (straight-through): ``d m(x) / d x = 1``, the gradient reaches every input, dropped or
    not (the forward value is ``x + (m(x) - x).detach()``);
  * ``gradient="masked"``: the gradient of ``m(x)`` itself (zero for dropped inputs).

  ``p`` > 0 is the stochastic-activation idea applied to input sparsity (StochA for thresholds): each input below
  its threshold is kept anyway with probability ``p``, drawn per element and per forward, so the model sees a
  Bernoulli mix of the sparse and the dense input. Only while the module is in training mode: ``eval()`` always
  gives the sparse input.
* :class:`SparseRecoverySchedule`: a ``TrainerCallback`` that attaches the hooks for the run and schedules ``p``:
  from ``p`` down to 0 over the first ``mix_fraction`` of the steps (a pure function of ``state.global_step``, as
  :class:`~hf_stochact.training.schedule.StochActSchedule`), then the plain sparse input until the end; logs
  ``sparse/p``.

The thresholds themselves are calibrated on the dense model before training (``calibrate_thresholds``) and stay
fixed while training; the command recalibrates them on the trained model at the end (same target, same
allocation) so the saved model-wide sparsity is the target's, and reports both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..activations.stochastic import check_probability
from ..inference.thresholds import Thresholds
from .schedule import add_log_metrics

GRADIENTS = ("ste", "masked")


def sparse_input(x: torch.Tensor, threshold: float, p: float = 0.0, gradient: str = "ste") -> torch.Tensor:
    """``x`` where ``|x| > threshold`` (or, with probability ``p`` per element, anyway), else 0; the backward pass
    per ``gradient`` (see the module docstring). ``threshold`` 0 and ``p`` 0 keep every non-zero input."""
    if threshold <= 0.0:
        return x
    with torch.no_grad():
        keep = x.abs() > threshold
        if p > 0.0:
            keep |= torch.rand(x.shape, device=x.device) < p
    masked = x * keep.to(x.dtype)
    if gradient == "ste" and x.requires_grad:
        return x + (masked - x).detach()
    return masked


def _base(model: nn.Module) -> nn.Module:
    """A PEFT model's underlying transformers model (LoRA layers in place at the original paths), else ``model``."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def _check_gradient(gradient: Any) -> None:
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {', '.join(GRADIENTS)}, got {gradient!r}")


class InputSparsityHooks:
    """The thresholds of ``thresholds`` applied to the inputs of ``model``'s layers during training (see the module
    docstring). ``attach()`` / ``detach()``, or use as a context manager.

    Args:
        model: the model being trained (a transformers model or a PEFT model around one).
        thresholds: a :class:`Thresholds` or its dict (``config.sparse_thresholds``); every path must name a module.
        gradient: ``"ste"`` or ``"masked"``.
        p: probability that an input below its threshold is kept anyway (training mode only), in [0, 1].

    Raises:
        ValueError: a bad ``gradient``/``p``, or a threshold path that names no module of ``model``.
    """

    def __init__(self, model: nn.Module, thresholds: Thresholds | Mapping, *, gradient: str = "ste", p: float = 0.0):
        _check_gradient(gradient)
        self.p = p  # checked by the setter
        if not isinstance(thresholds, Thresholds):
            thresholds = Thresholds.from_dict(dict(thresholds))
        self.thresholds = thresholds
        self.gradient = gradient
        base = _base(model)
        thresholds.resolve_rotations(base)
        self.modules: list[tuple[str, nn.Module, float, tuple | None]] = []
        for path, t in thresholds.values.items():
            try:
                module = base.get_submodule(path)
            except AttributeError as error:
                raise ValueError(f"thresholds name {path!r}, which is not a module of {type(base).__name__}") \
                    from error
            self.modules.append((path, module, t, thresholds.transform(path)))
        self._handles: list = []

    @property
    def p(self) -> float:
        return self._p

    @p.setter
    def p(self, value: float) -> None:
        check_probability("p", value)
        self._p = float(value)

    def _hook(self, threshold: float, transform: tuple | None):
        def hook(module: nn.Module, args: tuple) -> tuple:
            p = self._p if module.training else 0.0
            x = args[0]
            if transform is None:
                return (sparse_input(x, threshold, p, self.gradient), *args[1:])
            r, r_inv = (t.to(x.device) for t in transform)  # rotated: m(x R) R⁻¹, the layer's own weights
            return ((sparse_input(x.float() @ r, threshold, p, self.gradient) @ r_inv).to(x.dtype), *args[1:])
        return hook

    def attach(self) -> InputSparsityHooks:
        if not self._handles:
            self._handles = [m.register_forward_pre_hook(self._hook(t, tr)) for _, m, t, tr in self.modules
                             if t > 0]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> InputSparsityHooks:
        return self.attach()

    def __exit__(self, *exc: Any) -> None:
        self.detach()


class SparseRecoverySchedule(TrainerCallback):
    """Trains with the input thresholds active: the hooks attached at ``on_train_begin`` and removed at
    ``on_train_end``; ``p`` (the chance a below-threshold input is kept) goes linearly from ``p`` to 0 over the first
    ``mix_fraction`` of ``max_steps``, then stays 0 (``mix_fraction=0``: the sparse input from the first step).

    Args:
        thresholds: as :class:`InputSparsityHooks`.
        gradient: ``"ste"`` (default) or ``"masked"``.
        mix_fraction: the fraction of the steps with the Bernoulli mix, in [0, 1).
        p: the mix's starting probability, in [0, 1].

    Raises:
        ValueError: any argument out of range (the message names it).
    """

    def __init__(self, thresholds: Thresholds | Mapping, *, gradient: str = "ste", mix_fraction: float = 0.0,
                 p: float = 0.5):
        _check_gradient(gradient)
        if isinstance(mix_fraction, bool) or not isinstance(mix_fraction, (int, float)) or \
                not 0.0 <= mix_fraction < 1.0:
            raise ValueError(f"mix_fraction must be a number in [0, 1), got {mix_fraction!r}")
        check_probability("p", p)
        self.thresholds = thresholds
        self.gradient = gradient
        self.mix_fraction = float(mix_fraction)
        self.start_p = float(p)
        self.hooks: InputSparsityHooks | None = None

    def p_at(self, step: int, max_steps: int) -> float:
        """The mix probability at optimizer step ``step`` of ``max_steps``."""
        end = math.ceil(self.mix_fraction * max_steps)
        if step >= end or end == 0:
            return 0.0
        return self.start_p * (1.0 - step / end)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.hooks = InputSparsityHooks(model, self.thresholds, gradient=self.gradient,
                                        p=self.p_at(state.global_step, state.max_steps)).attach()

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self.hooks is not None:
            self.hooks.p = self.p_at(state.global_step, state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.hooks is not None and logs is not None:
            add_log_metrics(state, logs, {"sparse/p": self.hooks.p})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.hooks is not None:
            self.hooks.detach()
