"""Training and evaluation text through 🤗 ``datasets``: one data path for ``relufy``, ``sparsity``, the demo and the
pre-training example.

* :func:`load_corpus` turns what the user names into a train split and a held-out split of text rows: local files
  (``.txt``/``.md``/``.py``/... one row per file; ``.json``/``.jsonl``; ``.parquet``; ``.csv``), a folder of them,
  a ``datasets`` name (where the hub is reachable), a ``Dataset``/``DatasetDict`` object, or the embedded default,
  CPython's own standard-library source (``"stdlib"``, built with ``Dataset.from_generator``, one row per file,
  held out by file exactly as the documented numbers were).
* :func:`token_blocks` tokenises with ``map(batched=True, num_proc=...)`` and packs the token stream into
  fixed-size blocks the way transformers' ``run_clm.py`` does (``labels = input_ids``; the model shifts them).
  Datasets read from files are cached and fingerprinted by ``datasets``: a second run with the same data, tokenizer
  and block size loads the processed blocks from the cache instead of tokenising again.

Errors are ``ValueError`` exceptions that name the argument (``data: ...``, ``eval_data: ...``,
``text_column: ...``) and, for local files, the file and line: an empty dataset or file, a text column that does not
exist (the columns found are listed) or holds something other than text, a line that is not JSON, text that is not
UTF-8, a binary file among text files, text shorter than one block. Folders are read recursively, following
symbolic links (each folder once).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import logging
import os
import sysconfig
from collections.abc import Iterator
from itertools import chain
from pathlib import Path
from typing import Any

import torch

#: The embedded default corpus.
STDLIB = "stdlib"
#: stdlib files always held out, so that results on them compare across runs (argparse.py is BASELINE.md's text).
HELD_OUT_FILES = ("argparse.py", "typing.py", "difflib.py")
_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "__pycache__"}
#: File suffix -> ``datasets`` builder. Anything else in a folder is plain text.
BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_SKIPPED_NAMES = {".DS_Store"}
#: Suffixes that make a missing ``source`` an error rather than a ``datasets`` name to try.
_LOCAL_SUFFIXES = {*BUILDERS, ".txt", ".py", ".md"}


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """All ``.py`` files of the standard library (tests, site-packages and IDLE excluded), sorted."""
    root = Path(root or stdlib_root())
    files = [p for p in root.rglob("*.py") if not (_EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))]
    if not files:
        raise FileNotFoundError(f"no Python source files under {root}")
    return sorted(files)


def _stdlib_rows(root: str) -> Iterator[dict[str, str]]:
    base = Path(root)
    for f in stdlib_files(base):
        # "\n\n" ends every file: the packed stream is the files joined by a blank line, as before datasets
        yield {"text": f.read_text(encoding="utf-8", errors="replace") + "\n\n", "path": str(f.relative_to(base))}


def held_out_by_file(path: str, held_out_fraction: float) -> bool:
    """The stdlib split: the pinned ``HELD_OUT_FILES`` (top level) plus a hash-chosen fraction of the files."""
    name = Path(path).name
    digest = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return (name in HELD_OUT_FILES and "/" not in path) or digest < held_out_fraction


def stdlib_dataset():
    """CPython's standard-library source as a ``Dataset`` (columns ``text``, ``path``; one row per file), built with
    ``Dataset.from_generator`` and cached by ``datasets`` under a fingerprint of the interpreter's stdlib path."""
    from datasets import Dataset

    return Dataset.from_generator(_stdlib_rows, gen_kwargs={"root": str(stdlib_root())})


@dataclasses.dataclass
class Corpus:
    """A train split, a held-out split (or None) and the name of their text column."""

    train: Any
    held_out: Any
    column: str
    description: str


def _check_fraction(held_out_fraction: float) -> None:
    if isinstance(held_out_fraction, bool) or not isinstance(held_out_fraction, (int, float)) or \
            not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be a number in [0, 1), got {held_out_fraction!r}")


def _files_and_builder(path: Path, argument: str) -> tuple[list[str], str]:
    """The data files under ``path`` and the builder that reads them (one kind per source)."""
    files = [path] if path.is_file() else _folder_files(path, argument)
    if not files:
        raise ValueError(f"{argument}: the folder {str(path)!r} has no files")
    builders = {BUILDERS.get(p.suffix.lower(), "text") for p in files}
    if len(builders) > 1:
        raise ValueError(f"{argument}: {str(path)!r} mixes file kinds ({', '.join(sorted(builders))}); point it at "
                         "files of one kind (text, json/jsonl, parquet, csv)")
    return [str(p) for p in files], builders.pop()


def _folder_files(root: Path, argument: str) -> list[Path]:
    """Every file under ``root``, sorted, hidden names (``.git``, ``.cache``, ...) skipped; symbolic links to
    folders are followed, each folder (and file) read once however many links reach it, so a link loop ends."""

    def fail(error: OSError) -> None:
        raise ValueError(f"{argument}: cannot read the folder {error.filename!r}: {error.strerror}") from error

    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    files = []
    for folder, dirs, names in os.walk(root, followlinks=True, onerror=fail):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a link: a loop, or a second link
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or name in _SKIPPED_NAMES:
                continue
            p = Path(folder, name)
            if not p.exists():
                raise ValueError(f"{argument}: {str(p)!r} is a broken symbolic link (to {os.readlink(p)!r}): fix or "
                                 "remove it")
            st = p.stat()
            if p.is_file() and (st.st_dev, st.st_ino) not in seen_files:
                seen_files.add((st.st_dev, st.st_ino))
                files.append(p)
    return sorted(files)


def _load_files(builder: str, files: list[str], argument: str):
    """``load_dataset(builder, files)``; a file it cannot read becomes a ``ValueError`` naming the file (and line)."""
    from datasets import load_dataset

    kwargs = {"sample_by": "document"} if builder == "text" else {}
    # the builders log their own "Failed to read file ..." before raising: the ValueError below says it better
    builders_log = logging.getLogger("datasets.packaged_modules")
    level = builders_log.level
    builders_log.setLevel(logging.CRITICAL)
    try:
        return load_dataset(builder, data_files={"train": files}, **kwargs)
    except Exception as error:  # noqa: BLE001 - pyarrow, pandas, codecs, datasets: found in the files, one message
        raise ValueError(f"{argument}: {_diagnose(builder, files, error)}") from error
    finally:
        builders_log.setLevel(level)


def _diagnose(builder: str, files: list[str], error: BaseException) -> str:
    """What is wrong with ``files``, found by reading them after ``datasets`` failed with ``error``."""
    for f in files:
        try:
            problem = _file_problem(builder, Path(f))
        except OSError as os_error:
            problem = f"cannot read it: {os_error.strerror or os_error}"
        if problem:
            return f"{f}: {problem}"
    if builder == "json" and all(_blank(Path(f)) for f in files):
        return f"{files[0]}: the file is empty" if len(files) == 1 else "every file is empty"
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip().splitlines()
    return f"could not read {files[0] if len(files) == 1 else f'{len(files)} {builder} files'}: " \
           f"{type(cause).__name__}{': ' + text[0] if text else ''}"


def _file_problem(builder: str, path: Path) -> str | None:
    """The first problem found in one file, or None."""
    if builder in ("text", "json", "csv"):
        problem = _utf8_problem(path)
        if problem:
            return problem
    if builder == "json":
        return _json_problem(path)
    if builder == "csv":
        import pandas as pd

        try:
            pd.read_csv(path, nrows=None)
        except Exception as error:  # noqa: BLE001 - pandas' parser errors have no common base
            return f"not valid CSV: {str(error).strip().splitlines()[0]}"
    if builder == "parquet":
        import pyarrow.parquet as pq

        try:
            pq.read_schema(path)
        except Exception as error:  # noqa: BLE001 - pyarrow's ArrowInvalid and friends
            return f"not a Parquet file: {str(error).strip().splitlines()[0]}"
    return None


def _utf8_problem(path: Path, chunk: int = 1 << 20) -> str | None:
    """Where ``path`` stops being UTF-8 text (line and byte), or None. A file with NUL bytes is called binary."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines, binary = 0, 1, False
    with path.open("rb") as f:
        while True:
            block = f.read(chunk)
            binary = binary or b"\0" in block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                if binary:
                    return "a binary file, not text: remove it (or move it out of the folder)"
                at = error.start - (len(error.object) - len(block))  # the decoder may hold bytes of the last block
                lines += block[:max(0, at)].count(b"\n")
                return f"line {lines}: not UTF-8 text (byte 0x{error.object[error.start]:02x} at byte {offset + at})" \
                       ": convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)"
            if not block:
                return None
            offset += len(block)
            lines += block.count(b"\n")


def _blank(path: Path) -> bool:
    with path.open("rb") as f:
        return not any(line.strip() for line in f)


def _json_problem(path: Path) -> str | None:
    """The first line of a JSON Lines file that is not a JSON object (or, for one JSON document, where it breaks)."""
    with path.open(encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
    if head.startswith("["):  # one JSON document (a list of records): parse it whole
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            return f"line {error.lineno}: not valid JSON ({error.msg})"
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None) \
            if isinstance(records, list) else None
        return None if bad is None else f"record {bad}: {_json_type(records[bad])}, not an object like " \
                                        '{"text": "..."}'
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as line_error:
                error = line_error
                if number == 1 and head.startswith("{"):  # maybe one pretty-printed object
                    try:
                        json.loads(path.read_text(encoding="utf-8"))
                        return None
                    except json.JSONDecodeError as doc_error:
                        error, number = doc_error, doc_error.lineno
                return f"line {number}: not valid JSON ({error.msg}); a .jsonl file holds one JSON object per line"
            if not isinstance(record, dict):
                return f"line {number}: {_json_type(record)}, not an object like {{\"text\": \"...\"}}"
    return None


def _json_type(value: Any) -> str:
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def missing_path(source: str | Path) -> bool:
    """``source`` looks like a local path (``./``, ``/``, ``~``, a data file suffix) but nothing is there: an error
    to report at once, not a ``datasets`` name to try."""
    text = str(source)
    path = Path(text).expanduser()
    looks_local = text.startswith((".", "/", "~")) or path.suffix.lower() in _LOCAL_SUFFIXES
    return bool(text) and looks_local and not path.exists()


def load_source(source: Any, *, argument: str = "data"):
    """A ``Dataset`` or ``DatasetDict`` for ``source`` (see :func:`load_corpus`). Local files are read with the
    builder their suffix names; plain text is one row per file (``sample_by="document"``).

    Raises:
        ValueError: a missing path, a folder without files or with mixed kinds, a file that cannot be read (named,
            with the line where there is one), an unknown dataset name.
    """
    from datasets import Dataset, DatasetDict, load_dataset

    if isinstance(source, (Dataset, DatasetDict)):
        return source
    if source is None or source == STDLIB:
        return stdlib_dataset()
    if not isinstance(source, (str, Path)):
        raise ValueError(f"{argument} must be a path, a dataset name, {STDLIB!r}, or a datasets.Dataset / "
                         f"DatasetDict, got {type(source).__name__}")
    path = Path(source).expanduser()
    if path.exists():
        return _load_files(*_files_and_builder(path, argument)[::-1], argument)
    if path.is_symlink():
        raise ValueError(f"{argument}: {str(source)!r} is a broken symbolic link (to {os.readlink(path)!r})")
    if missing_path(source):
        raise ValueError(f"{argument}: no such file or folder: {str(source)!r}")
    try:
        return load_dataset(str(source))
    except Exception as exc:  # offline, unknown name, ...: say what was tried
        raise ValueError(f"{argument}: {str(source)!r} is not a local file or folder, and loading it as a datasets "
                         f"name failed: {type(exc).__name__}: {exc}") from exc


def text_column(dataset, requested: str | None = None, *, argument: str = "text_column") -> str:
    """The column holding the text: ``requested``, else ``"text"``, else the only string column."""
    from datasets import Value

    columns = list(dataset.column_names)
    if requested:
        if requested not in columns:
            raise ValueError(f"{argument}: no column {requested!r} in the dataset; its columns are "
                             f"{', '.join(columns) or 'none'}")
        return requested
    if "text" in columns:
        return "text"
    strings = [c for c, f in dataset.features.items() if isinstance(f, Value) and f.dtype in ("string", "large_string")]
    if len(strings) == 1:
        return strings[0]
    raise ValueError(f"{argument}: the dataset has no 'text' column and {'no' if not strings else 'several'} string "
                     f"columns ({', '.join(columns) or 'none'}); name the one to use")


def require_text(dataset, column: str, *, argument: str = "data", files: list[str] | None = None) -> None:
    """Raise unless ``dataset[column]`` holds strings (nulls allowed): numbers, lists, objects or a mix of kinds
    are not text. With the JSON Lines ``files`` the dataset was read from, the message names the first bad line."""
    from datasets import Value

    feature = dataset.features[column]
    if isinstance(feature, Value) and feature.dtype in ("string", "large_string", "null"):
        return
    kind = feature.dtype if isinstance(feature, Value) else \
        {"Json": "mixed-kind", "List": "list", "Sequence": "list", "dict": "object"}.get(type(feature).__name__,
                                                                                     type(feature).__name__)
    where = _first_non_string(files, column) if files else None
    raise ValueError(f"{argument}: the {column!r} column holds {kind} values, not text"
                     f"{'; first at ' + where if where else ''}: every row's {column!r} must be a string (or name "
                     "another column)")


def _first_non_string(files: list[str], column: str) -> str | None:
    for f in files:
        if BUILDERS.get(Path(f).suffix.lower()) != "json":
            return f
        try:
            with open(f, encoding="utf-8") as lines:
                for number, line in enumerate(lines, 1):
                    record = json.loads(line) if line.strip() else {}
                    value = record.get(column) if isinstance(record, dict) else None
                    if value is not None and not isinstance(value, str):
                        return f"{f}, line {number}: {json.dumps(value)[:40]} ({_json_type(value)})"
        except (OSError, ValueError):  # a JSON document rather than lines: the file is as precise as it gets
            return f
    return None


def _local_files(source: Any, argument: str) -> list[str] | None:
    if isinstance(source, (str, Path)) and source != STDLIB and Path(source).expanduser().exists():
        return _files_and_builder(Path(source).expanduser(), argument)[0]
    return None


def _first_split(d, names: tuple[str, ...]):
    return next((d[n] for n in names if n in d), None)


def load_corpus(source: Any = None, *, text_column_name: str | None = None, eval_source: Any = None,
                held_out_fraction: float = 0.05, seed: int = 0) -> Corpus:
    """Train and held-out text from ``source``.

    Args:
        source: ``None``/``"stdlib"`` (the embedded default), a file, a folder, a ``datasets`` name, or a
            ``Dataset``/``DatasetDict``.
        text_column_name: the text column (default ``"text"``, or the only string column).
        eval_source: held-out text from elsewhere (same kinds as ``source``; its train split, or all of it).
        held_out_fraction: without ``eval_source`` or a ``validation``/``test`` split, this fraction of the rows
            (files, for text folders and the stdlib) is held out (stdlib: its fixed by-file split).

    Raises:
        ValueError: an empty dataset, a missing column, a bad fraction, an unreadable source (messages name the
            argument).
    """
    from datasets import DatasetDict

    _check_fraction(held_out_fraction)
    loaded = load_source(source, argument="data")
    held = None
    if isinstance(loaded, DatasetDict):
        train = _first_split(loaded, ("train",)) or next(iter(loaded.values()))
        held = _first_split(loaded, ("validation", "valid", "test"))
    else:
        train = loaded
    if len(train) == 0:
        raise ValueError(f"data: the dataset {_describe(source)} has no rows")
    column = text_column(train, text_column_name)
    require_text(train, column, argument="text_column" if text_column_name else "data",
                 files=_local_files(source, "data"))
    if eval_source is not None:
        extra = load_source(eval_source, argument="eval_data")
        held = (_first_split(extra, ("validation", "valid", "test", "train")) or next(iter(extra.values()))) \
            if isinstance(extra, DatasetDict) else extra
        text_column(held, column, argument="text_column (in eval_data)")
        require_text(held, column, argument="eval_data", files=_local_files(eval_source, "eval_data"))
    elif held is None and (source is None or source == STDLIB):
        is_held = [held_out_by_file(p, held_out_fraction) for p in train["path"]]
        held = train.select([i for i, h in enumerate(is_held) if h])
        train = train.select([i for i, h in enumerate(is_held) if not h])
    elif held is None and held_out_fraction > 0:
        if len(train) < 2:
            raise ValueError(f"data: {_describe(source)} has one row, nothing to hold out; pass eval_data "
                             "(--eval-data) or held_out_fraction=0")
        parts = train.train_test_split(test_size=max(1, round(held_out_fraction * len(train))), seed=seed,
                                       shuffle=True)
        train, held = parts["train"], parts["test"]
    if held is not None and len(held) == 0:
        raise ValueError("eval_data: the held-out dataset has no rows")
    return Corpus(train, held, column, _describe(source))


def _describe(source: Any) -> str:
    if source is None or source == STDLIB:
        return f"CPython stdlib source ({stdlib_root()})"
    return repr(str(source)) if isinstance(source, (str, Path)) else type(source).__name__


def limit_chars(dataset, column: str, max_chars: int | None):
    """The first rows of ``dataset`` holding ``max_chars`` characters of ``column`` (the last one cut)."""
    if max_chars is None:
        return dataset
    total, n, cut = 0, 0, None
    for batch in dataset.select_columns([column]).iter(batch_size=1000):
        for text in batch[column]:
            n += 1
            total += len(text or "")
            if total >= max_chars:
                cut = len(text) - (total - max_chars)
                break
        if cut is not None:
            break
    out = dataset.select(range(n))
    if cut is not None:
        last = n - 1
        out = out.map(lambda row, i: {column: row[column][:cut] if i == last else row[column]}, with_indices=True,
                      desc="cutting to max_chars")
    return out


def text_of(dataset, column: str, max_chars: int | None = None) -> str:
    """The rows' text joined (the held-out text a perplexity is measured on), at most ``max_chars``."""
    return "".join(t or "" for t in limit_chars(dataset, column, max_chars)[column])


def token_blocks(dataset, tokenizer, block_size: int, *, column: str = "text", max_chars: int | None = None,
                 num_proc: int | None = None, desc: str = "data"):
    """``dataset``'s text tokenised (no special tokens) and packed into blocks of ``block_size`` tokens, as
    ``run_clm.py`` does: a ``Dataset`` with ``input_ids`` and ``labels`` (torch format). The remainder of each
    group of 1,000 rows shorter than a block is dropped.

    Raises:
        ValueError: ``block_size`` < 2, a missing column, or fewer tokens than one block.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size must be an integer >= 2, got {block_size!r}")
    text_column(dataset, column)
    require_text(dataset, column, argument=desc)
    if len(dataset) == 0:
        raise ValueError(f"{desc}: the dataset has no rows")
    dataset = limit_chars(dataset, column, max_chars)

    def tokenize(batch):
        return {"input_ids": tokenizer([t or "" for t in batch[column]], add_special_tokens=False)["input_ids"]}

    def group(batch):
        ids = list(chain.from_iterable(batch["input_ids"]))
        n = len(ids) // block_size * block_size
        blocks = [ids[i:i + block_size] for i in range(0, n, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    tokens = dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                         desc=f"tokenizing {desc}")
    blocks = tokens.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"packing {desc} into "
                        f"{block_size}-token blocks")
    if len(blocks) == 0:
        total = sum(len(x) for x in tokens["input_ids"])
        raise ValueError(f"{desc}: the text is shorter than one block: {total} tokens, block_size={block_size}; "
                         "add text or lower the block size")
    return blocks.with_format("torch")


def windows(tokenizer, text: str, window: int, *, what: str = "held-out text") -> torch.Tensor:
    """``text``'s token ids in non-overlapping windows of ``window`` tokens, ``[N, window]`` (a perplexity's input;
    encoded in chunks to bound memory, no special tokens).

    Raises:
        ValueError: fewer tokens than one window.
    """
    ids: list[int] = []
    for i in range(0, len(text), 200_000):
        ids.extend(tokenizer(text[i:i + 200_000], add_special_tokens=False)["input_ids"])
    n = len(ids) // window
    if n == 0:
        raise ValueError(f"{what}: {len(ids)} tokens, fewer than one window of {window}; add text or lower the "
                         "window")
    return torch.tensor(ids[: n * window]).view(n, window)


def calibration_windows(tokenizer, rows: int = 8, window: int = 512, exclude: str = "argparse.py") -> torch.Tensor:
    """``rows`` windows of ``window`` tokens of training-split stdlib text (``exclude``, the held-out evaluation
    file, left out): the calibration text of gate shifts and input thresholds, ``[rows, window]``.

    Raises:
        ValueError: the text gives fewer than ``rows`` windows.
    """
    train = load_corpus().train.filter(lambda row: Path(row["path"]).name != exclude)
    ids = windows(tokenizer, text_of(train, "text", 20 * rows * window), window, what="calibration text")
    if len(ids) < rows:
        raise ValueError(f"calibration text too short: {len(ids)} windows of {window} tokens for rows={rows}")
    return ids[:rows]


def train_tokenizer(texts: str | list[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on ``texts``, as a ``PreTrainedTokenizerFast`` (eos/pad =
    ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = texts if isinstance(texts, str) else "".join(texts)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
