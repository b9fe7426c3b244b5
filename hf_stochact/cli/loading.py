"""Loading a causal LM and its tokenizer from what ``from_pretrained`` accepts: a local folder, a Hugging Face Hub
id (``HuggingFaceTB/SmolLM2-135M-Instruct``, from the local cache when offline), or a GGUF file in either.

:func:`resolve_model` checks what the user named *before* anything is loaded (folder exists and holds a model and
a tokenizer; GGUF file exists and starts with the GGUF magic bytes; a hub id is in the cache or answers one quick
request) and accepts ``--gguf FILE`` alone (the file's folder is the model folder). Errors are
:class:`~hf_stochact.cli.args.UsageError` naming the flag.
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
    """(folder or hub id, GGUF file name or "") for what the user named; ("", "") when nothing was named and not
    required.

    ``model`` is a folder or a hub id (anything ``from_pretrained`` accepts); ``gguf`` a file name inside ``model``
    (on the hub too) or a path (then ``model`` may be empty). A name that is not a folder is looked up on the hub
    only if it is a valid repo id (``NAME`` or ``USER/NAME``) and not under an existing local folder: a mistyped
    path fails at once, without a network wait; the lookup is the local cache, else one request without retries
    (``HF_HUB_ETAG_TIMEOUT`` seconds at most, default 10).

    Raises:
        UsageError: nothing named (when required), a missing folder/file, a folder without ``config.json`` or
            tokenizer files, a file that is not GGUF, a hub id that cannot be resolved (offline and not cached,
            unknown, gated, no such file in the repo).
    """
    if not model and not gguf:
        if required:
            raise UsageError(model_flag, f"required: a model folder (config.json, weights and tokenizer files), a "
                                         f"Hugging Face Hub id (USER/NAME), or {gguf_flag} FILE for a GGUF file")
        return "", ""
    if hub_model_id(model, gguf):
        _check_hub_file(model, gguf or "config.json", gguf_flag if gguf else model_flag)
        return model, gguf
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
    if folder.is_file():
        hint = f": pass it as {gguf_flag} {model}" if folder.suffix.lower() == ".gguf" else ""
        raise UsageError(model_flag, f"{folder} is a file, not a model folder or hub id{hint}")
    if not folder.is_dir():
        raise UsageError(model_flag, f"no such model folder: {model} (and not a Hugging Face Hub id: "
                                     f"{_why_not_hub_id(model)})")
    if not (folder / "config.json").is_file():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        hint = f"; it holds {', '.join(ggufs)}: add {gguf_flag} {ggufs[0]}" if ggufs else ""
        raise UsageError(model_flag, f"{folder} is not a transformers model folder (no config.json){hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UsageError(model_flag, f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the "
                                     "tokenizer next to the model (tokenizer.save_pretrained)")
    return str(folder), ""


def hub_model_id(model: str, gguf: str = "") -> str | None:
    """``model`` where it names a Hugging Face Hub repo rather than a local folder (see :func:`resolve_model`)."""
    if model and not Path(model).is_dir() and not (gguf and Path(gguf).is_absolute()) and \
            _why_not_hub_id(model) is None:
        return model
    return None


def _why_not_hub_id(name: str) -> str | None:
    """Why ``name`` is not looked up on the hub (None: it is a repo id to look up)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return "USER/NAME of letters, digits, '-', '_', '.'"
    parent = Path(name).parent
    if parent != Path(".") and parent.is_dir():
        return f"{str(parent)!r} is a local folder, so this is a path"
    return None


def _check_hub_file(repo: str, filename: str, flag: str) -> None:
    """``filename`` of the hub repo ``repo`` is in the local cache, or the hub says it exists (one request, no
    retries). Raises :class:`UsageError` naming ``flag`` with what to do."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url, is_offline_mode, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RemoteEntryNotFoundError, RepositoryNotFoundError

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return
    head = f"could not load {repo!r}: not a folder, and"
    if is_offline_mode():
        raise UsageError(flag, f"{head} not in the Hugging Face cache while offline (HF_HUB_OFFLINE is set): "
                               "download it once online, or name a local folder")
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename))
    except GatedRepoError as error:
        raise UsageError(flag, f"{head} {repo!r} is gated on the Hugging Face Hub: accept its terms on its page and "
                               "log in (`hf auth login`)") from error
    except RepositoryNotFoundError as error:
        raise UsageError(flag, f"{head} the Hugging Face Hub has no model {repo!r} (a private one needs "
                               "`hf auth login`)") from error
    except RemoteEntryNotFoundError as error:
        hint = "" if filename.endswith(".gguf") else " (not a transformers model; for a GGUF repo add --gguf FILE)"
        raise UsageError(flag, f"{head} the hub repo {repo!r} has no file {filename!r}{hint}") from error
    except Exception as error:  # noqa: BLE001 - network failures come as httpx, OSError, hub errors, ...
        raise UsageError(flag, f"{head} the Hugging Face Hub is unreachable (offline?): {type(error).__name__}: "
                               f"{_first_line(error)}; name a local folder, or set HF_HUB_OFFLINE=1 to use "
                               "the cache") from error


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""


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
        return AutoTokenizer.from_pretrained(folder, local_files_only=_local(folder),
                                             **({"gguf_file": gguf} if gguf else {}))


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
        lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=_local(folder),
                                                  **kwargs)
    if gguf:
        if not all(p.dtype == torch.float32 for p in lm.parameters()):
            raise UsageError(flag, f"{source}: expected dequantized float32 weights")
        make_serializable(lm)
    return tokenizer, lm


def _local(folder: str) -> bool:
    return Path(folder).is_dir()


def source_dtype(model: str, gguf: str = "") -> torch.dtype:
    """The dtype the weights of ``model`` / ``gguf`` are stored in: the config's ``dtype`` where it names a
    floating-point dtype, float32 for GGUF files (dequantized on load) and configs that do not say."""
    if gguf:
        return torch.float32
    from transformers import AutoConfig

    folder, _ = resolve_model(model)
    config = AutoConfig.from_pretrained(folder, local_files_only=_local(folder))
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


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
