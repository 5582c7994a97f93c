"""Named datasets and text-file loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from cimconvert.datasets import dataset_names, load_text
from cimconvert.errors import CimError


def test_named_and_file_datasets(tmp_path: Path) -> None:
    assert {"heldout", "calib", "wikitext2"} <= set(dataset_names())
    f = tmp_path / "t.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert load_text(str(f)) == "hello world\n"


def test_bad_datasets(tmp_path: Path) -> None:
    with pytest.raises(CimError, match="neither a known name"):
        load_text("no-such-dataset")
    empty = tmp_path / "e.txt"
    empty.write_text("  \n", encoding="utf-8")
    with pytest.raises(CimError, match="empty"):
        load_text(str(empty))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(CimError, match="cannot read"):
        load_text(str(binary))
