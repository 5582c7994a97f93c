"""A model ready for evaluation: a source checkpoint or a bundle with its tokenizer and analog targets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cimconvert.bundle.reader import (
    is_bundle,
    load_bundle,
    manifest_profile,
    placement_from_manifest,
    read_manifest,
)
from cimconvert.checkpoint import SourceCheckpoint, check_weights_finite, resolve_model
from cimconvert.datasets import load_tokenizer
from cimconvert.devices import place_model
from cimconvert.errors import CimError
from cimconvert.placement import model_placement, plan_model
from cimconvert.profiles import ChipProfile, load_profile


def load_for_eval(
    model: str,
    profile: str | None,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    source: SourceCheckpoint | None = None,
) -> tuple[torch.nn.Module, Any, list[Any], ChipProfile]:
    """(model, tokenizer, analog targets, profile) for a source checkpoint or a bundle.

    A bundle's analog targets are its manifest's placement (read back, whatever ``profile`` says); a
    checkpoint's are planned here, once, under ``profile`` with the default rules. The model is loaded in
    float32 on the CPU, then moved to ``device`` (default: the CPU) and cast to ``dtype``. ``source``: the
    checkpoint already resolved from ``model`` (not resolved again; a GGUF file not dequantised again).
    """
    if is_bundle(model):
        manifest = read_manifest(Path(model))
        chip = load_profile(profile) if profile else manifest_profile(manifest)
        recorded = placement_from_manifest(manifest)  # every manifest field is checked before loading
        net = check_weights_finite(load_bundle(Path(model)))
        targets = model_placement(net, recorded, chip).analog()
        folder = Path(model)
    else:
        if not profile:
            raise CimError("--profile is required unless MODEL is a bundle")
        chip = load_profile(profile)
        source = source or resolve_model(model)
        net = check_weights_finite(source.load_model(dtype=torch.float32))
        targets = plan_model(net, chip).analog()
        folder = source.dir
    place_model(net, device or torch.device("cpu"), dtype)
    return net, load_tokenizer(folder), targets, chip
