"""StochActSchedule: a Trainer callback that schedules the FFN activation over training.

A schedule is a list of :class:`Stage` s. Each stage starts at a point of training (a float in [0, 1) is a fraction
of ``max_steps``, an int is an absolute optimizer step) and says what every FFN activation is from there on:
``"stochastic"`` (StochA with ``p``, or a k-way ``choices`` mix), or any ``ACT2FN`` name (``"silu"``, ``"relu"``,
...). ``ramp=True`` on a stochastic stage moves ``p`` linearly to the next stage's value (the next stage's ``p``,
0 for ``"relu"``) over the stage.

Presets (the paper's names), with ``relu_fraction`` = length of the final ReLU phase as a fraction of all steps:

* ``StochActSchedule()`` / ``preset="stocha+ft"``: StochA(p), then ReLU for the last ``relu_fraction``;
* ``preset="swi+ft"``: SiLU, then ReLU for the last ``relu_fraction``;
* ``preset="keep+ft"``: the model's own FFN activation (e.g. the learned ``learnable_stoch`` / ``gumbel_stoch``,
  whose parameters must not be replaced mid-run), then ReLU for the last ``relu_fraction``.

Mechanics:

* The stage is a pure function of ``state.global_step``, applied in ``on_step_begin``: every micro-batch of an
  optimizer step sees the same activation, and ``resume_from_checkpoint`` continues the schedule exactly.
* Stages are applied by swapping the FFN activation modules (found by walking the model; parameter-free modules
  only, so the optimizer and the state dict are untouched) and by keeping the config's activation field in step, so a
  checkpoint saved mid-run reloads with the activation it was being trained with.
* ``on_train_end`` applies ``final_activation`` (default ``"relu"``): every FFN activation becomes a plain
  ``ACT2FN["relu"]``, the config field says ``"relu"`` and ``config.stochastic_activation`` is removed, so
  ``save_pretrained`` writes a model that stock transformers loads without hf_stochact. A PEFT model (LoRA, ...)
  gets the swap in its base model: the run warns, its adapter folders record the activation
  (:mod:`hf_stochact.integration.adapters`) and :func:`hf_stochact.load_adapter` reloads them with it.
* ``on_log`` adds to the Trainer's own logs, on every log line: ``stochact/stage``; ``stochact/p`` where it has a
  meaning (two-way stochastic stages; omitted in ReLU/SiLU stages); ``stochact/ffn_zero_fraction`` (exact zeros in
  the FFN activation outputs, measured on one forward in ``monitor_every``, the first forward of every stage
  included): the latest measurement *of the current stage*, omitted until the stage has one, so a line never shows
  the previous stage's sparsity under the new stage.
* A stochastic stage without ``p`` (the default preset included) uses the ``p`` of the model's
  ``config.stochastic_activation``, else 0.5.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn
from transformers import TrainerCallback

from ..activations import StochasticActivation, StochasticSpec
from ..activations.stochastic import check_probability, known_activations
from ..analysis.metrics import SparsityMonitor
from ..inference import decoding
from ..inference.sparse import is_sparsified, unsparsify
from ..integration.adapters import ACTIVATION_FILE, is_peft_model
from ..integration.config import CONFIG_KEY, NAME, model_configs, set_config_activation, stochastic_modules
from ..layouts import find_mlps, relu_kind

PRESETS = ("stocha+ft", "swi+ft", "keep+ft")
KEEP = "keep"


@dataclasses.dataclass(frozen=True)
class Stage:
    """One phase of the schedule.

    Args:
        start: where the stage begins: a float in [0, 1) is a fraction of ``max_steps``, an int >= 0 an optimizer step.
        activation: ``"stochastic"`` or an ``ACT2FN`` name such as ``"silu"`` or ``"relu"``.
        p: P(SiLU) for a stochastic stage; default: the model's configured p (``config.stochastic_activation``),
            else 0.5.
        choices: k-way mix for a stochastic stage (``{"relu": .5, "silu": .3, "gelu": .2}``), instead of ``p``.
        ramp: for a stochastic stage, move ``p`` linearly to the next stage's ``p`` (0 if it is ReLU).
        variant, eval_mode, granularity: passed to :class:`StochasticSpec` for a stochastic stage.
    """

    start: float | int
    activation: str
    p: float | None = None
    choices: Mapping[str, float] | None = None
    ramp: bool = False
    variant: str = "paper"
    eval_mode: str | None = None
    granularity: str = "element"

    def __post_init__(self) -> None:
        if isinstance(self.start, bool) or not isinstance(self.start, (int, float)):
            raise ValueError(f"Stage.start must be a float fraction in [0, 1) or an int step, got {self.start!r}")
        if isinstance(self.start, float) and not 0.0 <= self.start < 1.0:
            raise ValueError(f"Stage.start as a fraction must be in [0, 1), got {self.start!r} "
                             "(use an int for an absolute step)")
        if isinstance(self.start, int) and self.start < 0:
            raise ValueError(f"Stage.start as a step must be >= 0, got {self.start}")
        allowed = (NAME, KEEP, *known_activations())
        if self.activation not in allowed:
            raise ValueError(f"Stage.activation must be 'stochastic', 'keep' or an ACT2FN name, got "
                             f"{self.activation!r}; allowed: {', '.join(allowed)}")
        if self.activation == NAME:
            self.spec(self.p if self.p is not None else 0.5)  # validates p, choices, variant, ...
        elif self.p is not None or self.choices is not None or self.ramp:
            raise ValueError(f"Stage({self.activation!r}): p, choices and ramp apply only to 'stochastic' stages")

    def spec(self, p: float | None = None) -> StochasticSpec:
        p = self.p if p is None else p
        return StochasticSpec(p=0.5 if p is None else p, variant=self.variant, choices=self.choices,
                              eval_mode=self.eval_mode, granularity=self.granularity)

    def end_p(self, default_p: float = 0.5) -> float:
        """The p this stage hands to a ramping predecessor (``default_p`` for a stochastic stage without one)."""
        if self.activation == "relu":
            return 0.0
        if self.activation == NAME and self.choices is None:
            return default_p if self.p is None else float(self.p)
        raise ValueError(f"a ramp must lead into a two-way 'stochastic' or a 'relu' stage, not {self.activation!r}")


class StochActSchedule(TrainerCallback):
    """Schedule the FFN activation during ``Trainer.train`` (see the module docstring).

    Runs before the Trainer's reporting integrations (``log_before_integrations``), so its ``on_log`` metrics
    reach TensorBoard / W&B too.

    Args:
        stages: explicit list of :class:`Stage` (or dicts of its fields). If omitted, ``preset`` builds it.
        preset: ``"stocha+ft"`` (default), ``"swi+ft"`` or ``"keep+ft"``.
        p: P(SiLU) of the StochA phase of ``"stocha+ft"``; default: the ``p`` in the model's
            ``config.stochastic_activation`` (what the model was configured with), else 0.5.
        relu_fraction: fraction of total steps, in [0, 1], run with ReLU at the end of a preset (default 0.1).
        final_activation: plain activation installed by ``on_train_end`` (default ``"relu"``); None keeps the
            last stage's modules and config.
        monitor_every: sample the FFN zero fraction on one forward in this many (0 disables the monitor).

    Raises:
        ValueError: bad arguments at construction; at ``on_train_begin``, stages that do not fit ``max_steps``
            or a schedule in fractions when the Trainer does not know ``max_steps``.
    """

    log_before_integrations = True

    def __init__(
        self,
        stages: Sequence[Stage | Mapping[str, Any]] | None = None,
        *,
        preset: str = "stocha+ft",
        p: float | None = None,
        relu_fraction: float = 0.1,
        final_activation: str | None = "relu",
        monitor_every: int = 10,
    ) -> None:
        relu_fraction = check_probability("relu_fraction", relu_fraction)
        if stages is None:
            if preset not in PRESETS:
                raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
            p = None if p is None else check_probability("p", p)
            first = {"stocha+ft": Stage(0.0, NAME, p=p), "swi+ft": Stage(0.0, "silu"),
                     "keep+ft": Stage(0.0, KEEP)}[preset]
            if relu_fraction == 1.0:
                stages = [Stage(0.0, "relu")]
            else:
                stages = [first] + ([Stage(1.0 - relu_fraction, "relu")] if relu_fraction > 0 else [])
        stages = [s if isinstance(s, Stage) else Stage(**s) for s in stages]
        if not stages:
            raise ValueError("stages must not be empty")
        _check_increasing(stages, [s.start for s in stages], "as given")
        for a, b in zip(stages, stages[1:]):
            if a.ramp:
                b.end_p()  # raises if the ramp has nowhere to go
        if stages[-1].ramp:
            raise ValueError("the last stage cannot ramp: there is no next stage to ramp to")
        if any(s.activation == KEEP for s in stages[1:]):
            raise ValueError("a 'keep' stage (train the model's own FFN activation, e.g. learnable_stoch or "
                             "gumbel_stoch) can only be the first stage: once swapped, the original is gone")
        if final_activation is not None and final_activation not in known_activations():
            raise ValueError(f"final_activation must be a plain ACT2FN name such as 'relu', or None to keep the last "
                             f"stage, got {final_activation!r}")
        if int(monitor_every) < 0:
            raise ValueError(f"monitor_every must be >= 0, got {monitor_every}")
        self.stages = stages
        self.final_activation = final_activation
        self.monitor_every = int(monitor_every)
        self._starts: list[int] | None = None
        self._current: tuple[int, float | None] | None = None
        self._monitor: SparsityMonitor | None = None
        self._zero_fraction: float | None = None  # the current stage's last measurement
        self.default_p = 0.5  # p of stochastic stages without one: the model's configured p (on_train_begin)
        #: (optimizer step, activation) at each stage start of the last run: what every data-parallel rank must agree on
        self.transitions: list[tuple[int, str]] = []

    # ---- the schedule as a function of the step
    def resolve(self, max_steps: int) -> list[int]:
        """Absolute start step of every stage for a run of ``max_steps`` optimizer steps.

        A fraction f starts at ``ceil(f * max_steps)``, so ``relu_fraction=a`` gives the last ``floor(a*max_steps)``
        steps to ReLU.
        """
        starts = [s.start if isinstance(s.start, int) else math.ceil(s.start * max_steps - 1e-9) for s in self.stages]
        if starts[0] != 0:
            raise ValueError(f"the first stage must start at step 0, got {starts[0]}")
        _check_increasing(self.stages, starts, f"for max_steps={max_steps}")
        if starts[-1] >= max_steps:
            last = self.stages[-1]
            hint = (f" (a final phase of {1 - last.start:g} x {max_steps} steps is less than one step: raise "
                    "relu_fraction or train longer)" if isinstance(last.start, float) else "")
            raise ValueError(f"stage {len(starts) - 1} ({last.activation}) starts at step {starts[-1]}, beyond the end "
                             f"of training (max_steps={max_steps}); move it earlier or train longer{hint}")
        return starts

    def stage_at(self, step: int, max_steps: int) -> tuple[int, float | None]:
        """(stage index, p or None) in force during optimizer step ``step`` (0-based)."""
        starts = self._starts if self._starts is not None else self.resolve(max_steps)
        i = max(k for k, s in enumerate(starts) if s <= step)
        stage = self.stages[i]
        if stage.activation != NAME or stage.choices is not None:
            return i, stage.p if stage.activation == NAME else None
        p = self.default_p if stage.p is None else stage.p
        if stage.ramp:
            end = starts[i + 1]
            p = p + (self.stages[i + 1].end_p(self.default_p) - p) * (step - starts[i]) / (end - starts[i])
        return i, p

    # ---- applying a stage to a model
    def apply(self, model: nn.Module, index: int, p: float | None) -> None:
        """Make every FFN activation of ``model`` what stage ``index`` says (with ``p`` for a stochastic stage)."""
        stage = self.stages[index]
        if stage.activation != KEEP:
            set_activation(model, stage.activation, stage.spec(p) if stage.activation == NAME else None)
        if self._monitor is not None:
            self._monitor.detach()
            self._monitor.attach()

    def _new_measurement(self, model: nn.Module) -> None:
        """Forget the zero fraction measured so far (a new stage begins): a fresh monitor, whose sampling
        restarts, so the stage's first forward is measured."""
        self._zero_fraction = None
        if self._monitor is not None:
            self._monitor.detach()
            self._monitor = SparsityMonitor(model, every=self.monitor_every)

    # ---- TrainerCallback events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.max_steps is None or state.max_steps <= 0:
            raise ValueError("StochActSchedule needs the number of training steps: set TrainingArguments.max_steps "
                             "or num_train_epochs with a dataset of known length")
        if model is None:
            raise ValueError("StochActSchedule needs the model: the Trainer passes it to callbacks")
        self.default_p = configured_p(model)
        warn_generator_with_checkpointing(model)
        self._starts = self.resolve(state.max_steps)
        self._current = None
        self._zero_fraction = None
        self.transitions = []
        if self.monitor_every:
            self._monitor = SparsityMonitor(model, every=self.monitor_every)
        self._step_to(model, state)
        if self._monitor is not None:
            self._monitor.attach()  # no-op if the first stage's apply() attached it already

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step_to(model, state)

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or self._current is None:
            return
        index, p = self._current
        metrics = {"stochact/stage": index}
        if p is not None:  # omitted where it has no meaning (ReLU / SiLU stages, k-way mixes)
            metrics["stochact/p"] = round(p, 6)
        if self._monitor is not None and self._monitor.stats.total:
            self._zero_fraction = round(self._monitor.stats.overall, 6)
            self._monitor.stats.reset()
        if self._zero_fraction is not None:  # the current stage's latest measurement; nothing before it has one
            metrics["stochact/ffn_zero_fraction"] = self._zero_fraction
        add_log_metrics(state, logs, metrics)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._monitor is not None:
            self._monitor.detach()
            self._monitor = None
        if model is not None and self.final_activation is not None:
            set_activation(model, self.final_activation)
            if is_peft_model(model):
                warnings.warn(f"StochActSchedule set the FFN activation of the *base* model to "
                              f"{self.final_activation!r}; a PEFT adapter folder does not hold it, and "
                              "PeftModel.from_pretrained on a fresh base keeps the base's own activation. "
                              f"model.save_pretrained records it in the folder ({ACTIVATION_FILE}): reload with "
                              "hf_stochact.load_adapter(base, folder), or merge_and_unload() and save the model.",
                              UserWarning, stacklevel=2)

    def _step_to(self, model, state) -> None:
        current = self.stage_at(min(state.global_step, state.max_steps - 1), state.max_steps)
        if current != self._current:
            if self._current is None or current[0] != self._current[0]:
                self.transitions.append((state.global_step, self.stages[current[0]].activation))
                self._new_measurement(model)
            self.apply(model, *current)
            self._current = current


def set_activation(model: nn.Module, activation: str, spec: StochasticSpec | None = None) -> int:
    """Make every FFN activation of ``model`` an ``activation`` module, and say so in its config.

    ``activation`` is ``"stochastic"`` (with ``spec``) or any ``ACT2FN`` name. Existing stochastic modules are
    reconfigured in place; other modules are replaced by fresh parameter-free ``ACT2FN[activation]`` instances
    (parametric activations are replaced too: use this at stage boundaries where that is intended). The config
    field (``hidden_act`` / ``hidden_activation`` / ``activation_function``) is set to ``activation``, and
    ``config.stochastic_activation`` is set (stochastic) or removed (anything else). Returns the number of modules.

    Raises:
        ValueError: if the model has no FFN activation module, or ``activation`` is unknown.
    """
    from transformers.activations import ACT2FN

    if activation not in ACT2FN:
        raise ValueError(f"activation must be an ACT2FN name, got {activation!r}")
    mlps = find_mlps(model)
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no FFN activation module (looked for activation modules "
                         "under act_fn / act / activation_fn / intermediate_act_fn / activation)")
    spec = spec if spec is not None else (StochasticSpec() if activation == NAME else None)
    for mlp in mlps:
        module = mlp.activation
        if activation == NAME and isinstance(module, StochasticActivation):
            module.spec = spec
            continue
        new = ACT2FN[activation]
        if isinstance(new, StochasticActivation):
            new.spec = spec
        new.train(module.training)
        mlp.set_activation(new)
        decoding.attach_module(new)  # stochastic generate on the result (e.g. StochA on the final ReLU model)
    if relu_kind(ACT2FN[activation]) is None and is_sparsified(model):
        unsparsify(model)  # the sparse path computes ReLU FFNs only
    set_config_activation(model, activation, spec)
    return len(mlps)


def warn_generator_with_checkpointing(model: nn.Module) -> bool:
    """Warn (and return True) when gradient checkpointing is on and a stochastic module draws from a ``generator`` of
    its own: checkpointing rewinds torch's RNG for the recomputed forward, not a user generator, so the recomputed
    masks differ from the forward's and the gradients are wrong."""
    flag = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else \
        "is_gradient_checkpointing"  # renamed in transformers 5.x
    if not getattr(model, flag, False):
        return False
    owned = [m for m in stochastic_modules(model) if m.generator is not None]
    if owned:
        warnings.warn(f"{len(owned)} stochastic activation module(s) draw from their own torch.Generator while "
                      "gradient checkpointing is on: the recomputed forward draws different masks than the "
                      "original one, so the gradients are wrong. Set generator=None (torch's RNG, which "
                      "checkpointing restores) or turn gradient checkpointing off.", UserWarning, stacklevel=2)
    return bool(owned)


def configured_p(model: nn.Module) -> float:
    """The two-way ``p`` the model is configured with (``config.stochastic_activation``, else its stochastic
    modules), or 0.5."""
    for config in model_configs(model):
        settings = getattr(config, CONFIG_KEY, None)
        if settings is not None:
            spec = StochasticSpec.from_dict(settings, where=CONFIG_KEY)
            return spec.p
    for module in stochastic_modules(model):
        return module.p
    return 0.5


def add_log_metrics(state, logs: dict, metrics: dict) -> None:
    """Add ``metrics`` to the ``logs`` of an ``on_log`` event and to the matching ``state.log_history`` entry.

    The Trainer appends a copy of ``logs`` to ``log_history`` before callbacks run, so without the second write the
    metrics reach the console and the reporting integrations but not ``trainer_state.json`` (or a report built
    from ``log_history``).
    """
    logs.update(metrics)
    history = getattr(state, "log_history", None)
    if history and history[-1].get("step") == state.global_step and set(logs) - set(metrics) <= set(history[-1]):
        history[-1].update(metrics)


def _check_increasing(stages: Sequence[Stage], starts: Sequence[float | int], where: str) -> None:
    kinds = {type(s.start) for s in stages}
    if len(kinds) > 1 and where == "as given":
        return  # fractions and steps mixed: only comparable once max_steps is known
    for k in range(1, len(starts)):
        if not starts[k] > starts[k - 1]:
            raise ValueError(f"stage starts must be strictly increasing ({where}); stage {k} starts at {starts[k]} "
                             f"after stage {k - 1} at {starts[k - 1]}")
