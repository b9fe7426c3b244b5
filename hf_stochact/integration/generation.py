"""``model.generate(..., stochastic_activation=True)`` on any transformers model.

What each FFN activation draws: :mod:`hf_stochact.inference.decoding` (one rule per kind of activation).

Keywords (also read from ``generation_config``, so :func:`set_generation_defaults` makes them a saved default):

* ``stochastic_activation``: True / False.
* ``stochastic_p``: the probability of the smooth branch (SiLU or the model's own activation), ``1 - p`` that of
  ReLU; default per kind of model (:data:`hf_stochact.inference.decoding.RULES`).
* ``stochastic_assistant``: with ``assistant_model=`` (assisted decoding), make the draft model stochastic too
  (default False: the draft stays deterministic).

``stochastic_p`` or ``stochastic_assistant`` without stochastic decoding switched on, or any other ``stochastic_*``
keyword, raises ``ValueError`` (as transformers does for unused model keywords).

How: ``import hf_stochact`` wraps ``GenerationMixin.generate`` once (when transformers' generation code is imported),
and the ``generate`` of every model class that overrides it (MusicGen, Whisper, ... -- 48 classes in transformers 5.23,
wrapped when their first model is built), so the keywords are removed before any class validates its keywords. The
wrapper that sees a call first decides it for the whole call (inner ``super().generate`` calls pass through) and runs it
inside :func:`~hf_stochact.inference.decoding.stochastic_decoding`: per-call state in the calling thread, nothing on the
model changes. Without the flag the original ``generate`` runs untouched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import threading
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..activations.stochastic import check_probability
from ..inference.decoding import stochastic_decoding
from . import patches

GENERATION_KEYS = ("stochastic_activation", "stochastic_p", "stochastic_assistant")
_DECIDING = threading.local()  # ids of the models whose generate call this thread is inside


@dataclasses.dataclass(frozen=True)
class Request:
    """A ``generate`` call's stochastic-decoding request, resolved from its keywords and generation config."""

    enabled: bool
    p: float | None = None
    assistant: bool = False


def resolve(model: nn.Module, kwargs: dict[str, Any]) -> Request:
    """Pop hf_stochact's keywords from ``kwargs`` and resolve them against the generation config.

    Raises:
        ValueError: an unknown ``stochastic_*`` keyword; ``stochastic_activation`` not a bool; ``stochastic_p`` not a
            number in [0, 1]; ``stochastic_p`` / ``stochastic_assistant`` given while stochastic decoding is off;
            ``stochastic_assistant=True`` without an ``assistant_model``.
    """
    unknown = [k for k in kwargs if k.startswith("stochastic_") and k not in GENERATION_KEYS
               and k not in _forward_parameter_names(type(model))]
    if unknown:
        raise ValueError(f"generate: unknown keyword(s) {unknown}; hf_stochact's keywords are "
                         f"{', '.join(GENERATION_KEYS)}")
    given = {k: kwargs.pop(k) for k in GENERATION_KEYS if k in kwargs}
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    flag = given.get("stochastic_activation", getattr(config, "stochastic_activation", None))
    p = given.get("stochastic_p", getattr(config, "stochastic_p", None))
    assistant = given.get("stochastic_assistant", False)
    if flag is not None and not isinstance(flag, bool):
        raise ValueError(f"stochastic_activation must be True or False, got {type(flag).__name__} {flag!r} "
                         "(set the draw's probability with stochastic_p)")
    if not isinstance(assistant, bool):
        raise ValueError(f"stochastic_assistant must be True or False, got {type(assistant).__name__} {assistant!r}")
    if not flag:
        unused = [k for k in ("stochastic_p", "stochastic_assistant") if k in given]
        if unused:
            raise ValueError(f"generate got {', '.join(unused)} but stochastic decoding is off "
                             f"(stochastic_activation={flag!r}): pass stochastic_activation=True, or drop "
                             f"{' and '.join(unused)}")
        return Request(False)
    if p is not None:
        p = check_probability("stochastic_p", p)
    if assistant and kwargs.get("assistant_model") is None:
        raise ValueError("generate got stochastic_assistant=True but no assistant_model: it makes the draft model of "
                         "assisted decoding stochastic; pass assistant_model=..., or drop stochastic_assistant")
    return Request(True, p, assistant)


@functools.lru_cache(maxsize=256)
def _forward_parameter_names(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


@contextlib.contextmanager
def _deciding(model: nn.Module) -> Iterator[bool]:
    """Yields whether an outer ``generate`` of ``model`` in this thread already decided the call."""
    inside = getattr(_DECIDING, "ids", frozenset())
    if id(model) in inside:
        yield True
        return
    _DECIDING.ids = inside | {id(model)}
    try:
        yield False
    finally:
        _DECIDING.ids = inside


def _wrap_generate(original):
    @functools.wraps(original)
    def generate(self, *args, **kwargs):
        with _deciding(self) as decided:
            if decided:  # a subclass's generate already took the keywords: its super() call passes through
                return original(self, *args, **kwargs)
            request = resolve(self, kwargs)
            if not request.enabled:
                return original(self, *args, **kwargs)
            assistant = kwargs.get("assistant_model") if request.assistant else None
            with stochastic_decoding(self, request.p, assistant=assistant):
                return original(self, *args, **kwargs)

    generate._hf_stochact = True
    return generate


def wrap_class_generate(cls: type) -> bool:
    """Wrap the ``generate`` of a model class that overrides ``GenerationMixin.generate`` (idempotent; run from
    ``post_init`` for every model built). Returns whether a wrapper was added."""
    from transformers.generation.utils import GenerationMixin

    if not issubclass(cls, GenerationMixin):
        return False
    for klass in cls.__mro__:
        if klass is GenerationMixin:
            return False
        own = klass.__dict__.get("generate")
        if own is not None:
            if getattr(own, "_hf_stochact", False) or not callable(own):
                return False
            patches.set_attribute(klass, "generate", _wrap_generate(own))
            return True
    return False


def install() -> None:
    """Wrap ``GenerationMixin.generate`` (idempotent). :func:`hf_stochact.install` runs it once
    ``transformers.generation.utils`` is imported."""
    from transformers.generation.utils import GenerationMixin

    # the wrapper pops its keywords because generate() rejects unknown model kwargs in _validate_model_kwargs
    generate = getattr(GenerationMixin, "generate", None)
    if not (callable(generate) and hasattr(GenerationMixin, "_validate_model_kwargs")):
        import transformers

        raise ImportError(f"hf_stochact cannot hook transformers {transformers.__version__}: "
                          "GenerationMixin.generate / _validate_model_kwargs moved. "
                          "Supported: transformers >= 5.0, < 6.")
    if not getattr(GenerationMixin.generate, "_hf_stochact", False):
        patches.set_attribute(GenerationMixin, "generate", _wrap_generate(GenerationMixin.generate))


def set_generation_defaults(model: nn.Module, stochastic_activation: bool = True, stochastic_p: float | None = None):
    """Make stochastic decoding the default of ``model.generate`` and save it with ``model.generation_config``.

    Sets ``generation_config.stochastic_activation`` / ``stochastic_p`` and clears ``_from_model_config`` (a
    generation config derived from the model config drops unknown keys when reloaded).

    Raises:
        ValueError: ``stochastic_activation`` not a bool; ``stochastic_p`` not a number in [0, 1].
    """
    if not isinstance(stochastic_activation, bool):
        raise ValueError(f"stochastic_activation must be True or False, got {stochastic_activation!r}")
    config = model.generation_config
    config.stochastic_activation = stochastic_activation
    config.stochastic_p = None if stochastic_p is None else check_probability("stochastic_p", stochastic_p)
    config._from_model_config = False
    return config
