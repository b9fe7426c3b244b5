"""Moved to :mod:`hf_stochact.runtime.fast` (the decode runtimes live in ``runtime/``, above ``inference``'s sparse
layers); this name keeps working for one release."""

from __future__ import annotations

from typing import Any

_MOVED = ("fast_decode", "decode_path", "is_fast")


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import warnings

        from ..runtime import fast

        warnings.warn(f"hf_stochact.inference.fast.{name} moved to hf_stochact.runtime.fast.{name} (or "
                      f"hf_stochact.{name})", DeprecationWarning, stacklevel=2)
        return getattr(fast, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
