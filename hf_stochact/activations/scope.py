"""Per-call decoding state: which FFN activation modules draw at random in the current call, and what they draw.

``generate(..., stochastic_activation=True)`` sets it in the thread that runs the call, for the call's duration;
activation modules read it at every forward (:func:`draw_for`). Nothing on the modules changes, so a plain
``generate`` in another thread on the same model (a server with concurrent requests) sees no state, overlapping
stochastic calls in different threads never see each other's, and the model is exactly as it was afterwards.

The state is keyed by module (``id``), so it is scoped to the model being decoded: an assistant model or any other
model running in the same thread keeps its own behaviour.

Why a thread-local and not a ``ContextVar``: Dynamo cannot trace ``ContextVar.get`` (a graph break, and an error
under ``fullgraph=True``), while it reads attributes of a ``threading.local`` and installs guards on them. A compiled
model then holds one graph for plain calls and one per distinct draw, and the guards, evaluated in the calling
thread at every call, pick the right one: the per-call decision reaches compiled graphs (as the operator's ``p``
argument) without a Python hook that compiled code would skip. ``generate`` is synchronous, so its thread is its
scope (asyncio servers run it in worker threads; a ``TextIteratorStreamer`` consumer only reads tokens).

Per-row draws (:func:`row_generators`, used by :func:`hf_stochact.analysis.uncertainty.uncertainty`): within such a
block every drawing activation takes one seed per batch row from that row's own generator and draws the row as a
batch of one (:func:`draw_seeded`), so a row's masks do not depend on which other rows share its forward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .. import kernels

_STATE = threading.local()


def draw_for(module: object) -> Any | None:
    """What ``module`` draws in the current call of this thread, or None (its ordinary forward)."""
    draws = getattr(_STATE, "draws", None)
    return None if draws is None else draws.get(id(module))


def current() -> Mapping[int, Any] | None:
    """The draws in force in this thread (module id -> draw), or None outside stochastic decoding."""
    return getattr(_STATE, "draws", None)


@contextlib.contextmanager
def active(draws: Mapping[int, Any]) -> Iterator[None]:
    """Within the block, in this thread, the modules named in ``draws`` draw as given (on top of any outer block)."""
    previous = getattr(_STATE, "draws", None)
    _STATE.draws = {**previous, **draws} if previous else dict(draws)
    try:
        yield
    finally:
        if previous is None:
            del _STATE.draws  # back to "no attribute": one guard state for plain calls under torch.compile
        else:
            _STATE.draws = previous


@contextlib.contextmanager
def suspended() -> Iterator[None]:
    """Within the block, in this thread, no module draws (e.g. while a runtime probes modules in the middle of a
    stochastic call)."""
    saved = {k: _STATE.__dict__.pop(k) for k in ("draws", "rows") if k in _STATE.__dict__}
    try:
        yield
    finally:
        _STATE.__dict__.update(saved)


@contextlib.contextmanager
def row_generators(generators: list[torch.Generator]) -> Iterator[None]:
    """Within the block, in this thread, row ``b`` of every drawing activation's input takes its seeds from
    ``generators[b]``: a row draws exactly what a batch of one with that generator would draw."""
    previous = getattr(_STATE, "rows", None)
    _STATE.rows = list(generators)
    try:
        yield
    finally:
        if previous is None:
            del _STATE.rows
        else:
            _STATE.rows = previous


def draw_seeded(draw: Callable[..., torch.Tensor], x: torch.Tensor, *more: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``draw(seed, x, *more)`` with a seed from torch's RNG (or ``generator``); inside :func:`row_generators`,
    once per batch row (dimension 0 of ``x`` and ``more``) with a seed from that row's generator, concatenated.

    Raises:
        ValueError: inside :func:`row_generators`, ``x`` has not one row per generator (an activation that sees
            tokens flattened across the batch, e.g. routed experts): use one row per forward there.
    """
    rows = getattr(_STATE, "rows", None)
    if rows is None:
        return draw(kernels.new_seed(x.device, generator), x, *more)
    if len(rows) == 1:
        return draw(kernels.new_seed(x.device, rows[0]), x, *more)
    if x.dim() == 0 or x.shape[0] != len(rows):
        raise ValueError(f"per-row draws for {len(rows)} rows, but an FFN activation got input of shape "
                         f"{tuple(x.shape)} (not one row per sample): run one sample per forward (batch_size=1)")
    return torch.cat([draw(kernels.new_seed(x.device, g), x[b:b + 1], *(t[b:b + 1] for t in more))
                      for b, g in enumerate(rows)])
