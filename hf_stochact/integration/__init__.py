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
``PeftModel.save_pretrained`` /            an adapter folder records the base model's FFN activation (e.g. the
``from_pretrained`` wrappers (peft)        schedule's final ReLU); loading it onto a base with another one warns
                                          (:mod:`~hf_stochact.integration.adapters`)
========================================  =====================================================================

The ``ACT2FN`` entries are written by ``import hf_stochact``; each wrapper is installed when its transformers module
is first imported (at once if it already is: :func:`~hf_stochact.integration.patches.when_imported`), so importing
the plugin does not pull in transformers' modeling, generation and Trainer code. Each patch checks, when it is
applied, that the transformers object it relies on is where it expects; a release that moves one raises
``ImportError`` naming it, instead of silently doing nothing. :func:`uninstall` undoes them all.
"""

from __future__ import annotations

import copy
import functools

from ..activations import ACTIVATIONS
from ..inference import decoding
from . import adapters, generation, patches, trainer
from .config import apply_config

_INSTALLED = False


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
    patches.set_item(activations.ACT2CLS, name, cls)
    patches.set_item(activations.ACT2FN, name, cls)
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
    patches.set_attribute(PreTrainedModel, "post_init", post_init)


def hook_save_pretrained() -> None:
    """Around ``PreTrainedModel.save_pretrained``: the rotations of rotated input thresholds
    (:mod:`hf_stochact.inference.rotation`), which ``config.json`` names by digest, go next to the weights; the
    generation config is written without what :func:`~hf_stochact.fast_decode` set (a process setting, like a
    compiled graph: the reloaded model decodes as saved, and ``fast_decode`` again makes it fast)."""
    from transformers import PreTrainedModel

    original = getattr(PreTrainedModel, "save_pretrained", None)
    _require(callable(original), "PreTrainedModel.save_pretrained is gone")
    if getattr(original, "_hf_stochact", False):
        return

    @functools.wraps(original)
    def save_pretrained(self, save_directory, *args, is_main_process: bool = True, **kwargs):
        from ..inference.rotation import to_save, write_rotations

        rotations = to_save(self)  # raises before anything is written
        saved = self.__dict__.get("_hf_stochact_saved_generation")  # fast_decode's settings stay in this process
        config = getattr(self, "generation_config", None)
        if saved is not None and config is not None:
            written = copy.deepcopy(config)
            written.cache_implementation, written.compile_config, written.disable_compile = saved
            self.generation_config = written  # one reference swap: a concurrent generate sees either object
        try:
            result = original(self, save_directory, *args, is_main_process=is_main_process, **kwargs)
        finally:
            if saved is not None and config is not None:
                self.generation_config = config
        if is_main_process:
            write_rotations(rotations, save_directory)
        return result

    save_pretrained._hf_stochact = True
    patches.set_attribute(PreTrainedModel, "save_pretrained", save_pretrained)


def hook_resize_token_embeddings() -> None:
    """Around ``PreTrainedModel.resize_token_embeddings``: a sparsified model's LM head wrapper
    (:class:`~hf_stochact.inference.sparse.RowsHead`, which transformers' resize refuses as "not an nn.Linear") is
    taken off first and put back on the resized head."""
    from transformers import PreTrainedModel

    original = getattr(PreTrainedModel, "resize_token_embeddings", None)
    _require(callable(original), "PreTrainedModel.resize_token_embeddings is gone")
    if getattr(original, "_hf_stochact", False):
        return

    @functools.wraps(original)
    def resize_token_embeddings(self, *args, **kwargs):
        from ..inference.sparse import rewrap_head, unwrap_head

        config = unwrap_head(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            if config is not None:
                rewrap_head(self, config)

    resize_token_embeddings._hf_stochact = True
    patches.set_attribute(PreTrainedModel, "resize_token_embeddings", resize_token_embeddings)


def install() -> None:
    """Apply every patch (idempotent): the ``ACT2FN`` entries now, each wrapper when its transformers module is
    imported (now if it already is). ``import hf_stochact`` calls it; call it again after :func:`uninstall`.

    Raises:
        ImportError: a transformers object a patch relies on moved (here or at the later import).
    """
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    register_activations()
    patches.when_imported("transformers.modeling_utils", hook_post_init)
    patches.when_imported("transformers.modeling_utils", hook_save_pretrained)
    patches.when_imported("transformers.modeling_utils", hook_resize_token_embeddings)
    patches.when_imported("transformers.generation.utils", generation.install)
    patches.when_imported("transformers.trainer_callback", trainer.install)
    patches.when_imported("peft.peft_model", adapters.install)


def uninstall() -> int:
    """Undo every patch :func:`install` made: ``ACT2FN`` / ``ACT2CLS`` without the hf_stochact names (or with
    what was there before), the original ``post_init``, ``generate`` (``GenerationMixin``'s and every model class's)
    and ``CallbackHandler.add_callback``; wrappers not yet installed never will be. Returns the number of patches
    undone.

    Models built before keep what they were built with (their stochastic modules and the decoding hooks, which do
    nothing outside a stochastic ``generate``, a call that now raises as an unknown keyword); a config naming
    ``"stochastic"`` no longer builds (``KeyError``). ``install()`` puts everything back.
    """
    global _INSTALLED
    _INSTALLED = False
    return patches.undo_all()
