"""Shared test setup: one torch thread (2-core CI machine), offline Hugging Face, repo paths."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
DEMO_MODELS = REPO / "examples" / "models"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO
