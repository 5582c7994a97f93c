"""README's figures come from benchmarks/results/: the demo-model table equals what the results render."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent


def _demo_eval() -> ModuleType:
    """benchmarks/demo_eval.py as a module (the script that renders the table)."""
    spec = importlib.util.spec_from_file_location("demo_eval", REPO / "benchmarks" / "demo_eval.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows() -> list[dict]:
    return json.loads((REPO / "benchmarks" / "results" / "demo_eval.json").read_text(encoding="utf-8"))


def test_readme_demo_table_matches_results() -> None:
    demo_eval = _demo_eval()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert demo_eval.readme_mismatches(_rows(), readme) == []


def test_readme_check_catches_a_changed_figure() -> None:
    demo_eval = _demo_eval()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    table = demo_eval.readme_table(readme)
    first_row = table.splitlines()[2]
    altered = readme.replace(first_row, first_row.replace(" | ", " | 1", 1), 1)
    diffs = demo_eval.readme_mismatches(_rows(), altered)
    assert len(diffs) == 1 and first_row.split(" | ")[0] in diffs[0]
