"""Training text and batches for fine-tuning.

Besides every name of :func:`cimconvert.datasets.load_text` and any text file, ``gutenberg-train`` is the
demo models' own training split (:func:`cimconvert.gutenberg.split_book`, the split
``examples/train_tiny.py`` trains on), so fine-tuning never sees the ``heldout`` / ``calib`` text cut from
each book's held-out tail.
"""

from __future__ import annotations

from typing import Any

import torch

from cimconvert.datasets import load_text
from cimconvert.errors import CimError
from cimconvert.gutenberg import GUTENBERG_TRAIN, gutenberg_train_text


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
