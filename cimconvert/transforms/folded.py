"""Transforms folded into the stored weights (e.g. ``output_gain``): recorded for provenance, nothing to
re-apply on load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

#: Transform types whose effect the bundle's weights already carry.
FOLDED_TYPES = ("output_gain",)


def already_folded(model: nn.Module, entry: Any, bundle_dir: str | Path) -> None:
    """``TRANSFORM_LOADERS`` entry of a folded transform: the loaded weights are already transformed."""
    del model, entry, bundle_dir
