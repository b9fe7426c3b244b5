"""Measuring FFN activation sparsity and perplexity.

``SparsityMonitor`` hooks the FFN activation modules of a model (found by :func:`~hf_stochact.layouts.find_mlps`)
and counts the
exact zeros of their outputs. In a gated MLP (``down(act(gate(x)) * up(x))``) a zero activation output is a zero
hidden element whose row of ``up`` and column of ``down`` a sparse kernel may skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..layouts import down_rows, find_mlps


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
        self._calls: dict[str, int] = {}
        if not find_mlps(model):
            raise ValueError(f"{type(model).__name__} has no FFN activation module to monitor")

    def _hook(self, path: str):
        def hook(module, inputs, output):
            # sample per layer: the k-th call of every layer is counted when k % every == 0, so a sampled forward
            # counts all layers (a global call counter would sample a band of layers if the count per forward
            # differs from the number of modules, e.g. a layer called twice)
            calls = self._calls.get(path, 0)
            self._calls[path] = calls + 1
            if not isinstance(output, torch.Tensor) or calls % self.every:
                return
            with torch.no_grad():
                self.stats.zeros[path] = self.stats.zeros.get(path, 0) + int((output == 0).sum())
                self.stats.total[path] = self.stats.total.get(path, 0) + output.numel()

        return hook

    def attach(self) -> SparsityMonitor:
        """Hook the model's current FFN activation modules (again after a swap: detach first). Idempotent."""
        if self._handles:
            return self
        self._handles = [mlp.activation.register_forward_hook(self._hook(mlp.activation_path))
                         for mlp in find_mlps(self.model)]
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
def perplexity(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> tuple[float, dict[str, float]]:
    """(perplexity over the token ``windows`` [N, T], per-layer exact-zero FFN sparsity), in eval mode."""
    import math

    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        with SparsityMonitor(model) as monitor:
            for w in tqdm(windows, desc="perplexity", disable=not progress, leave=False):
                w = w.to(device)
                out = model(input_ids=w[None], labels=w[None])
                nll += float(out.loss) * (len(w) - 1)
                count += len(w) - 1
    finally:
        model.train(was_training)
    return math.exp(nll / count), monitor.stats.per_layer()


@torch.no_grad()
def measure_sparsity(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, **forward_kwargs) -> SparsityStats:
    """Exact-zero sparsity of FFN activations over ``input_ids`` ([N, T]) in the model's current mode."""
    with SparsityMonitor(model) as monitor:
        for i in range(0, len(input_ids), batch_size):
            model(input_ids=input_ids[i:i + batch_size], **forward_kwargs)
    return monitor.stats


# ----------------------------------------------------------------------------------------------------------------
# ReLU² Wins-style analysis: magnitude sparsity, CETT, reuse of active neurons across consecutive tokens


def _down_projections(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, down projection) of every FFN: the layer that consumes the FFN hidden."""
    return [(f"{m.path}.{m.layout.down}" if m.path else m.layout.down, m.down) for m in find_mlps(model, need="down")]


@torch.no_grad()
def collect_hidden(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """FFN hidden vectors (inputs of every down projection) over ``input_ids`` [N, T]: {path: [N*T, d_ff]}."""
    downs = _down_projections(model)
    if not downs:
        raise ValueError(f"{type(model).__name__}: no FFN down projection found")
    store: dict[str, list[torch.Tensor]] = {p: [] for p, _ in downs}
    handles = [m.register_forward_pre_hook(lambda mod, args, p=p: store[p].append(args[0].reshape(
        -1, args[0].shape[-1]).float())) for p, m in downs]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(input_ids), batch_size):
            model(input_ids=input_ids[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {p: torch.cat(v) for p, v in store.items()}


def cett(h: torch.Tensor, w_down: torch.Tensor, eps: float) -> float:
    """Mean over tokens of CETT(eps) = ||sum_{i: |h_i| ||w_i|| < eps} h_i w_i|| / ||sum_i h_i w_i||.

    h: [T, d_ff] hidden vectors; w_down: [d_ff, d] (row i = output direction of neuron i).
    """
    norms = w_down.norm(dim=1)
    tail = (h.abs() * norms) < eps
    full = h @ w_down
    dropped = (h * tail) @ w_down
    return float((dropped.norm(dim=1) / full.norm(dim=1).clamp_min(1e-12)).mean())


def cett_threshold(h: torch.Tensor, w_down: torch.Tensor, target: float, iters: int = 40) -> float:
    """The eps at which :func:`cett` reaches ``target`` (binary search; CETT grows monotonically with eps)."""
    if not 0.0 < target < 1.0:
        raise ValueError(f"target CETT must be in (0, 1), got {target}")
    lo, hi = 0.0, float((h.abs() * w_down.norm(dim=1)).max()) + 1e-6
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cett(h, w_down, mid) < target else (lo, mid)
    return lo


def union_active(active: torch.Tensor, window: int) -> float:
    """Mean fraction of neurons active in at least one of ``window`` consecutive tokens (active: [T, d_ff] bool)."""
    t = active.shape[0] // window * window
    if t == 0:
        raise ValueError(f"need at least window={window} tokens, got {active.shape[0]}")
    return float(active[:t].view(-1, window, active.shape[1]).any(1).float().mean())


@torch.no_grad()
def sparsity_report(model: nn.Module, input_ids: torch.Tensor, target_cett: float = 0.2,
                    thresholds: tuple[float, ...] = (1e-3, 1e-2, 0.05, 0.1),
                    windows: tuple[int, ...] = (1, 4, 16, 64)) -> dict[str, dict]:
    """Per FFN layer: exact zeros, |h| below each threshold, the CETT-calibrated threshold and its sparsity, and the
    union of active neurons (exact non-zeros, and CETT-active) over windows of consecutive tokens.

    ``input_ids``: [N, T] token windows (the union is taken within each window of T tokens).
    """
    hidden = collect_hidden(model, input_ids)
    downs = dict(_down_projections(model))
    n_seq, seq_len = input_ids.shape
    report = {}
    for path, h in hidden.items():
        w = down_rows(downs[path]).detach().float()
        eps = cett_threshold(h, w, target_cett)
        cett_active = (h.abs() * w.norm(dim=1)) >= eps
        nonzero = h != 0
        per_seq = lambda a: a.view(n_seq, seq_len, -1)  # noqa: E731
        report[path] = {
            "exact_zero": float((~nonzero).float().mean()),
            **{f"abs<{t:g}": float((h.abs() < t).float().mean()) for t in thresholds},
            "cett_eps": eps,
            "cett_sparsity": float((~cett_active).float().mean()),
            **{f"union_nonzero@{n}": sum(union_active(a, n) for a in per_seq(nonzero)) / n_seq for n in windows
               if n <= seq_len},
            **{f"union_cett@{n}": sum(union_active(a, n) for a in per_seq(cett_active)) / n_seq for n in windows
               if n <= seq_len},
        }
    return report
