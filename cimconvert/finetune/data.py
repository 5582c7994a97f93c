"""Training text and batches for fine-tuning.

Besides every name of :func:`cimconvert.data.load_text` and any text file, ``gutenberg-train`` is the
demo models' own training split: the first 90 % of each shared Gutenberg book (header/footer stripped,
cut moved to the next paragraph boundary), exactly as ``examples/train_tiny.py`` builds it, so
fine-tuning never sees the ``heldout`` / ``calib`` text cut from the remaining tail.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from cimconvert.data import load_text, shared_data_dir
from cimconvert.errors import CimError

GUTENBERG_TRAIN = "gutenberg-train"
TRAIN_FRACTION = 0.9


def _strip_gutenberg(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.MULTILINE)
    end = re.search(r"^\*\*\* ?END OF.*$", text, flags=re.MULTILINE)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip() + "\n"


def gutenberg_train_text() -> str:
    """The first 90 % (to a paragraph boundary) of every shared Gutenberg book, in file-name order."""
    root = shared_data_dir()
    files = sorted((root / "corpora" / "gutenberg").glob("*.txt")) if root else []
    if not files:
        raise CimError(f"dataset '{GUTENBERG_TRAIN}' needs the shared data folder (CIMCONVERT_SHARED_DATA)")
    parts = []
    for file in files:
        body = _strip_gutenberg(file.read_text(encoding="utf-8"))
        cut = body.find("\n\n", int(len(body) * TRAIN_FRACTION))
        parts.append(body[: len(body) if cut < 0 else cut + 2])
    return "".join(parts)


def training_text(spec: str) -> str:
    """Text of ``gutenberg-train``, of a named dataset or of a text file."""
    return gutenberg_train_text() if spec == GUTENBERG_TRAIN else load_text(spec)


def check_tokens(tokens: Any, seq_len: int, vocab_size: int | None) -> torch.Tensor:
    """Validate a 1-D token tensor: long dtype, long enough for one window, ids inside the vocabulary."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
        raise CimError("training data must be a dataset name, a text file or a 1-D LongTensor of token ids")
    if tokens.numel() < seq_len + 1:
        raise CimError(
            f"training data has {tokens.numel()} tokens; need at least seq_len + 1 = {seq_len + 1}"
        )
    if vocab_size is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise CimError(f"training data has token ids outside the model's vocabulary (0..{vocab_size - 1})")
    return tokens


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    """``[batch, seq_len + 1]`` random windows (inputs are ``[:, :-1]``, targets ``[:, 1:]``)."""
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])
