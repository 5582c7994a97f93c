"""Named text datasets (shipped splits and the shared corpora) and text-file loading."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from cimconvert.errors import CimError

#: Shipped with the package (cimconvert/shipped_texts/): held-out slices of the demo models' corpus.
SHIPPED = {
    "heldout": "heldout.txt",
    "calib": "calib.txt",
}
#: Read from the shared data folder named by the ``CIMCONVERT_SHARED_DATA`` environment variable.
SHARED = {
    "wikitext2": "wikitext-2/wiki.test.raw",
    "wikitext2-valid": "wikitext-2/wiki.valid.tokens",
    "tinyshakespeare": "corpora/tinyshakespeare/input.txt",
}


def dataset_names() -> list[str]:
    """All dataset names accepted by ``load_text`` besides a file path."""
    return sorted([*SHIPPED, *SHARED])


def shared_data_dir() -> Path | None:
    """The shared data folder named by ``CIMCONVERT_SHARED_DATA``, if set and a folder (never guessed)."""
    env = os.environ.get("CIMCONVERT_SHARED_DATA")
    return Path(env) if env and Path(env).is_dir() else None


def resolve_dataset(spec: str) -> Path:
    """Map a dataset name or a text-file path to a readable file path."""
    if spec in SHIPPED:
        return Path(str(resources.files("cimconvert") / "shipped_texts" / SHIPPED[spec]))
    if spec in SHARED:
        root = shared_data_dir()
        if root is None:
            raise CimError(
                f"dataset '{spec}' needs the shared data folder; set CIMCONVERT_SHARED_DATA to its path"
            )
        return root / SHARED[spec]
    path = Path(spec)
    if not path.is_file():
        raise CimError(f"dataset '{spec}' is neither a known name ({', '.join(dataset_names())}) nor a file")
    return path


def load_text(spec: str) -> str:
    """The text of a named dataset or of a UTF-8 text file; a clear error if missing or unreadable."""
    path = resolve_dataset(spec)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CimError(f"dataset '{spec}': file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CimError(f"dataset '{spec}': cannot read {path} ({exc.__class__.__name__})") from None
    if not text.strip():
        raise CimError(f"dataset '{spec}' is empty: {path}")
    if "\x00" in text:
        raise CimError(f"dataset '{spec}': {path} is not a text file (it holds NUL bytes)")
    return text


#: Characters tokenised per call when a whole text is tokenised (keeps memory flat on large corpora).
_CHUNK_CHARS = 1 << 20


#: transformers' key for its "sequence longer than the model's maximum" warning: a whole text is tokenised
#: on purpose (windows are cut afterwards), so the warning is marked as given.
_LONG_TEXT_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


def _encode(tokenizer: Any, text: str) -> list[int]:
    given = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(given, dict):
        given[_LONG_TEXT_WARNING] = True
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def token_ids(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` (no special tokens) as a 1-D LongTensor.

    With ``max_tokens`` only a prefix long enough for that many tokens is tokenised (doubling from
    ~8 characters per token); without it the whole text is, in chunks. ``tokenizer`` is any Hugging Face
    style callable returning ``{"input_ids": [...]}``.
    """
    if max_tokens is None:
        ids: list[int] = []
        for start in range(0, len(text), _CHUNK_CHARS):
            ids += _encode(tokenizer, text[start : start + _CHUNK_CHARS])
        return torch.tensor(ids, dtype=torch.long)
    chars = max(max_tokens * 8, 4096)
    while True:
        ids = _encode(tokenizer, text[:chars])
        if len(ids) >= max_tokens or chars >= len(text):
            return torch.tensor(ids[:max_tokens], dtype=torch.long)
        chars *= 2


def tokenize(tokenizer: Any, text: str, max_tokens: int) -> torch.Tensor:
    """Token ids of ``text`` (truncated to ``max_tokens``) as a 1-D LongTensor; too short is an error."""
    ids = token_ids(tokenizer, text, max_tokens)
    if ids.numel() < 16:
        raise CimError(f"dataset too short: {ids.numel()} tokens (need at least 16)")
    return ids


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer of a model folder (one-line CimError when none is usable)."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CimError(f"no usable tokenizer in {folder}: {str(exc).splitlines()[0]}") from None
