"""Callback order: hf_stochact's callbacks log metrics in ``on_log``; the reporting integrations (TensorBoard,
W&B, ...) only see metrics added by callbacks that run before them, and the Trainer puts them before user
callbacks. :func:`install` makes ``CallbackHandler.add_callback`` (which the Trainer uses for every callback,
at construction and in ``trainer.add_callback``) keep callbacks flagged ``log_before_integrations`` at the front,
in the order they were added. Nothing is reordered while the handler iterates.
"""

from __future__ import annotations

import functools

from . import patches

FLAG = "log_before_integrations"


def _front_first(callbacks: list) -> None:
    first = [c for c in callbacks if getattr(c, FLAG, False)]
    if first:
        callbacks[:] = first + [c for c in callbacks if not getattr(c, FLAG, False)]


def install() -> None:
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback, TrainerCallback

    original = CallbackHandler.add_callback
    if getattr(original, "_hf_stochact", False):
        return

    @functools.wraps(original)
    def add_callback(self, callback):
        original(self, callback)
        _front_first(self.callbacks)

    add_callback._hf_stochact = True
    patches.set_attribute(CallbackHandler, "add_callback", add_callback)

    # checked once here, so that a transformers release that changes how handlers are built fails loudly
    probe = type("_Probe", (TrainerCallback,), {FLAG: True})()
    handler = CallbackHandler([DefaultFlowCallback, probe], None, None, None, None)
    if not (isinstance(handler.callbacks, list) and handler.callbacks[0] is probe):
        raise ImportError("hf_stochact: transformers' CallbackHandler no longer builds its list through "
                          "add_callback; the schedule's metrics would not reach the reporting integrations")
