"""Stochastic decoding: ``model.generate(..., stochastic_activation=True)`` on any transformers model.

The FFN activations are sampled at every forward pass of decoding -- the prefill and each new token -- so even
greedy decoding becomes a controlled source of diversity (Lomeli et al., 2025, section on generation).

* Models built with ``"stochastic"`` activations: their modules sample (``sampling=True``) for the call, with
  their own settings, or with ``stochastic_p`` if given.
* Models with a stock activation f (SiLU in Llama/Qwen/Mistral, GELU in GPT-2, ...): each FFN element is f(x)
  with probability ``p`` and ReLU(x) with probability ``1 - p``, whatever the sign of x, so ``p = 1`` is the model
  itself and ``p = 0`` the (untrained) ReLU swap. For SiLU this is the fast SiLU/ReLU draw of
  :mod:`hf_stochact.activations`. Default ``p`` for stock models: :data:`DEFAULT_STOCK_P`.

How: ``import hf_stochact`` wraps ``GenerationMixin.generate`` once. The wrapper removes the two keywords (so
``_validate_model_kwargs`` never sees them), falls back to ``generation_config.stochastic_activation`` /
``stochastic_p``, switches only *this* model's FFN activations (the SiLU/ReLU draw as the forward of SiLU modules,
a forward hook on other stock modules, the sampling switch on stochastic ones) and restores them in a ``finally``.
Without the flag the original ``generate`` runs untouched. An assistant model (assisted decoding) is left
deterministic unless ``stochastic_assistant=True``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import kernels
from ..activations import StochasticActivation
from ..activations.stochastic import check_probability
from ..layouts import find_mlps

#: p (probability of keeping the model's own activation) used for stock-activation models when none is given.
DEFAULT_STOCK_P = 0.9
GENERATION_KEYS = ("stochastic_activation", "stochastic_p")


def _is_silu(module: nn.Module) -> bool:
    from transformers.activations import SiLUActivation

    return isinstance(module, (nn.SiLU, SiLUActivation))


def _own_or_relu_hook(p: float):
    """Forward hook: replace the activation's output by ReLU(x) on a random 1 - p of the elements."""

    def hook(module, inputs, output):
        x = inputs[0]
        keep = kernels.bernoulli(kernels.new_seed(x.device), tuple(x.shape), kernels.threshold(p), x.device)
        return torch.where(keep, output, torch.relu(x))

    return hook


def _switch_stock(module: nn.Module, p: float):
    """Make a stock activation module draw between itself and ReLU; returns the undo function.

    SiLU gets the fused SiLU/ReLU draw as its forward for the call (no SiLU computed and thrown away); any other
    activation keeps its forward and a hook swaps a random 1 - p of its outputs for ReLU(x).
    """
    if _is_silu(module):
        def draw(x):
            return kernels.silu_relu_draw(x, kernels.new_seed(x.device), p, negative_only=False)

        module.forward = draw
        return functools.partial(delattr, module, "forward")
    return module.register_forward_hook(_own_or_relu_hook(p)).remove


@contextlib.contextmanager
def stochastic_decoding(model: nn.Module, p: float | None = None) -> Iterator[int]:
    """Within the block, every FFN activation of ``model`` samples at each forward (see the module docstring).

    Args:
        model: any model with FFN activation modules.
        p: P(SiLU) for stochastic modules (default: their own ``p``); for stock activations, the probability of
            keeping the model's activation instead of ReLU (default :data:`DEFAULT_STOCK_P`).

    Yields the number of FFN activation modules switched. Everything is restored on exit, also on error.

    Raises:
        ValueError: ``p`` outside [0, 1], or no FFN activation module in ``model``.
    """
    if p is not None:
        p = check_probability("stochastic_p", p)
    found = find_mlps(model)
    if not found:
        raise ValueError(f"stochastic_activation=True, but {type(model).__name__} has no FFN activation module "
                         "(looked for activation modules under act_fn / act / activation_fn / intermediate_act_fn / "
                         "activation)")
    restore = []
    try:
        for module in (mlp.activation for mlp in found):
            if isinstance(module, StochasticActivation):
                saved = (module.sampling, module.spec)
                restore.append(functools.partial(_restore_stochastic, module, *saved))
                module.sampling = True
                if p is not None:
                    module.configure(p=p)
            else:
                restore.append(_switch_stock(module, DEFAULT_STOCK_P if p is None else p))
        yield len(found)
    finally:
        for undo in reversed(restore):
            undo()


def _restore_stochastic(module: StochasticActivation, sampling, spec) -> None:
    module.sampling = sampling
    module.spec = spec


def _resolve(model, kwargs: dict[str, Any]) -> tuple[bool, float | None]:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    flag = kwargs.pop("stochastic_activation", None)
    p = kwargs.pop("stochastic_p", None)
    if flag is None:
        flag = getattr(config, "stochastic_activation", None)
    if p is None:
        p = getattr(config, "stochastic_p", None)
    if isinstance(flag, dict):  # {"p": ...} as a spec
        p = flag.get("p", p) if p is None else p
        flag = True
    if flag not in (None, True, False):
        raise ValueError(f"stochastic_activation must be True, False or a dict like {{'p': 0.5}}, got {flag!r}")
    return bool(flag), p


def _wrap_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        if not any(k in kwargs for k in GENERATION_KEYS) and not _config_asks(self, kwargs):
            return original(self, *args, **kwargs)
        stochastic_assistant = kwargs.pop("stochastic_assistant", False)
        flag, p = _resolve(self, kwargs)
        if not flag:
            return original(self, *args, **kwargs)
        with contextlib.ExitStack() as stack:
            stack.enter_context(stochastic_decoding(self, p))
            assistant = kwargs.get("assistant_model")
            if stochastic_assistant and assistant is not None:
                stack.enter_context(stochastic_decoding(assistant, p))
            return original(self, *args, **kwargs)

    generate._hf_stochact = True
    return generate


def _config_asks(model, kwargs) -> bool:
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    return bool(getattr(config, "stochastic_activation", False))


def install() -> None:
    """Wrap ``GenerationMixin.generate`` (idempotent). Called on ``import hf_stochact``."""
    from transformers.generation.utils import GenerationMixin

    # the wrapper pops its keywords because generate() rejects unknown model kwargs in _validate_model_kwargs
    generate = getattr(GenerationMixin, "generate", None)
    if not (callable(generate) and hasattr(GenerationMixin, "_validate_model_kwargs")):
        import transformers

        raise ImportError(f"hf_stochact cannot hook transformers {transformers.__version__}: "
                          "GenerationMixin.generate / _validate_model_kwargs moved. "
                          "Supported: transformers >= 5.0, < 6.")
    if not getattr(GenerationMixin.generate, "_hf_stochact", False):
        GenerationMixin.generate = _wrap_generate(GenerationMixin.generate)


def set_generation_defaults(model: nn.Module, stochastic_activation: bool = True, stochastic_p: float | None = None):
    """Make stochastic decoding the default of ``model.generate`` and save it with ``model.generation_config``.

    Sets ``generation_config.stochastic_activation`` / ``stochastic_p`` and clears ``_from_model_config`` (a
    generation config derived from the model config drops unknown keys when reloaded).

    Raises:
        ValueError: ``stochastic_p`` outside [0, 1].
    """
    config = model.generation_config
    config.stochastic_activation = bool(stochastic_activation)
    config.stochastic_p = None if stochastic_p is None else check_probability("stochastic_p", stochastic_p)
    config._from_model_config = False
    return config
