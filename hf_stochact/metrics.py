"""Measuring FFN activation sparsity.

``SparsityMonitor`` hooks the FFN activation modules of a model (found by :func:`ffn_activations`) and counts the
exact zeros of their outputs. In a gated MLP (``down(act(gate(x)) * up(x))``) a zero activation output is a zero
hidden element whose row of ``up`` and column of ``down`` a sparse kernel may skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import ffn_activations


@dataclass
class SparsityStats:
    """Per-layer counts of exact zeros in FFN activation outputs."""

    zeros: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)

    def per_layer(self) -> dict[str, float]:
        return {k: self.zeros[k] / self.total[k] for k in self.total if self.total[k]}

    @property
    def overall(self) -> float:
        """Fraction of exact zeros over every FFN hidden element seen (NaN if nothing was seen)."""
        total = sum(self.total.values())
        return sum(self.zeros.values()) / total if total else float("nan")

    def reset(self) -> None:
        self.zeros.clear()
        self.total.clear()


class SparsityMonitor:
    """Context manager counting exact zeros in every FFN activation output while it is active.

    >>> with SparsityMonitor(model) as mon:
    ...     model(input_ids)
    >>> mon.stats.overall

    ``every`` > 1 samples one forward in ``every`` (a cheap running estimate during training).

    Raises:
        ValueError: if the model has no FFN activation module.
    """

    def __init__(self, model: nn.Module, every: int = 1):
        self.model = model
        self.every = max(1, int(every))
        self.stats = SparsityStats()
        self._handles: list = []
        self._calls = 0
        if not ffn_activations(model):
            raise ValueError(f"{type(model).__name__} has no FFN activation module to monitor")

    def _hook(self, path: str):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor) or (self._calls // self._n) % self.every:
                self._calls += 1
                return
            self._calls += 1
            with torch.no_grad():
                self.stats.zeros[path] = self.stats.zeros.get(path, 0) + int((output == 0).sum())
                self.stats.total[path] = self.stats.total.get(path, 0) + output.numel()

        return hook

    def attach(self) -> SparsityMonitor:
        found = ffn_activations(self.model)
        self._n = len(found)
        self._handles = [module.register_forward_hook(self._hook(path)) for path, _, _, module in found]
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> SparsityMonitor:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()


@torch.no_grad()
def measure_sparsity(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, **forward_kwargs) -> SparsityStats:
    """Exact-zero sparsity of FFN activations over ``input_ids`` ([N, T]) in the model's current mode."""
    with SparsityMonitor(model) as monitor:
        for i in range(0, len(input_ids), batch_size):
            model(input_ids=input_ids[i:i + batch_size], **forward_kwargs)
    return monitor.stats
