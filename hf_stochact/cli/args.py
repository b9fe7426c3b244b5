"""Command-line options declared once, on the commands' config dataclasses: ``option(default, help, check)``.

:func:`add_arguments` turns a config class into argparse flags (with their help text and default); after parsing,
:func:`validate` runs every field's check and the config's own ``check()`` (cross-field rules, model paths) before
any model is loaded. A failed check raises :class:`UsageError` naming the flag; ``hf-stochact`` reports it as
``hf-stochact <command>: error: --flag: ...`` with exit status 2 (argparse's convention), never as a traceback;
a :class:`UsageWarning` (a value that runs, but probably not as meant) as ``hf-stochact <command>: warning: ...``.
:func:`read_config_file` reads the same options from a YAML or JSON file (``--config``), HfArgumentParser-style.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


class UsageError(ValueError):
    """A bad command-line value: ``flag`` is the option as typed (``--p``), ``message`` what is wrong with it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


class UsageWarning(UserWarning):
    """A value that runs, but probably not as the user meant: ``hf-stochact`` prints it as one line."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


Check = Callable[[Any], "str | None"]  # returns an error message, or None when the value is fine


def option(default: Any, help: str, check: Check | None = None, flag: bool = False) -> Any:
    """A config field that is also a command-line option. ``flag=True`` makes a ``--x/--no-x`` switch (with
    ``default=None`` meaning "decide automatically")."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check, "flag": flag})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


# ---- checks -----------------------------------------------------------------------------------------------------

def probability(value: float) -> str | None:
    return None if 0.0 <= value <= 1.0 and not math.isnan(value) else f"must be in [0, 1], got {value}"


def fraction_below_one(value: float) -> str | None:
    return None if 0.0 <= value < 1.0 else f"must be in [0, 1), got {value}"


def positive(value: float) -> str | None:
    return None if value > 0 else f"must be > 0, got {value}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be >= 0, got {value}"


def at_least(low: float) -> Check:
    return lambda value: None if value >= low else f"must be >= {low}, got {value}"


def in_range(low: float, high: float) -> Check:
    return lambda value: None if low <= value <= high else f"must be in [{low}, {high}], got {value}"


def one_of(*allowed: str) -> Check:
    return lambda value: None if value in allowed else f"must be one of {', '.join(allowed)}, got {value!r}"


#: A seed every random generator a run seeds accepts (numpy's is the narrowest: [0, 2**32 - 1]).
seed_range = in_range(0, 2**32 - 1)


def comma_list(item: Check, convert: Callable[[str], Any] = float) -> Check:
    def check(value: str) -> str | None:
        try:
            items = [convert(v) for v in value.split(",")]
        except ValueError:
            return f"must be a comma-separated list, got {value!r}"
        for v in items:
            error = _not_finite(v) or item(v)
            if error:
                return f"item {v}: {error}"
        return None

    return check


def shape_list(value: str) -> str | None:
    for shape in value.split(","):
        parts = shape.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            return f"must be comma-separated shapes like 576x1536, got {shape!r}"
    return None


def output_folder(value: str) -> str | None:
    """A folder the command may write into: missing (it is created), or an existing folder; never a file, and
    inside a folder this user can write to."""
    if not value:
        return "must name a folder"
    path = Path(value)
    if path.exists() and not path.is_dir():
        return f"{value!r} is a file, not a folder: name a folder (it is created if missing)"
    return _writable_ancestor(path, value)


def output_file(create_folder: bool) -> Check:
    """A file (or ``<path>.json``/``.png`` prefix) the command writes at the end: not a folder; its folder exists
    (or, with ``create_folder``, can be created) and is writable. Empty = no output, fine."""

    def check(value: str) -> str | None:
        if not value:
            return None
        path = Path(value)
        if path.is_dir():
            return f"{value!r} is a folder: name a file in it"
        if not create_folder and not path.parent.is_dir():
            return f"no folder {str(path.parent)!r} to write {path.name!r} into: create it first (mkdir -p " \
                   f"{path.parent}) or name a file in an existing folder"
        return _writable_ancestor(path.parent, value)

    return check


def _writable_ancestor(path: Path, value: str) -> str | None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        return f"{str(existing)!r} is a file, so {value!r} cannot be written"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"no permission to write in {str(existing)!r}"
    return None


def _not_finite(value: Any) -> str | None:
    return f"must be a finite number, got {value}" if isinstance(value, float) and not math.isfinite(value) else None


def _not_utf8(value: Any) -> str | None:
    """Arguments that are not valid UTF-8 reach Python as lone surrogates (surrogateescape); nothing downstream
    (tokenizers, JSON reports, model cards) can encode them."""
    if not isinstance(value, str):
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        char = ord(value[error.start])
        byte = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        return f"is not valid UTF-8 text ({byte} at position {error.start}): pass UTF-8 text (check the " \
               "terminal's or the file's encoding)"
    return None


# ---- argparse glue ----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the config dataclass ``cls``, with its help text and default (appended unless the help
    text already says what the default is)."""
    for f in dataclasses.fields(cls):
        meta = f.metadata
        help_text = meta.get("help", "")
        says_default = "default" in help_text.lower()
        if meta.get("flag") or isinstance(f.default, bool):
            parser.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text + ("" if f.default is None or says_default
                                                  else f" (default: {f.default})"))
        else:
            parser.add_argument(flag_name(f.name), type=type(f.default), default=f.default, metavar=_metavar(f),
                                help=help_text + ("" if says_default else f" (default: {f.default!r})"))


def _metavar(f: dataclasses.Field) -> str:
    return {int: "N", float: "X", str: "TEXT"}.get(type(f.default), "VALUE")


def validate(cfg: Any) -> None:
    """Run the checks every field gets (a float is finite, text is valid UTF-8), every field's own check, then
    ``cfg.check()`` if the config has one.

    Raises:
        UsageError: the first bad value, naming its flag.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        check = f.metadata.get("check")
        error = _not_finite(value) or _not_utf8(value) or (check(value) if check is not None else None)
        if error:
            raise UsageError(flag_name(f.name), error)
    own = getattr(cfg, "check", None)
    if callable(own):
        own()


# ---- --config FILE ----------------------------------------------------------------------------------------------

CONFIG_HELP = "read options from a YAML (.yaml/.yml) or JSON file whose keys are this command's option names " \
              "(text_column or text-column); flags on the command line override it"


def read_config_file(path: str, cls: type) -> dict[str, Any]:
    """The options in the YAML/JSON file ``path`` for the config dataclass ``cls``, as ``{field name: value}``.

    Keys are option names (``text_column``, ``text-column`` or ``--text-column``); values are converted to the
    option's type as the flag's text would be (an int for an int option; a number for a float; true/false for a
    switch, or null for an automatic one; text, a number or a list, joined with commas, for a text option). The
    values' own checks run later, in :func:`validate`, as for flags.

    Raises:
        UsageError: naming ``--config``: no such file, not YAML/JSON, not a mapping, an unknown key (the known ones
            are listed), a value of the wrong kind.
    """
    file = Path(path)
    if file.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UsageError("--config", f"{path!r}: name a .yaml, .yml or .json file")
    if not file.is_file():
        raise UsageError("--config", f"no such file: {path!r}")
    try:
        text = file.read_text(encoding="utf-8")
        if file.suffix.lower() == ".json":
            import json

            content = json.loads(text)
        else:
            import yaml

            content = yaml.safe_load(text)
    except Exception as error:  # noqa: BLE001 - json/yaml/decoding errors: one line naming the file
        first = str(error).strip().splitlines()
        raise UsageError("--config", f"{path}: not valid {file.suffix[1:].upper()}: {type(error).__name__}"
                                     f"{': ' + first[0] if first else ''}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise UsageError("--config", f"{path}: must hold a mapping of option names to values, got a "
                                     f"{type(content).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in content.items():
        name = str(key).lstrip("-").replace("-", "_")
        if name not in fields:
            if name in ("compute_environment", "distributed_type", "num_processes"):
                raise UsageError("--config", f"{path} is an accelerate config (key {key!r}), not this command's "
                                             f"options: run `accelerate launch --config_file {path} -m "
                                             "hf_stochact.cli ...`")
            raise UsageError("--config", f"{path}: unknown key {key!r}; the options are: {', '.join(fields)}")
        error = _config_value(fields[name], value)
        if isinstance(error, str):
            raise UsageError("--config", f"{path}: {key}: {error}")
        values[name] = error[0]
    return values


def _config_value(f: dataclasses.Field, value: Any) -> tuple[Any] | str:
    """(the value converted to the option's type,) or an error message."""
    kind = type(f.default)
    if f.metadata.get("flag") or kind is bool:
        if isinstance(value, bool) or (value is None and f.default is None):
            return (value,)
        return f"must be true or false{' or null (automatic)' if f.default is None else ''}, got {value!r}"
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return (value,)
        return f"must be a whole number, got {value!r}"
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return (float(value),)
        return f"must be a number, got {value!r}"
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in value):
        return (",".join(str(v) for v in value),)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return (str(value),)
    return f"must be text, got {value!r}"
