"""The demo models' corpus: the shared Project Gutenberg books, each split once into training text and a
held-out tail.

:func:`split_book` is the one place the split is written: ``examples/train_tiny.py`` trains the demo
models on ``train`` and cuts the shipped ``heldout`` / ``calib`` texts from ``heldout``; fine-tuning's
``gutenberg-train`` dataset is the ``train`` side of every book. The two sides are disjoint and together
the whole book (header and footer stripped), by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cimconvert.datasets import shared_data_dir
from cimconvert.errors import CimError

#: Share of each book (in characters, moved to the next paragraph boundary) that is training text.
TRAIN_FRACTION = 0.9
#: Dataset name of the training side of every shared book (fine-tuning's default data).
GUTENBERG_TRAIN = "gutenberg-train"


@dataclass(frozen=True)
class BookSplit:
    """One book's training text and held-out tail (``train + heldout`` is the stripped book)."""

    train: str
    heldout: str


def strip_gutenberg(text: str) -> str:
    """The text between the ``*** START OF`` and ``*** END OF`` lines, with ``\\n`` line endings."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.MULTILINE)
    end = re.search(r"^\*\*\* ?END OF.*$", text, flags=re.MULTILINE)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip() + "\n"


def paragraph_cut(text: str, pos: int) -> int:
    """The first blank-line paragraph boundary at or after ``pos`` (the end of ``text`` if none)."""
    idx = text.find("\n\n", pos)
    return len(text) if idx < 0 else idx + 2


def split_book(raw: str) -> BookSplit:
    """Split a raw Gutenberg book: the first 90 % (to a paragraph boundary) trains, the rest is held out."""
    body = strip_gutenberg(raw)
    cut = paragraph_cut(body, int(len(body) * TRAIN_FRACTION))
    return BookSplit(train=body[:cut], heldout=body[cut:])


def gutenberg_books(root: Path | None = None) -> list[Path]:
    """The shared Gutenberg books (``<shared data>/corpora/gutenberg/*.txt``) in file-name order."""
    root = root if root is not None else shared_data_dir()
    return sorted((root / "corpora" / "gutenberg").glob("*.txt")) if root else []


def gutenberg_train_text() -> str:
    """The training side of every shared Gutenberg book, concatenated in file-name order."""
    books = gutenberg_books()
    if not books:
        raise CimError(f"dataset '{GUTENBERG_TRAIN}' needs the shared data folder (CIMCONVERT_SHARED_DATA)")
    return "".join(split_book(book.read_text(encoding="utf-8")).train for book in books)
