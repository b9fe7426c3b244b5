"""hf_stochact: stochastic activations (Lomeli et al., 2025) for any Hugging Face transformers model.

``import hf_stochact`` registers ``"stochastic"`` in transformers' ``ACT2FN`` (see :mod:`hf_stochact.integration`
for every patch, and :func:`uninstall` to undo them); then set a model config's activation field (``hidden_act``,
``hidden_activation`` or ``activation_function``) to ``"stochastic"`` and build the model. ``p`` is always the
probability of **SiLU**.

Layout: ``activations/`` the math, ``kernels/`` the PyTorch operators (C loops on CPU, torch ops elsewhere),
``layouts.py`` where FFNs are in a model, ``integration/`` the transformers patches, PEFT adapters and GGUF
loading, ``training/`` schedule and gate shifts, ``inference/`` sparsify, ``analysis/`` sparsity metrics, ``cli/``
the ``hf-stochact`` commands.

Every public name below is imported on first use (module ``__getattr__``), so ``import hf_stochact`` costs the
``ACT2FN`` registration only, not the Trainer, sparse inference, ``datasets`` or the CLI.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _distribution_version
from typing import TYPE_CHECKING

from .integration import install, uninstall

try:
    __version__ = _distribution_version("hf_stochact")  # the one version: [project] version in pyproject.toml
except PackageNotFoundError:  # a source tree on sys.path without an install
    __version__ = "0+unknown"

# public name -> module that defines it (relative to this package); imported on first access
_LAZY = {
    "GumbelStochActivation": ".activations",
    "LearnableStochActivation": ".activations",
    "StochasticActivation": ".activations",
    "StochasticSpec": ".activations",
    "SparsityMonitor": ".analysis.metrics",
    "measure_sparsity": ".analysis.metrics",
    "perplexity": ".analysis.metrics",
    "Uncertainty": ".analysis.uncertainty",
    "uncertainty": ".analysis.uncertainty",
    "SparseConfig": ".inference.sparse",
    "ThresholdedLinear": ".inference.sparse",
    "is_sparsified": ".inference.sparse",
    "sparse_stats": ".inference.sparse",
    "sparsify": ".inference.sparse",
    "unsparsify": ".inference.sparse",
    "decode_path": ".runtime.fast",
    "fast_decode": ".runtime.fast",
    "Thresholds": ".inference.thresholds",
    "calibrate_thresholds": ".inference.thresholds",
    "apply_saved_activation": ".integration.adapters",
    "load_adapter": ".integration.adapters",
    "ACTIVATION_FIELDS": ".integration.config",
    "CONFIG_KEY": ".integration.config",
    "activation_field": ".integration.config",
    "configure": ".integration.config",
    "get_spec": ".integration.config",
    "stochastic_modules": ".integration.config",
    "set_generation_defaults": ".integration.generation",
    "stochastic_decoding": ".integration.generation",
    "make_serializable": ".integration.serializable",
    "LAYOUTS": ".layouts",
    "MLP": ".layouts",
    "MLPLayout": ".layouts",
    "ffn_activations": ".layouts",
    "find_mlps": ".layouts",
    "InputSparsityHooks": ".training.recover",
    "SparseRecoverySchedule": ".training.recover",
    "Stage": ".training.schedule",
    "StochActSchedule": ".training.schedule",
    "set_activation": ".training.schedule",
    "GateShift": ".training.shift",
    "GateShiftSchedule": ".training.shift",
    "calibrate_shift": ".training.shift",
}
# subpackages reachable as attributes (hf_stochact.data.load_corpus(...)) without an explicit import
_SUBMODULES = ("activations", "analysis", "cli", "data", "inference", "integration", "kernels", "layouts", "runtime",
               "training")

if TYPE_CHECKING:  # the same names, for type checkers and IDEs (tests/test_packaging.py checks both lists agree)
    from .activations import GumbelStochActivation, LearnableStochActivation, StochasticActivation, StochasticSpec
    from .analysis.metrics import SparsityMonitor, measure_sparsity, perplexity
    from .analysis.uncertainty import Uncertainty, uncertainty
    from .inference.sparse import SparseConfig, ThresholdedLinear, is_sparsified, sparse_stats, sparsify, unsparsify
    from .inference.thresholds import Thresholds, calibrate_thresholds
    from .integration.adapters import apply_saved_activation, load_adapter
    from .integration.config import (
        ACTIVATION_FIELDS,
        CONFIG_KEY,
        activation_field,
        configure,
        get_spec,
        stochastic_modules,
    )
    from .integration.generation import set_generation_defaults, stochastic_decoding
    from .integration.serializable import make_serializable
    from .layouts import LAYOUTS, MLP, MLPLayout, ffn_activations, find_mlps
    from .runtime.fast import decode_path, fast_decode
    from .training.recover import InputSparsityHooks, SparseRecoverySchedule
    from .training.schedule import Stage, StochActSchedule, set_activation
    from .training.shift import GateShift, GateShiftSchedule, calibrate_shift


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))


install()

__all__ = sorted([*_LAZY, "__version__", "install", "uninstall"])
