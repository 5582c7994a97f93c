"""Shared test setup: one torch thread (2-core CI machine), offline Hugging Face, repo paths, the in-process
CLI runner.

Helpers shared by several test files live in ``tests/tiny_models.py`` (tiny random models) and
``tests/reliability_helpers.py`` (micro checkpoints, manifest edits, subprocess runs); pytest puts
``tests/`` on ``sys.path``, so they are imported by their bare module names (``from tiny_models import
...``), never as ``tests.tiny_models``. Test files never import from each other.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from reliability_helpers import REPO, RunCli

from cimconvert.cli import main

torch.set_num_threads(1)

@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> RunCli:
    """Run the CLI in-process: ``run_cli(*args)`` returns (exit code, stdout, stderr) of that run."""

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run
