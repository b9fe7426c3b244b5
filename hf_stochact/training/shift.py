"""Shifted ReLU FFNs: per-neuron thresholds on the FFN pre-activation that buy sparsity beyond plain ReLU.

A ReLU FFN computes ``relu(g)`` on the pre-activation ``g`` (the gate projection of a gated MLP, the first
projection of a plain one). ``relu(g - t)`` with a per-neuron shift ``t >= 0`` zeroes every element with
``g <= t``: the FFN gets sparser and stays exactly a ReLU FFN with a bias on that projection, so
:func:`~hf_stochact.sparsify` skips the extra zeros and, once the shift is folded into the bias, the model is
plain transformers (ProSparse's activation-threshold shifting; *ReLU² Wins* thresholds magnitudes the same way).

Which elements to cut: an element's effect on the FFN output is ``relu(g_i) * |u_i| * ||W_down[:, i]||`` (``u`` the
up projection of a gated MLP, 1 otherwise), so the shifts are chosen per layer such that a ``sparsity`` fraction
of the (token, neuron) pairs of a calibration batch fall under one threshold ``tau`` of that score:
``t_i = tau / (E|u_i| * ||W_down[:, i]||)``. Thresholding ``g`` alone per neuron (a quantile per neuron) is far
worse: on relufied SmolLM2-135M it destroys the model at 80% sparsity (docs/relufy_smollm2.md).

* :class:`GateShift` holds the shifts as forward hooks on the pre-activation projections (found by walking the
  model), recalibrates them on armed forwards and :meth:`GateShift.fold` writes them into the projection bias.
* :func:`calibrate_shift` sets the shifts for a target sparsity from a few batches of text (no training).
* :class:`GateShiftSchedule` is a Trainer callback that ramps the target sparsity over training (the model adapts
  while the threshold rises) and folds the shifts at the end, so ``save_pretrained`` writes a plain model.

Folding needs a bias on the pre-activation projection that the model's config can express: GPT-2-style MLPs have
one; Llama-family configs have ``mlp_bias`` (set to True, with zero biases on the other MLP projections).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import TrainerCallback

from ..integration.config import model_configs
from ..layouts import LAYOUTS, MLP, find_mlps
from .schedule import add_log_metrics

MAX_CALIBRATION_ROWS = 4096


@dataclasses.dataclass(eq=False)
class _Site:
    """One FFN and its shift (``pre``'s output, first half if fused, is the activation's input)."""

    mlp: MLP
    shift: torch.Tensor | None = None  # [d_ff] float32, >= 0

    @property
    def path(self) -> str:
        return self.mlp.path

    @property
    def pre(self) -> nn.Module:
        return self.mlp.pre

    @property
    def fused(self) -> bool:
        return self.mlp.layout.fused_gate_up

    def width(self) -> int:
        return self.mlp.width


def _find_sites(model: nn.Module) -> list[_Site]:
    sites = [_Site(mlp) for mlp in find_mlps(model, need="pre+down")]
    if not sites:
        known = ", ".join(f"{lay.name} ({lay.pre} -> {lay.down})" for lay in LAYOUTS if lay.pre and lay.down)
        raise ValueError(f"{type(model).__name__} has no FFN with a known pre-activation and down projection "
                         f"(layouts: {known}); gate shifts need both")
    return sites


def _check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not isinstance(sparsity, (int, float)) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1) (the share of FFN activations to make zero), "
                         f"got {sparsity!r}")
    return float(sparsity)


@torch.no_grad()
def shifts_for(g: torch.Tensor, weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per-neuron shifts that make a ``sparsity`` fraction of ``relu(g - t)`` zero, cutting the smallest scores.

    Args:
        g: pre-activations [N, d_ff]; weight: per-neuron output weight ``E|u_i| * ||W_down[:, i]||`` [d_ff].

    The score of element (n, i) is ``relu(g[n, i]) * weight[i]``; ``tau`` is its ``sparsity`` quantile and
    ``t_i = tau / weight[i]`` (0 when ``tau`` is 0, i.e. when plain ReLU is already that sparse).
    """
    score = g.float().clamp(min=0) * weight
    k = int(round(sparsity * score.numel()))
    if k == 0:
        return torch.zeros_like(weight)
    tau = score.flatten().kthvalue(k).values
    if tau <= 0:
        return torch.zeros_like(weight)
    return tau / weight.clamp(min=torch.finfo(torch.float32).tiny)


class GateShift:
    """Per-neuron shifts of the FFN pre-activations of ``model``, applied by forward hooks.

    >>> shift = GateShift(model).attach()
    >>> shift.arm(0.85); model(calibration_ids)   # next forward recalibrates every layer to 85% zeros
    >>> shift.fold()                              # into the pre-activation bias; hooks removed

    ``arm(sparsity, momentum)`` makes the next forward recalibrate: each layer's new shift is computed from that
    forward's own pre-activations (so the same forward already uses it), mixed with the old one as
    ``momentum * old + (1 - momentum) * new``.

    Raises:
        ValueError: if the model has no FFN with a recognised pre-activation and down projection.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.sites = _find_sites(model)
        self._handles: list = []
        self._armed: tuple[float, float] | None = None
        self._pending: set[int] = set()
        self.natural: dict[int, float] = {}  # per site: zero fraction of relu(g) without shift, last calibration

    # ------------------------------------------------------------------------------------------------------------
    def attach(self) -> GateShift:
        if not self._handles:
            self._handles = [s.pre.register_forward_hook(self._hook(s)) for s in self.sites]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def arm(self, sparsity: float, momentum: float = 0.0) -> None:
        """Recalibrate every layer to ``sparsity`` on the next forward pass (each layer once)."""
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self._armed = (_check_sparsity(sparsity), momentum)
        self._pending = {id(s) for s in self.sites}

    def disarm(self) -> None:
        self._armed = None
        self._pending = set()

    @property
    def armed(self) -> bool:
        return bool(self._pending)

    @property
    def shifts(self) -> dict[str, torch.Tensor]:
        return {s.path: s.shift for s in self.sites if s.shift is not None}

    def natural_sparsity(self) -> float:
        """Mean over layers of the unshifted ReLU zero fraction seen by the last calibration (NaN before any)."""
        return sum(self.natural.values()) / len(self.natural) if self.natural else float("nan")

    def mean_shift(self) -> float:
        values = [float(s.shift.mean()) for s in self.sites if s.shift is not None]
        return sum(values) / len(values) if values else 0.0

    def _hook(self, site: _Site):
        def hook(module, inputs, output):
            d = site.width()
            g = output[..., :d] if site.fused else output
            if id(site) in self._pending:
                self._pending.discard(id(site))
                self._recalibrate(site, inputs[0], output, g)
            if site.shift is None or not bool(site.shift.any()):
                return None
            shifted = g - site.shift.to(g.dtype)
            return torch.cat([shifted, output[..., d:]], -1) if site.fused else shifted

        return hook

    @torch.no_grad()
    def _recalibrate(self, site: _Site, x: torch.Tensor, output: torch.Tensor, g: torch.Tensor) -> None:
        sparsity, momentum = self._armed
        d = site.width()
        g2 = g.detach().reshape(-1, d)
        step = max(1, g2.shape[0] // MAX_CALIBRATION_ROWS)
        g2 = g2[::step].float()
        self.natural[id(site)] = float((g2 <= 0).float().mean())
        weight = site.mlp.down_column_norms()
        if site.fused:
            weight = weight * output.detach().reshape(-1, 2 * d)[::step, d:].float().abs().mean(0)
        elif site.mlp.up is not None:
            weight = weight * site.mlp.up(x.detach().reshape(-1, x.shape[-1])[::step]).float().abs().mean(0)
        new = shifts_for(g2, weight, sparsity)
        site.shift = new if site.shift is None else momentum * site.shift + (1 - momentum) * new

    # ------------------------------------------------------------------------------------------------------------
    def check_foldable(self) -> None:
        """Raise ValueError unless :meth:`fold` can store the shifts as a bias the model's config declares."""
        if all(s.pre.bias is not None for s in self.sites):
            return
        if not any(hasattr(c, "mlp_bias") for c in model_configs(self.model)):
            raise ValueError(f"gate shifts need a bias on the FFN pre-activation projection, but "
                             f"{type(self.model).__name__}'s has none and its config has no `mlp_bias` field to "
                             "declare one; shifts work on GPT-2-style MLPs (biased) and Llama-family models "
                             "(mlp_bias)")

    @torch.no_grad()
    def fold(self) -> None:
        """Write the shifts into the pre-activation bias (``bias -= shift``) and remove the hooks.

        Where the projection has no bias, the config's ``mlp_bias`` is set True and every MLP projection gets a
        zero bias (what transformers builds for ``mlp_bias=True``), so ``save_pretrained`` output reloads as is.
        """
        self.check_foldable()
        self.detach()
        if any(s.pre.bias is None for s in self.sites):
            for config in model_configs(self.model):
                if hasattr(config, "mlp_bias"):
                    config.mlp_bias = True
            for s in self.sites:
                for layer in s.mlp.module.children():
                    if isinstance(layer, nn.Linear) and layer.bias is None:
                        w = layer.weight
                        layer.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        for s in self.sites:
            if s.shift is None:
                continue
            bias = s.pre.bias[: s.width()] if s.fused else s.pre.bias
            bias.sub_(s.shift.to(bias.dtype))
            s.shift = None


@torch.no_grad()
def calibrate_shift(model: nn.Module, input_ids: torch.Tensor, sparsity: float, batch_size: int = 4,
                    fold: bool = True) -> GateShift:
    """Set per-neuron gate shifts so that about ``sparsity`` of the FFN activations are zero on ``input_ids``.

    ``input_ids`` [N, T] calibration text; the shifts are the mean over batches of ``batch_size`` rows. With
    ``fold`` (default) they are written into the pre-activation bias at once (see :meth:`GateShift.fold`).
    No training: expect a perplexity cost (measured in docs/relufy_smollm2.md); :class:`GateShiftSchedule`
    lets the model adapt while the threshold rises.
    """
    _check_sparsity(sparsity)
    shift = GateShift(model)
    if fold:
        shift.check_foldable()
    shift.attach()
    was_training = model.training
    model.eval()
    batches = list(torch.split(input_ids, batch_size))
    for i, batch in enumerate(batches):
        shift.arm(sparsity, momentum=i / (i + 1))  # running mean of the per-batch shifts
        model(input_ids=batch)
    shift.disarm()
    model.train(was_training)
    if fold:
        shift.fold()
    return shift


class GateShiftSchedule(TrainerCallback):
    """Ramp FFN sparsity over training with per-neuron gate shifts, then fold them into the bias.

    The target sparsity rises linearly from ``start`` at step 0 to ``sparsity`` at ``ramp_fraction`` of
    ``max_steps`` and stays there. ``start=None`` (default) is the model's own ReLU sparsity, measured on the first
    step's batch (no shift on that step), so the whole ramp moves the threshold. Every ``every`` optimizer steps,
    the first forward of the step recalibrates each layer's shifts on its own batch, smoothed with ``momentum``.
    The target is a function of ``state.global_step``, so a resumed run continues the ramp (the shifts themselves
    are recalibrated from the first batch after resuming). ``on_train_end`` folds the shifts
    (:meth:`GateShift.fold`). On a model whose shifts are already folded (a continued run), the ramp starts from
    its current sparsity and ``ramp_fraction=0`` holds the target from the first step.

    Use it with a ReLU FFN (e.g. next to ``StochActSchedule([Stage(0, "relu")])``): the shift moves the threshold
    of ``relu``; with other activations it only shifts their input.

    Raises:
        ValueError: bad arguments at construction; at ``on_train_begin``, no ``max_steps`` or a model whose config
            cannot store the shifts.
    """

    log_before_integrations = True  # on_log metrics reach TensorBoard / W&B (hf_stochact.integration.trainer)

    def __init__(self, sparsity: float, ramp_fraction: float = 0.5, start: float | None = None, every: int = 1,
                 momentum: float = 0.5):
        self.sparsity = _check_sparsity(sparsity)
        self.start = None if start is None else _check_sparsity(start, "start")
        if self.start is not None and self.start > self.sparsity:
            raise ValueError(f"start ({start}) must not exceed sparsity ({sparsity})")
        if not 0.0 <= ramp_fraction <= 1.0:
            raise ValueError(f"ramp_fraction must be in [0, 1] (the share of training over which the target rises), "
                             f"got {ramp_fraction}")
        if int(every) < 1:
            raise ValueError(f"every must be a positive number of optimizer steps, got {every}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.ramp_fraction, self.every, self.momentum = ramp_fraction, int(every), momentum
        self.shift: GateShift | None = None
        self._start = self.start
        self._target = 0.0

    def target_at(self, step: int, max_steps: int) -> float:
        """The target sparsity at optimizer step ``step`` (0 while an automatic ``start`` is not measured yet)."""
        if self._start is None:
            return 0.0
        ramp = self.ramp_fraction * max_steps
        frac = 1.0 if ramp <= 0 else min(1.0, step / ramp)
        return min(self.sparsity, self._start + (self.sparsity - self._start) * frac)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.max_steps is None or state.max_steps <= 0:
            raise ValueError("GateShiftSchedule needs the number of training steps: set TrainingArguments.max_steps")
        self.shift = GateShift(model)
        self.shift.check_foldable()
        self.shift.attach()
        self._start = self.start

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if self._start is None and self.shift is not None and self.shift.natural:
            self._start = min(self.sparsity, self.shift.natural_sparsity())
        self._target = self.target_at(state.global_step, state.max_steps)
        if self.shift is not None and (state.global_step % self.every == 0 or not self.shift.shifts):
            first = not self.shift.shifts
            self.shift.arm(self._target, 0.0 if first else self.momentum)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.shift is not None:
            add_log_metrics(state, logs, {"gate_shift/target_sparsity": round(self._target, 4),
                                          "gate_shift/mean_shift": round(self.shift.mean_shift(), 5),
                                          "gate_shift/relu_sparsity": round(self.shift.natural_sparsity(), 4)})

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.shift is not None:
            self.shift.fold()
            self.shift = None

