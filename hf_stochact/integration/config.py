"""Settings that live in the model config: the activation field, ``config.stochastic_activation``, and the two
public calls that read and change them on a live model (:func:`get_spec`, :func:`configure`).

transformers builds every MLP activation with ``ACT2FN[config.<field>]`` inside ``__init__``; the activation's
settings live in ``config.stochastic_activation`` (a plain dict, so ``save_pretrained`` writes it to config.json)
and are pushed into the modules by :func:`apply_config`, which ``install()`` runs at the end of
``PreTrainedModel.post_init`` (every transformers model calls it in its constructor: direct construction,
``from_config`` and ``from_pretrained`` all pass through it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..activations import StochasticActivation, StochasticSpec

logger = logging.getLogger(__name__)

NAME = "stochastic"
CONFIG_KEY = "stochastic_activation"
# The config fields that name the FFN activation, in lookup order (Gemma 2/3 accept hidden_act but read
# hidden_activation, so that one wins when both exist).
ACTIVATION_FIELDS = ("hidden_activation", "activation_function", "hidden_act")


def stochastic_modules(model: nn.Module) -> Iterator[StochasticActivation]:
    """Every :class:`StochasticActivation` in ``model`` (through any wrapper: DDP, FSDP, compile)."""
    for module in model.modules():
        if isinstance(module, StochasticActivation):
            yield module


def activation_field(config: Any) -> str | None:
    """The config attribute naming the FFN activation (``hidden_act``, ``hidden_activation`` or
    ``activation_function``), or None when the config has none of them set to a string."""
    for field in ACTIVATION_FIELDS:
        if isinstance(getattr(config, field, None), str):
            return field
    return None


def model_configs(model: nn.Module) -> list[Any]:
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


def apply_config(model: nn.Module) -> None:
    """Push ``config.stochastic_activation`` into the model's stochastic modules (run after ``post_init``)."""
    modules = list(stochastic_modules(model))
    if not modules:
        return
    settings = getattr(getattr(model, "config", None), CONFIG_KEY, None)
    if settings is not None:
        spec = StochasticSpec.from_dict(settings, where=CONFIG_KEY)
        for module in modules:
            module.spec = spec
    if getattr(model, "use_kernels", False) or getattr(model, "kernel_config", None) is not None:
        logger.warning("hf_stochact: kernels are enabled on this model; a kernel that fuses the MLP would bypass "
                       "the stochastic activation. Disable use_kernels/kernel_config to be sure it runs.")


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
    configs = model_configs(model)
    owners = [c for c in configs if _names_stochastic(c)] or configs[:1]
    for config in owners:
        setattr(config, CONFIG_KEY, spec.to_dict())
    return spec


def set_config_activation(model: nn.Module, activation: str, spec: StochasticSpec | None) -> None:
    """Write ``activation`` into every config's activation field; set or remove ``config.stochastic_activation``."""
    for config in model_configs(model):
        field = activation_field(config)
        if field is None:
            continue
        setattr(config, field, activation)
        if spec is not None:
            setattr(config, CONFIG_KEY, spec.to_dict())
        elif hasattr(config, CONFIG_KEY):
            delattr(config, CONFIG_KEY)


def _names_stochastic(config: Any) -> bool:
    field = activation_field(config)
    return field is not None and getattr(config, field) == NAME


def _no_modules_message(model: nn.Module) -> str:
    return (f"{type(model).__name__} has no stochastic activation module. Build the model with its activation "
            f"field ({' / '.join(ACTIVATION_FIELDS)}) set to {NAME!r} after `import hf_stochact`.")
