"""A real corpus every machine has: CPython's own standard-library source, split by file, plus a local tokenizer.

No downloads: the text is the running interpreter's stdlib, the tokenizer is a byte-level BPE trained on the
training files with the ``tokenizers`` library (a few seconds) and wrapped as a ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset

#: Files always held out, so that results on them can be compared across runs (argparse.py is BASELINE.md's text).
HELD_OUT_FILES = ("argparse.py", "typing.py", "difflib.py")
_EXCLUDED_DIRS = {"site-packages", "test", "tests", "idlelib", "turtledemo", "lib2to3", "__pycache__"}


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


def split_files(files: list[Path], held_out_fraction: float = 0.05) -> tuple[list[Path], list[Path]]:
    """Deterministic train / held-out split by file: the ``HELD_OUT_FILES`` plus a hash-chosen fraction."""
    if not 0.0 <= held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    train, held = [], []
    for f in files:
        digest = int(hashlib.sha1(f.name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        pinned = f.name in HELD_OUT_FILES and f.parent == stdlib_root()
        (held if pinned or digest < held_out_fraction else train).append(f)
    return train, held


def read_text(files: list[Path], max_chars: int | None = None) -> str:
    """Concatenated file contents (``max_chars`` caps the total)."""
    parts, total = [], 0
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    joined = "\n\n".join(parts)
    return joined if max_chars is None else joined[:max_chars]


def train_tokenizer(text: str, vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on ``text``, as a ``PreTrainedTokenizerFast`` (eos = ``<|endoftext|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 100_000] for i in range(0, len(text), 100_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


class TokenBlocks(Dataset):
    """Non-overlapping blocks of ``block_size`` token ids (``labels`` = ``input_ids``; the model shifts them)."""

    def __init__(self, ids: list[int] | torch.Tensor, block_size: int):
        ids = torch.as_tensor(ids, dtype=torch.long)
        n = len(ids) // block_size
        if n == 0:
            raise ValueError(f"need at least block_size={block_size} tokens, got {len(ids)}")
        self.blocks = ids[: n * block_size].view(n, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def encode(tokenizer, text: str, chunk_chars: int = 200_000) -> list[int]:
    """Token ids of a long text (encoded in chunks to bound memory; no special tokens)."""
    ids: list[int] = []
    for i in range(0, len(text), chunk_chars):
        ids.extend(tokenizer(text[i:i + chunk_chars], add_special_tokens=False)["input_ids"])
    return ids
