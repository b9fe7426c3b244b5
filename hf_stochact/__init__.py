"""hf_stochact: stochastic activations (Lomeli et al., 2025) for any Hugging Face transformers model.

``import hf_stochact`` registers ``"stochastic"`` in transformers' ``ACT2FN``; then set a model config's activation
field (``hidden_act``, ``hidden_activation`` or ``activation_function``) to ``"stochastic"`` and build the model.
Settings go in ``config.stochastic_activation`` (a dict of :class:`StochasticSpec` fields) or through
:func:`configure`. ``p`` is always the probability of **SiLU**.
"""

from .activations import StochasticActivation, StochasticSpec
from .generation import install as _install_generation
from .generation import set_generation_defaults, stochastic_decoding
from .metrics import SparsityMonitor, measure_sparsity
from .registry import (
    ACTIVATION_FIELDS,
    CONFIG_KEY,
    activation_field,
    configure,
    ffn_activations,
    get_spec,
    register,
    stochastic_modules,
)
from .schedule import Stage, StochActSchedule, set_activation
from .shift import GateShift, GateShiftSchedule, calibrate_shift
from .sparse import SparseConfig, is_sparsified, sparse_stats, sparsify, unsparsify

__version__ = "0.1.0"

register()
_install_generation()

__all__ = [
    "ACTIVATION_FIELDS",
    "CONFIG_KEY",
    "GateShift",
    "GateShiftSchedule",
    "StochasticActivation",
    "SparseConfig",
    "SparsityMonitor",
    "Stage",
    "StochActSchedule",
    "StochasticSpec",
    "activation_field",
    "calibrate_shift",
    "configure",
    "ffn_activations",
    "get_spec",
    "is_sparsified",
    "measure_sparsity",
    "register",
    "set_activation",
    "set_generation_defaults",
    "sparse_stats",
    "sparsify",
    "stochastic_decoding",
    "stochastic_modules",
    "unsparsify",
]
