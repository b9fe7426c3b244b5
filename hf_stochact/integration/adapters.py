"""PEFT adapters (LoRA, ...) trained with a changed FFN activation: saved with it, reloaded with it.

``StochActSchedule`` (and ``set_activation``) change the FFN activation of the *base* model and its config; a PEFT
adapter folder holds only the adapter's weights and ``adapter_config.json``, so ``PeftModel.from_pretrained(base,
folder)`` on a freshly loaded base would run the adapter with the base's own activation (SiLU for a Llama) instead
of the one it was trained with (ReLU after the schedule's final swap): different outputs, no error.

With ``hf_stochact`` imported (:func:`hf_stochact.install`, undone by :func:`hf_stochact.uninstall`):

* ``PeftModel.save_pretrained`` also writes :data:`ACTIVATION_FILE` (``stochact_activation.json``) next to each
  ``adapter_config.json``: the base config's activation field, its value and ``config.stochastic_activation``;
* ``PeftModel.from_pretrained(base, folder)`` warns when that file names another activation than ``base`` has;
* :func:`load_adapter` is the one call that gets it right; :func:`apply_saved_activation` sets a model's activation
  from the file.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from . import patches
from .config import CONFIG_KEY, activation_field, model_configs

ACTIVATION_FILE = "stochact_activation.json"
logger = logging.getLogger("hf_stochact")


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a PEFT wrapper (``PeftModel`` and its task subclasses), without importing peft."""
    return hasattr(model, "peft_config") and callable(getattr(model, "get_base_model", None))


def saved_activation(model: nn.Module) -> dict[str, Any] | None:
    """What :data:`ACTIVATION_FILE` records for ``model`` (a PEFT model or its base): ``{"field": "hidden_act",
    "activation": "relu", "stochastic_activation": None}``, or None for a model without an activation field."""
    for config in reversed(model_configs(model)):  # the text sub-config of a composite model holds the FFN
        field = activation_field(config)
        if field is not None:
            return {"field": field, "activation": getattr(config, field),
                    "stochastic_activation": getattr(config, CONFIG_KEY, None)}
    return None


def read_activation_file(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The contents of ``folder/stochact_activation.json``, or None where there is no such file."""
    path = Path(folder) / ACTIVATION_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def apply_saved_activation(model: nn.Module, folder: str | os.PathLike) -> str | None:
    """Give ``model`` (a base model or a PEFT model) the FFN activation recorded in ``folder`` (an adapter folder
    saved with hf_stochact imported): its modules and its config, via :func:`hf_stochact.set_activation`. Returns
    the activation name, or None (nothing changed) when ``folder`` has no :data:`ACTIVATION_FILE`.

    Raises:
        ValueError: the recorded activation is unknown to transformers' ``ACT2FN``, or ``model`` has no FFN
            activation module.
    """
    from ..activations import StochasticSpec
    from ..training.schedule import set_activation

    record = read_activation_file(folder)
    if record is None:
        return None
    activation = record["activation"]
    settings = record.get("stochastic_activation")
    spec = StochasticSpec.from_dict(settings, where=ACTIVATION_FILE) if settings else None
    set_activation(model, activation, spec)
    return activation


def load_adapter(base: nn.Module, folder: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``PeftModel.from_pretrained(base, folder, **kwargs)`` with the FFN activation the adapter was trained with:
    :func:`apply_saved_activation` on ``base`` first (no-op for a folder without :data:`ACTIVATION_FILE`). Returns
    the ``PeftModel``.

    Raises:
        ImportError: peft is not installed.
    """
    from peft import PeftModel

    apply_saved_activation(base, folder)
    return PeftModel.from_pretrained(base, folder, **kwargs)


def write_activation_file(model: nn.Module, folders: list[str]) -> None:
    record = saved_activation(model)
    if record is None:
        return
    from .. import __version__

    record["hf_stochact"] = __version__
    for folder in folders:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / ACTIVATION_FILE).write_text(json.dumps(record, indent=2) + "\n")
        logger.info("hf_stochact: FFN activation %r recorded in %s", record["activation"],
                    Path(folder) / ACTIVATION_FILE)


def check_activation_file(base: nn.Module, folder: str | os.PathLike) -> bool:
    """Warn (and return True) when ``folder`` records another FFN activation than ``base`` has."""
    record = read_activation_file(folder)
    current = saved_activation(base)
    if record is None or current is None:
        return False
    if (record["activation"], record.get("stochastic_activation")) == (current["activation"],
                                                                       current["stochastic_activation"]):
        return False
    warnings.warn(f"the adapter in {folder} was trained with FFN activation {record['activation']!r} "
                  f"({ACTIVATION_FILE}), but the base model has {current['activation']!r}: its outputs differ from "
                  f"the trained model's. Load it with hf_stochact.load_adapter(base, {str(folder)!r}), or call "
                  "hf_stochact.apply_saved_activation(model, folder).", UserWarning, stacklevel=3)
    return True


def install() -> None:
    """Wrap ``PeftModel.save_pretrained`` (write :data:`ACTIVATION_FILE`) and ``PeftModel.from_pretrained`` (warn on
    a mismatch). :func:`hf_stochact.install` runs it once ``peft.peft_model`` is imported."""
    from peft.peft_model import PeftModel  # the module just imported; the peft package may still be initialising

    save, load = PeftModel.__dict__.get("save_pretrained"), PeftModel.__dict__.get("from_pretrained")
    if not callable(save) or not isinstance(load, classmethod):
        raise ImportError("hf_stochact cannot hook this peft release: PeftModel.save_pretrained / from_pretrained "
                          "moved")
    if getattr(save, "_hf_stochact", False):
        return

    @functools.wraps(save)
    def save_pretrained(self, save_directory, *args, selected_adapters=None, is_main_process=True, **kwargs):
        save(self, save_directory, *args, selected_adapters=selected_adapters, is_main_process=is_main_process,
             **kwargs)
        if is_main_process:
            names = selected_adapters or list(self.peft_config)
            write_activation_file(self, [save_directory if name == "default" else os.path.join(save_directory, name)
                                         for name in names])

    @functools.wraps(load.__func__)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        result = load.__func__(cls, model, model_id, *args, **kwargs)
        folder = Path(model_id) / (kwargs.get("subfolder") or "") if Path(model_id).is_dir() else None
        if folder is not None:
            check_activation_file(model, folder)
        return result

    save_pretrained._hf_stochact = True
    patches.set_attribute(PeftModel, "save_pretrained", save_pretrained)
    patches.set_attribute(PeftModel, "from_pretrained", classmethod(from_pretrained))
