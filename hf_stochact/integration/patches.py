"""The mechanics behind :func:`~hf_stochact.install` / :func:`~hf_stochact.uninstall`: reversible patches and
post-import hooks.

* :func:`set_attribute` / :func:`set_item` change an attribute or a table entry and push the closure that undoes it;
  :func:`undo_all` runs them newest first (the value that was there before comes back; an entry that was absent
  is removed).
* :func:`when_imported` runs a patch once a module has been imported: at once if it already is, otherwise right
  after the module's code has run (a finder at the front of ``sys.meta_path`` that only answers for the modules it
  waits for, and only once each). ``import hf_stochact`` thus does not import transformers' modeling, generation
  and Trainer code (a second or more) for a process that never uses them, and every patch is in place before the
  first class of that module can be used.
"""

from __future__ import annotations

import importlib.abc
import sys
from collections.abc import Callable, MutableMapping
from typing import Any

_MISSING = object()
_UNDO: list[Callable[[], None]] = []


def set_attribute(owner: Any, name: str, value: Any) -> None:
    """``setattr(owner, name, value)``, undone by :func:`undo_all` (a class gets back its own attribute, or none)."""
    namespace = vars(owner) if isinstance(owner, type) else None
    previous = namespace.get(name, _MISSING) if namespace is not None else getattr(owner, name, _MISSING)
    setattr(owner, name, value)

    def undo() -> None:
        if previous is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)

    _UNDO.append(undo)


def set_item(table: MutableMapping, key: Any, value: Any) -> None:
    """``table[key] = value`` in place, undone by :func:`undo_all`. The stored value is read with ``dict.get``,
    so tables that build their values on lookup (transformers' ``ACT2FN``) give back what they hold."""
    previous = dict.get(table, key, _MISSING) if isinstance(table, dict) else table.get(key, _MISSING)
    table[key] = value

    def undo() -> None:
        if previous is _MISSING:
            table.pop(key, None)
        else:
            table[key] = previous

    _UNDO.append(undo)


def undo_all() -> int:
    """Undo every patch, newest first, and forget the post-import hooks not run yet. Returns the number undone."""
    _AFTER_IMPORT.pending.clear()
    if _AFTER_IMPORT in sys.meta_path:
        sys.meta_path.remove(_AFTER_IMPORT)
    count = len(_UNDO)
    while _UNDO:
        _UNDO.pop()()
    return count


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a module it waits for, it asks the other finders for the spec and makes that spec's
    loader run the hooks once the module's code has run."""

    def __init__(self) -> None:
        self.pending: dict[str, list[Callable[[], None]]] = {}

    def find_spec(self, fullname, path, target=None):
        hooks = self.pending.pop(fullname, None)
        if hooks is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is not self and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        if spec is None or isinstance(spec.loader, type) or not hasattr(spec.loader, "exec_module"):
            self.pending[fullname] = hooks  # nothing we can follow: try again on the next import attempt
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_then_patch(module):
            del loader.exec_module  # the loader (one per module file) is itself again
            exec_module(module)
            for hook in hooks:
                hook()

        loader.exec_module = exec_then_patch
        return spec


_AFTER_IMPORT = _AfterImport()


def when_imported(module: str, hook: Callable[[], None]) -> None:
    """Run ``hook()`` now if ``module`` is imported, else right after it is (once). A hook that raises makes that
    import raise (e.g. ``ImportError`` for a transformers release that moved what the patch needs)."""
    if module in sys.modules:
        hook()
        return
    _AFTER_IMPORT.pending.setdefault(module, []).append(hook)
    if _AFTER_IMPORT not in sys.meta_path:
        sys.meta_path.insert(0, _AFTER_IMPORT)
