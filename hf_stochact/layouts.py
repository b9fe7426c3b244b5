"""Where the FFN is in a model: one table of MLP layouts and one walk, :func:`find_mlps`, used by every feature
(the schedule's activation swaps, stochastic decoding, sparsify, gate shifts, sparsity metrics).

A layout names, inside one module, the attribute holding the FFN activation and, where the family has them, the
projection feeding it (``pre``: the gate of a gated MLP, the first projection of a plain one), the up projection of
a gated MLP, and the down projection. Adding an architecture is one row of :data:`LAYOUTS`. Matching is by type
(``isinstance``): the activation is an activation module (any class transformers' ``ACT2CLS`` builds, torch's own,
or an hf_stochact one), projections are ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2, weight stored [in, out]).
Modules holding only an activation under a known attribute match an activation-only row: the activation features
work there, the projection features (sparsify, shifts, CETT) skip them.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers.activations import ACT2CLS, ReLUSquaredActivation
from transformers.pytorch_utils import Conv1D


@dataclasses.dataclass(frozen=True)
class MLPLayout:
    """Attribute names of one MLP family.

    Args:
        name: a label (families that share it, e.g. "llama" covers Mistral, Qwen2/3, Gemma 1-3).
        activation: attribute holding the activation module.
        pre: the projection whose output the activation reads (gate, or first projection); None if unknown.
        up: the up projection of a gated MLP (its output multiplies the activation's).
        down: the projection reading the FFN hidden (after the activation, times up if gated).
        fused_gate_up: ``pre`` holds gate and up stacked ([gate; up] along its output), as in Phi-3.
    """

    name: str
    activation: str
    pre: str | None = None
    up: str | None = None
    down: str | None = None
    fused_gate_up: bool = False

    @property
    def gated(self) -> bool:
        return self.up is not None or self.fused_gate_up

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(n for n in (self.pre, self.up, self.down) if n is not None)


#: The MLP families, most specific first. The activation-only rows keep the activation features (schedule,
#: stochastic decoding, monitors) working on any architecture that names its FFN activation in one of these ways.
LAYOUTS: tuple[MLPLayout, ...] = (
    MLPLayout("llama", "act_fn", pre="gate_proj", up="up_proj", down="down_proj"),  # Llama, Mistral, Qwen, Gemma
    MLPLayout("phi3", "activation_fn", pre="gate_up_proj", down="down_proj", fused_gate_up=True),
    MLPLayout("mixtral-expert", "act_fn", pre="w1", up="w3", down="w2"),
    MLPLayout("t5-gated", "act", pre="wi_0", up="wi_1", down="wo"),
    MLPLayout("gpt2", "act", pre="c_fc", down="c_proj"),  # Conv1D
    MLPLayout("opt/phi", "activation_fn", pre="fc1", down="fc2"),  # OPT's decoder layer, Phi-1/2, CLIP, ...
    MLPLayout("gpt-neox/falcon", "act", pre="dense_h_to_4h", down="dense_4h_to_h"),
    MLPLayout("gpt-j", "act", pre="fc_in", down="fc_out"),
    MLPLayout("t5", "act", pre="wi", down="wo"),
    MLPLayout("distilbert", "activation", pre="lin1", down="lin2"),
    MLPLayout("bert", "intermediate_act_fn", pre="dense"),  # the down projection lives in the sibling BertOutput
    *(MLPLayout("activation-only", attr) for attr in ("act_fn", "act", "activation_fn")),
)

PROJECTION_TYPES = (nn.Linear, Conv1D)


def activation_classes() -> tuple[type, ...]:
    """Module classes counted as FFN activations: every class transformers' ``ACT2CLS`` builds (hf_stochact's are
    registered there), plus torch's common ones."""
    classes = {nn.ReLU, nn.SiLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Identity}
    for value in ACT2CLS.values():
        cls = value[0] if isinstance(value, tuple) else getattr(value, "func", value)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            classes.add(cls)
    classes.discard(nn.Identity)  # an Identity under act_fn is a placeholder, not an activation
    return tuple(classes)


def relu_kind(module: nn.Module) -> int | None:
    """0 for ReLU, 1 for ReLU², None for anything else (the activations whose zeros a sparse FFN can skip)."""
    if isinstance(module, ReLUSquaredActivation):
        return 1
    if isinstance(module, nn.ReLU):
        return 0
    return None


def _unwrap(layer: nn.Module) -> nn.Module:
    """A module standing in for a projection (e.g. sparsify's down-projection wrapper) exposes it as ``wrapped``."""
    return layer if isinstance(layer, PROJECTION_TYPES) else getattr(layer, "wrapped", layer)


def is_projection(layer: nn.Module | None) -> bool:
    return layer is not None and isinstance(_unwrap(layer), PROJECTION_TYPES)


def param(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` for a registered parameter (or None), without ``nn.Module.__getattr__``'s cost."""
    params = module._parameters
    return params[name] if name in params else getattr(module, name, None)


def linear_weight(layer: nn.Module) -> torch.Tensor:
    """The weight of an ``nn.Linear`` or ``Conv1D`` as [out, in] (a view for Conv1D)."""
    weight = param(layer, "weight")
    return weight.t() if isinstance(_unwrap(layer), Conv1D) else weight


def down_rows(layer: nn.Module) -> torch.Tensor:
    """The down projection's weight as [d_ff, d]: row i is neuron i's output direction (a view, no copy)."""
    weight = param(layer, "weight")
    return weight if isinstance(_unwrap(layer), Conv1D) else weight.t()


@dataclasses.dataclass(eq=False)
class MLP:
    """One FFN found in a model: its module (``parent`` of the activation), path and layout."""

    path: str
    module: nn.Module
    layout: MLPLayout

    def child(self, name: str | None) -> nn.Module | None:
        return None if name is None else self.module._modules.get(name)

    @property
    def activation(self) -> nn.Module:
        return self.module._modules[self.layout.activation]

    @property
    def activation_path(self) -> str:
        return f"{self.path}.{self.layout.activation}" if self.path else self.layout.activation

    def set_activation(self, module: nn.Module) -> None:
        setattr(self.module, self.layout.activation, module)

    @property
    def pre(self) -> nn.Module | None:
        return self.child(self.layout.pre)

    @property
    def up(self) -> nn.Module | None:
        return self.child(self.layout.up)

    @property
    def down(self) -> nn.Module | None:
        return self.child(self.layout.down)

    @property
    def width(self) -> int:
        """d_ff, the number of FFN neurons (needs ``pre`` or ``down``)."""
        if self.pre is not None:
            out = linear_weight(self.pre).shape[0]
            return out // 2 if self.layout.fused_gate_up else out
        return down_rows(self.down).shape[0]

    def gate_up(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(W_gate [d_ff, d], b_gate, W_up [d_ff, d], b_up) of a gated MLP (views of a fused gate_up_proj).

        On the hot path of sparsify's decode step: plain dict lookups, no ``nn.Module.__getattr__``."""
        layout, modules = self.layout, self.module._modules
        if not layout.gated:
            raise ValueError(f"{self.path} ({layout.name}) is not a gated MLP")
        pre = modules[layout.pre]
        w, b = linear_weight(pre), param(pre, "bias")
        if layout.fused_gate_up:
            half = w.shape[0] // 2
            return w[:half], None if b is None else b[:half], w[half:], None if b is None else b[half:]
        up = modules[layout.up]
        return w, b, linear_weight(up), param(up, "bias")

    def down_column_norms(self) -> torch.Tensor:
        """||W_down[:, i]|| per neuron i, float32 [d_ff]."""
        return down_rows(self.down).detach().float().norm(dim=1)


def _match(module: nn.Module, layout: MLPLayout, activations: tuple[type, ...]) -> bool:
    children = module._modules
    if not isinstance(children.get(layout.activation), activations):
        return False
    return all(is_projection(children.get(name)) for name in layout.projections)


def find_mlps(model: nn.Module, *, need: str = "activation") -> list[MLP]:
    """Every FFN of ``model`` (through any wrapper: DDP, FSDP, compile, sparsify), in module order.

    Args:
        need: ``"activation"`` (every FFN with a recognised activation), ``"pre"`` (also its input projection),
            ``"down"`` (also its down projection), ``"pre+down"`` (both).
    """
    allowed = ("activation", "pre", "down", "pre+down")
    if need not in allowed:
        raise ValueError(f"need must be one of {allowed}, got {need!r}")
    activations = activation_classes()
    found = []
    for path, module in model.named_modules():
        layout = next((lay for lay in LAYOUTS if _match(module, lay, activations)), None)
        if layout is None:
            continue
        if ("pre" in need and layout.pre is None) or ("down" in need and layout.down is None):
            continue
        found.append(MLP(path, module, layout))
    return found


def ffn_activations(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """The FFN activation modules of ``model``: ``(path, parent module, attribute, activation module)``."""
    return [(m.activation_path, m.module, m.layout.activation, m.activation) for m in find_mlps(model)]
