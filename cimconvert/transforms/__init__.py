"""Model transforms a bundle records, and how each is re-applied on load.

A method (:mod:`cimconvert.methods`) records what it changed as ``manifest.transforms`` entries;
:mod:`cimconvert.bundle.reader` re-applies them through :data:`TRANSFORM_LOADERS` and asks
:data:`TRANSFORM_KEY_CHANGES` which checkpoint keys a stock ``from_pretrained`` will miss or not expect.
This package sits below both, so the reader never imports a method and a method only imports down.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cimconvert.transforms import experts_inputs, folded, hpd_split, outlier_split
from cimconvert.transforms.romer import loader as romer_loader

#: Transform type → fn(model, transform_entry, bundle_dir) that re-applies it on load (in place).
TRANSFORM_LOADERS: dict[str, Callable[[torch.nn.Module, Any, Path], None]] = {
    hpd_split.TRANSFORM_TYPE: hpd_split.load_hpd_split,
    outlier_split.TRANSFORM_TYPE: outlier_split.load_outlier_split,
    experts_inputs.TRANSFORM_TYPE: experts_inputs.load_experts_inputs,
    romer_loader.REPLACEMENT_TYPE: romer_loader.load_replacement,
    romer_loader.ROUTING_TYPE: romer_loader.load_routing,
    **dict.fromkeys(folded.FOLDED_TYPES, folded.already_folded),
}
#: Transform type → fn(params) -> (keys the stock class reports missing, keys it reports unexpected).
TRANSFORM_KEY_CHANGES: dict[str, Callable[[dict[str, Any]], tuple[list[str], list[str]]]] = {
    hpd_split.TRANSFORM_TYPE: hpd_split.expected_key_changes,
    outlier_split.TRANSFORM_TYPE: outlier_split.expected_key_changes,
}

__all__ = ["TRANSFORM_KEY_CHANGES", "TRANSFORM_LOADERS"]
