"""hf_stochact: stochastic activations (Lomeli et al., 2025) for any Hugging Face transformers model.

``import hf_stochact`` registers ``"stochastic"`` in transformers' ``ACT2FN`` (see :mod:`hf_stochact.integration`
for every patch); then set a model config's activation field (``hidden_act``, ``hidden_activation`` or
``activation_function``) to ``"stochastic"`` and build the model. ``p`` is always the probability of **SiLU**.

Layout: ``activations/`` the math, ``kernels/`` the PyTorch operators (C loops on CPU, torch ops elsewhere),
``layouts.py`` where FFNs are in a model, ``integration/`` the transformers patches, ``training/`` schedule and
gate shifts, ``inference/`` sparsify, ``analysis/`` sparsity metrics, ``cli/`` the ``hf-stochact`` commands.
"""

from .activations import GumbelStochActivation, LearnableStochActivation, StochasticActivation, StochasticSpec
from .analysis.metrics import SparsityMonitor, measure_sparsity, perplexity
from .inference.sparse import SparseConfig, ThresholdedLinear, is_sparsified, sparse_stats, sparsify, unsparsify
from .inference.thresholds import Thresholds, calibrate_thresholds
from .integration import install
from .integration.config import (
    ACTIVATION_FIELDS,
    CONFIG_KEY,
    activation_field,
    configure,
    get_spec,
    stochastic_modules,
)
from .integration.generation import set_generation_defaults, stochastic_decoding
from .layouts import LAYOUTS, MLP, MLPLayout, ffn_activations, find_mlps
from .training.schedule import Stage, StochActSchedule, set_activation
from .training.shift import GateShift, GateShiftSchedule, calibrate_shift

__version__ = "0.2.0"

install()

__all__ = [
    "ACTIVATION_FIELDS",
    "CONFIG_KEY",
    "LAYOUTS",
    "MLP",
    "GateShift",
    "GateShiftSchedule",
    "GumbelStochActivation",
    "LearnableStochActivation",
    "MLPLayout",
    "SparseConfig",
    "SparsityMonitor",
    "Stage",
    "StochActSchedule",
    "StochasticActivation",
    "StochasticSpec",
    "ThresholdedLinear",
    "Thresholds",
    "activation_field",
    "calibrate_shift",
    "calibrate_thresholds",
    "configure",
    "ffn_activations",
    "find_mlps",
    "get_spec",
    "install",
    "is_sparsified",
    "measure_sparsity",
    "perplexity",
    "set_activation",
    "set_generation_defaults",
    "sparse_stats",
    "sparsify",
    "stochastic_decoding",
    "stochastic_modules",
    "unsparsify",
]
