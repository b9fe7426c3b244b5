"""Every change hf_stochact makes to transformers, in one place, behind :func:`install` (run on import).

========================================  =====================================================================
patch                                     why
========================================  =====================================================================
``ACT2FN`` / ``ACT2CLS`` entries          ``config.hidden_act = "stochastic"`` (and the learned variants)
                                          builds our module; both tables mutated in place, never rebound
``PreTrainedModel.post_init`` wrapper      ``config.stochastic_activation`` reaches the modules of every model
                                          built (constructor, ``from_config``, ``from_pretrained``); stock FFN
                                          activations get the decoding hook (a no-op outside stochastic
                                          ``generate`` calls); a model class's own ``generate`` is wrapped
``GenerationMixin.generate`` wrapper       ``generate(..., stochastic_activation=True)``
``CallbackHandler.add_callback`` wrapper   our callbacks run before the reporting integrations, so their
                                          ``on_log`` metrics reach TensorBoard / W&B
========================================  =====================================================================

Each patch checks, at install time, that the transformers object it relies on is where it expects; a release that
moves one raises ``ImportError`` naming it, instead of silently doing nothing.
"""

from __future__ import annotations

import functools

from ..activations import ACTIVATIONS
from ..inference import decoding
from . import generation, trainer
from .config import apply_config


def _require(condition: bool, what: str) -> None:
    if not condition:
        import transformers

        raise ImportError(f"hf_stochact cannot hook transformers {transformers.__version__}: {what}. "
                          "Supported: transformers >= 5.0, < 6.")


def register_activation(name: str, cls: type) -> None:
    """Put ``cls`` (a zero-argument module class) under ``name`` in transformers' ``ACT2FN`` and ``ACT2CLS``, in place
    and idempotently. ``ACT2FN`` holds its own copy of ``ACT2CLS``, so both are written; ``ACT2FN`` is mutated, never
    rebound, because every modeling file holds a reference to the same object."""
    from transformers import activations

    _require(isinstance(getattr(activations, "ACT2CLS", None), dict), "transformers.activations.ACT2CLS is not a dict")
    _require(hasattr(getattr(activations, "ACT2FN", None), "__setitem__"),
             "transformers.activations.ACT2FN is missing or immutable")
    activations.ACT2CLS[name] = cls
    activations.ACT2FN[name] = cls
    _require(isinstance(activations.ACT2FN[name], cls), "ACT2FN[name] no longer builds the registered class")


def register_activations() -> None:
    """Register every hf_stochact activation (:data:`hf_stochact.activations.ACTIVATIONS`)."""
    for name, cls in ACTIVATIONS.items():
        register_activation(name, cls)


def hook_post_init() -> None:
    """At the end of ``PreTrainedModel.post_init``: :func:`~hf_stochact.integration.config.apply_config`,
    :func:`~hf_stochact.inference.decoding.attach` and
    :func:`~hf_stochact.integration.generation.wrap_class_generate`."""
    from transformers import PreTrainedModel

    original = getattr(PreTrainedModel, "post_init", None)
    _require(callable(original), "PreTrainedModel.post_init is gone")
    if getattr(original, "_hf_stochact", False):
        return

    @functools.wraps(original)
    def post_init(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        apply_config(self)
        decoding.attach(self)
        generation.wrap_class_generate(type(self))
        return result

    post_init._hf_stochact = True
    PreTrainedModel.post_init = post_init


def install() -> None:
    """Apply every patch (idempotent). ``import hf_stochact`` calls it; call it again in a process that imported
    transformers' modeling code some other way only if you removed the patches."""
    register_activations()
    hook_post_init()
    generation.install()
    trainer.install()
