"""The activations: one short class each, and the name -> class table that ``install()`` registers in transformers'
``ACT2FN``/``ACT2CLS`` (so ``config.hidden_act = "stochastic"`` builds one)."""

from .learnable import GumbelStochActivation, LearnableStochActivation
from .stochastic import StochasticActivation, StochasticSpec

#: name -> zero-argument class, as transformers' ACT2CLS wants it.
ACTIVATIONS = {
    "stochastic": StochasticActivation,
    "learnable_stoch": LearnableStochActivation,
    "gumbel_stoch": GumbelStochActivation,
}

__all__ = ["ACTIVATIONS", "GumbelStochActivation", "LearnableStochActivation", "StochasticActivation",
           "StochasticSpec"]
