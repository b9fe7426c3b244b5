"""The blog's learned variants ("Fun with stochastic activations"): ``learnable_stoch`` and ``gumbel_stoch``.

Both mix ReLU and SiLU per element with a weight from a tiny **gate network that sees the element's own
pre-activation value x** (input-dependent switching, one of the blog's open questions):

    logit(x) = w2 . tanh(w1 * x + b1) + b2        w1, b1, w2: ``gate_hidden`` values each (default 4), b2: 1
                                                   -> 3 * gate_hidden + 1 = 13 parameters per FFN layer

shared by all elements of the layer (so the parameter count does not depend on the model's width).
a(x) = sigmoid(logit(x)) is the weight of ReLU.

* ``LearnableStochActivation`` (``"learnable_stoch"``): y = a(x) ReLU(x) + (1 - a(x)) SiLU(x), continuous and
  deterministic; it produces no exact zeros unless a(x) saturates at 1 on negative inputs.
* ``GumbelStochActivation`` (``"gumbel_stoch"``): a hard per-element choice, ReLU with probability a(x), through the
  binary Gumbel-softmax (concrete) relaxation with a straight-through estimator: the forward value is exactly
  ReLU(x) or SiLU(x) (so its sparsity is measurable), the backward uses the relaxed sample's gradient, which reaches
  the gate parameters. ``temperature`` sets the relaxation (default 1.0). In ``eval()`` it is deterministic by
  default: the more probable branch (``eval_mode="argmax"``); ``"mean"`` gives a(x) ReLU + (1 - a) SiLU and
  ``"sample"`` keeps sampling.

Parameters are ordinary ``nn.Parameter`` s: trained with the model, saved and loaded with it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels

GUMBEL_EVAL_MODES = ("argmax", "mean", "sample")


class _ScalarGate(nn.Module):
    """logit(x) = w2 . tanh(w1 x + b1) + b2, applied to every element independently."""

    def __init__(self, hidden: int = 4, init_logit: float = 0.0):
        super().__init__()
        if int(hidden) < 1:
            raise ValueError(f"gate_hidden must be an integer >= 1, got {hidden!r}")
        hidden = int(hidden)
        g = torch.Generator().manual_seed(hidden)  # deterministic init, independent of the global RNG
        self.w1 = nn.Parameter(torch.randn(hidden, generator=g))
        self.b1 = nn.Parameter(torch.zeros(hidden))
        self.w2 = nn.Parameter(torch.randn(hidden, generator=g) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.tensor([float(init_logit)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(x.unsqueeze(-1) * self.w1.to(x.dtype) + self.b1.to(x.dtype))
        return hidden @ self.w2.to(x.dtype) + self.b2.to(x.dtype)


class LearnableStochActivation(nn.Module):
    """y = a(x) ReLU(x) + (1 - a(x)) SiLU(x) with a(x) = sigmoid(gate(x)) learned (see the module docstring).

    Args:
        gate_hidden: width of the scalar gate network (parameters: 3 * gate_hidden + 1).
        init_relu_weight: a(x) at initialisation where the gate's hidden units are ~0 (default 0.5).

    Raises:
        ValueError: ``gate_hidden`` < 1 or ``init_relu_weight`` outside (0, 1).
    """

    def __init__(self, gate_hidden: int = 4, init_relu_weight: float = 0.5):
        super().__init__()
        if not 0.0 < float(init_relu_weight) < 1.0:
            raise ValueError(f"init_relu_weight must be in (0, 1), got {init_relu_weight!r}")
        self.gate = _ScalarGate(gate_hidden, math.log(init_relu_weight / (1 - init_relu_weight)))

    def relu_weight(self, x: torch.Tensor) -> torch.Tensor:
        """a(x), the weight of ReLU, per element."""
        return torch.sigmoid(self.gate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.relu_weight(x)
        return a * torch.relu(x) + (1 - a) * F.silu(x)


class GumbelStochActivation(nn.Module):
    """Hard ReLU/SiLU choice per element, P(ReLU) = sigmoid(gate(x)) learned by straight-through Gumbel-softmax.

    Args:
        gate_hidden: width of the scalar gate network (parameters: 3 * gate_hidden + 1).
        temperature: Gumbel-softmax temperature (> 0, default 1.0).
        eval_mode: ``"argmax"`` (default), ``"mean"`` or ``"sample"``.
        init_relu_prob: P(ReLU) at initialisation (default 0.5, the blog's ``stoch``).

    Raises:
        ValueError: on any argument outside the allowed values.
    """

    def __init__(self, gate_hidden: int = 4, temperature: float = 1.0, eval_mode: str = "argmax",
                 init_relu_prob: float = 0.5):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if eval_mode not in GUMBEL_EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {GUMBEL_EVAL_MODES}, got {eval_mode!r}")
        if not 0.0 < float(init_relu_prob) < 1.0:
            raise ValueError(f"init_relu_prob must be in (0, 1), got {init_relu_prob!r}")
        self.gate = _ScalarGate(gate_hidden, math.log(init_relu_prob / (1 - init_relu_prob)))
        self.temperature = float(temperature)
        self.eval_mode = eval_mode
        self.generator: torch.Generator | None = None

    def relu_prob(self, x: torch.Tensor) -> torch.Tensor:
        """P(ReLU) per element."""
        return torch.sigmoid(self.gate(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logit = self.gate(x)
        if self.training or self.eval_mode == "sample":
            u = kernels.uniform(kernels.new_seed(x.device, self.generator), tuple(x.shape), x.device)
            noise = (torch.log(u) - torch.log1p(-u)).to(x.dtype)  # difference of two Gumbels = logistic noise
            soft = torch.sigmoid((logit + noise) / self.temperature)
            hard = (soft > 0.5).to(x.dtype)
            z = hard + (soft - soft.detach())  # straight-through: value exactly hard, gradient of the relaxed one
        elif self.eval_mode == "mean":
            z = torch.sigmoid(logit)
        else:
            z = (logit > 0).to(x.dtype)
        # z in {0, 1} in the forward: exactly ReLU(x) or SiLU(x), so exact zeros stay exact
        return z * torch.relu(x) + (1 - z) * F.silu(x)
