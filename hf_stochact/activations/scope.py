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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from typing import Any

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
