"""Loading a causal LM and its tokenizer from a local folder or a GGUF file (no hub access needed).

:func:`resolve_model` checks what the user named *before* anything is loaded (folder exists and holds a model and
a tokenizer; GGUF file exists and starts with the GGUF magic bytes) and accepts ``--gguf FILE`` alone (the file's
folder is the model folder). Errors are :class:`~hf_stochact.cli.args.UsageError` naming the flag.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..integration.serializable import make_serializable
from .args import UsageError

GGUF_MAGIC = b"GGUF"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_model(model: str, gguf: str = "", *, model_flag: str = "--model", gguf_flag: str = "--gguf",
                  required: bool = True) -> tuple[str, str]:
    """(folder, GGUF file name or "") for what the user named; ("", "") when nothing was named and not required.

    ``gguf`` may be a file name inside ``model`` or a path (then ``model`` may be empty).

    Raises:
        UsageError: nothing named (when required), a missing folder/file, a folder without ``config.json`` or
            tokenizer files, a file that is not GGUF.
    """
    if not model and not gguf:
        if required:
            raise UsageError(model_flag, f"required: a model folder (config.json, weights and tokenizer files), or "
                                         f"{gguf_flag} FILE for a GGUF file")
        return "", ""
    if gguf:
        path = Path(model) / gguf if model and not Path(gguf).is_absolute() else Path(gguf)
        if not path.is_file():
            where = f" in {model}" if model and not Path(gguf).is_absolute() else ""
            raise UsageError(gguf_flag, f"no such GGUF file{where}: {path}")
        with path.open("rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise UsageError(gguf_flag, f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}): "
                                        "a corrupt or truncated download, or another format")
        return str(path.parent), path.name
    folder = Path(model)
    if not folder.is_dir():
        raise UsageError(model_flag, f"no such model folder: {folder}")
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: add {gguf_flag} {ggufs[0]}" if ggufs else ""
        raise UsageError(model_flag, f"{folder} is not a transformers model folder (no config.json){hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(model_flag, f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
                                     "tokenizer next to the model (tokenizer.save_pretrained)")
    return str(folder), ""


def load_tokenizer(model: str, gguf: str = "", command: str = "this command", *, model_flag: str = "--model",
                   gguf_flag: str = "--gguf"):
    """The tokenizer of the folder ``model`` or the GGUF file ``gguf`` (quick: check a prompt before loading the
    weights).

    Raises:
        UsageError: see :func:`resolve_model`, or the tokenizer could not be loaded.
    """
    from transformers import AutoTokenizer

    folder, gguf = resolve_model(model, gguf, model_flag=model_flag, gguf_flag=gguf_flag)
    with _loading(folder, gguf, command, model_flag, gguf_flag):
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **({"gguf_file": gguf} if gguf else {}))


def load_causal_lm(model: str, gguf: str = "", command: str = "this command", *, model_flag: str = "--model",
                   gguf_flag: str = "--gguf", tokenizer=None):
    """(tokenizer, float32 model) from the folder ``model``, or from the GGUF file ``gguf`` (in ``model`` or a path);
    ``tokenizer``: one already loaded by :func:`load_tokenizer`.

    GGUF weights are dequantized to plain float32 ``nn.Linear`` parameters on load, but transformers keeps the GGUF
    quantizer marker on the model, which makes ``Trainer`` refuse to fine-tune it and ``save_pretrained`` refuse to
    save it; :func:`hf_stochact.make_serializable` clears the marker.

    Raises:
        UsageError (a ``ValueError``): see :func:`resolve_model`, or the files could not be loaded (the message
            names ``command``, the flag and the reason).
    """
    from transformers import AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = load_tokenizer(model, gguf, command, model_flag=model_flag, gguf_flag=gguf_flag)
    folder, gguf = resolve_model(model, gguf, model_flag=model_flag, gguf_flag=gguf_flag)
    kwargs = {"gguf_file": gguf} if gguf else {}
    flag = gguf_flag if gguf else model_flag
    source = f"{folder}/{gguf}" if gguf else folder
    with _loading(folder, gguf, command, model_flag, gguf_flag):
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True, **kwargs)
    if gguf:
        if not all(p.dtype == torch.float32 for p in lm.parameters()):
            raise UsageError(flag, f"{source}: expected dequantized float32 weights")
        make_serializable(lm)
    return tokenizer, lm


@contextlib.contextmanager
def _loading(folder: str, gguf: str, command: str, model_flag: str, gguf_flag: str):
    """Any failure to load the files becomes one :class:`UsageError` line naming the flag."""
    try:
        yield
    except (UsageError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - any loading failure becomes one clear line
        source = f"{folder}/{gguf}" if gguf else folder
        first = str(error).strip().splitlines()
        raise UsageError(gguf_flag if gguf else model_flag, f"{command} could not load {source}: "
                                                            f"{type(error).__name__}{': ' + first[0] if first else ''}"
                         ) from error
