"""Wiring into transformers: ACT2FN/ACT2CLS registration, config fields, the module walk, settings that persist.

transformers builds every MLP activation with ``ACT2FN[config.<field>]`` inside ``__init__``; the registry makes
``"stochastic"`` one of those names. The activation's settings live in ``config.stochastic_activation`` (a plain
dict, so ``save_pretrained`` writes it to config.json) and are pushed into the modules by a thin wrapper around
``PreTrainedModel.post_init``, which every transformers model calls at the end of its constructor: direct
construction, ``from_config`` and ``from_pretrained`` all pass through it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from .activations import StochasticActivation, StochasticSpec

logger = logging.getLogger(__name__)

NAME = "stochastic"
CONFIG_KEY = "stochastic_activation"
# The config fields that name the FFN activation, in lookup order (Gemma 2/3 accept hidden_act but read
# hidden_activation, so that one wins when both exist).
ACTIVATION_FIELDS = ("hidden_activation", "activation_function", "hidden_act")

#: name -> zero-argument callable building the module; filled by :func:`register_activation`.
REGISTERED: dict[str, Any] = {}


def register_activation(name: str, cls: type[nn.Module]) -> None:
    """Put ``cls`` under ``name`` in transformers' ``ACT2FN`` and ``ACT2CLS`` (in place, idempotent).

    ``ACT2FN`` is mutated, never rebound: every modeling file holds a reference to the same object.
    """
    from transformers import activations

    activations.ACT2CLS[name] = cls
    activations.ACT2FN[name] = cls
    REGISTERED[name] = cls


def register() -> None:
    """Register every hf_stochact activation and hook model construction. Called on ``import hf_stochact``."""
    from .learnable import GumbelStochActivation, LearnableStochActivation

    register_activation(NAME, StochasticActivation)
    register_activation("learnable_stoch", LearnableStochActivation)
    register_activation("gumbel_stoch", GumbelStochActivation)
    _hook_post_init()


def _hook_post_init() -> None:
    from transformers import PreTrainedModel

    original = PreTrainedModel.post_init
    if getattr(original, "_hf_stochact", False):
        return

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _apply_config(self)
        return result

    post_init._hf_stochact = True
    PreTrainedModel.post_init = post_init


def _apply_config(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    settings = getattr(config, CONFIG_KEY, None)
    modules = list(stochastic_modules(model))
    if not modules:
        return
    if settings is not None:
        spec = StochasticSpec.from_dict(settings)
        for module in modules:
            module.spec = spec
    if getattr(model, "use_kernels", False) or getattr(model, "kernel_config", None) is not None:
        logger.warning("hf_stochact: kernels are enabled on this model; a kernel that fuses the MLP would bypass "
                       "the stochastic activation. Disable use_kernels/kernel_config to be sure it runs.")


# ----------------------------------------------------------------------------------------------------------------
# Walking models and configs


def stochastic_modules(model: nn.Module) -> Iterator[StochasticActivation]:
    """Every :class:`StochasticActivation` in ``model`` (through any wrapper: DDP, FSDP, compile)."""
    for module in model.modules():
        if isinstance(module, StochasticActivation):
            yield module


#: Attribute names under which transformers MLPs hold their activation module. BERT's MLM head
#: (``transform_act_fn``) is deliberately absent: it is not an FFN.
FFN_ACTIVATION_ATTRS = ("act_fn", "act", "activation_fn", "intermediate_act_fn", "activation")


def _activation_classes() -> tuple[type, ...]:
    from transformers.activations import ACT2CLS

    classes = {StochasticActivation, nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid}
    for value in ACT2CLS.values():
        cls = value[0] if isinstance(value, tuple) else getattr(value, "func", value)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            classes.add(cls)
    return tuple(classes)


def ffn_activations(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """The FFN activation modules of ``model``, found by walking it: ``(path, parent, attribute, module)``.

    An FFN activation is an activation module (any class transformers' ``ACT2CLS`` builds, torch's own, or an
    hf_stochact one) held under one of ``FFN_ACTIVATION_ATTRS``.
    """
    classes = _activation_classes()
    found = []
    for path, parent in model.named_modules():
        for attr in FFN_ACTIVATION_ATTRS:
            module = parent._modules.get(attr) if isinstance(parent, nn.Module) else None
            if module is not None and isinstance(module, classes):
                found.append((f"{path}.{attr}" if path else attr, parent, attr, module))
    return found


def activation_field(config: Any) -> str | None:
    """The config attribute naming the FFN activation (``hidden_act``, ``hidden_activation`` or
    ``activation_function``), or None when the config has none of them set to a string."""
    for field in ACTIVATION_FIELDS:
        if isinstance(getattr(config, field, None), str):
            return field
    return None


def _configs(model: nn.Module) -> list[Any]:
    """The model config and, for composite models, its text sub-config (where the FFN lives)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    text = get_text() if callable(get_text) else None
    if text is not None and text is not config:
        configs.append(text)
    return configs


def get_spec(model: nn.Module) -> StochasticSpec:
    """The settings of ``model``'s stochastic activations (from its modules, which the config mirrors).

    Raises:
        ValueError: if the model has no stochastic activation module.
    """
    modules = list(stochastic_modules(model))
    if not modules:
        raise ValueError(_no_modules_message(model))
    return modules[0].spec


def configure(model: nn.Module, **changes: Any) -> StochasticSpec:
    """Change the stochastic activation settings of a live model: modules *and* config (so they save).

    Keyword arguments are those of :class:`~hf_stochact.StochasticActivation` (``p``, ``variant``, ``choices``,
    ``eval_mode``, ``granularity``). Returns the new :class:`StochasticSpec`.

    Raises:
        ValueError: on an invalid setting, or if the model has no stochastic activation module.
    """
    spec = get_spec(model).replace(**changes)
    for module in stochastic_modules(model):
        module.spec = spec
    configs = _configs(model)
    owners = [c for c in configs if _names_stochastic(c)] or configs[:1]
    for config in owners:
        setattr(config, CONFIG_KEY, spec.to_dict())
    return spec


def _names_stochastic(config: Any) -> bool:
    field = activation_field(config)
    return field is not None and getattr(config, field) == NAME


def _no_modules_message(model: nn.Module) -> str:
    return (f"{type(model).__name__} has no stochastic activation module. Build the model with its activation "
            f"field ({' / '.join(ACTIVATION_FIELDS)}) set to {NAME!r} after `import hf_stochact`.")
