"""When layer-by-layer execution engages, and whether a model fits in memory at all.

``layerwise="auto"`` (the default of ``convert`` and ``eval``) runs a checkpoint layer by layer when its
float32 size (what the whole-model path loads) exceeds :data:`AUTO_FRACTION` of the available memory.
Available memory is the kernel's ``MemAvailable`` (Linux), else the free physical pages;
``$CIMCONVERT_MEMORY_BUDGET`` (bytes, or with a K/M/G/T suffix) replaces it, e.g. to plan for a smaller
machine or inside a container whose limit the kernel figure does not show.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from cimconvert.bundle.reader import is_bundle
from cimconvert.checkpoint import FLOAT_DTYPES, SourceCheckpoint, resolve_model
from cimconvert.datasets import load_tokenizer
from cimconvert.distributed import launched
from cimconvert.errors import CimError
from cimconvert.layerwise.skeleton import LayerwiseModel
from cimconvert.profiles import ChipProfile, load_profile

#: Layer by layer when the float32 model exceeds this fraction of the available memory (auto).
AUTO_FRACTION = 0.5
#: The ONNX export holds the float32 model and its graph's initializers at once: about twice the model.
ONNX_FACTOR = 2.0
BUDGET_ENV = "CIMCONVERT_MEMORY_BUDGET"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
GIB = float(1 << 30)


def parse_bytes(text: str) -> int:
    """``"6G"`` → bytes (K, M, G, T: powers of 1024; optional ``B``/``iB``); CimError when malformed."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise CimError(f"${BUDGET_ENV}={text!r} is not a size (e.g. 6G, 512M, 1073741824)")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def _meminfo_available() -> int | None:
    """``MemAvailable`` from /proc/meminfo in bytes, or None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes() -> int:
    """Memory this process may use: ``$CIMCONVERT_MEMORY_BUDGET``, else what the OS reports available."""
    budget = os.environ.get(BUDGET_ENV)
    if budget:
        return parse_bytes(budget)
    found = _meminfo_available()
    if found is not None:
        return found
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def model_bytes(source: SourceCheckpoint) -> int:
    """Bytes of the checkpoint once loaded as the whole-model path loads it (floats as float32)."""
    total = 0
    for meta in source.tensor_shapes().values():
        numel = 1
        for dim in meta.shape:
            numel *= dim
        total += numel * 4 if meta.dtype in FLOAT_DTYPES else meta.nbytes
    return total


def use_layerwise(mode: bool | str, source: SourceCheckpoint) -> bool:
    """Whether to run ``source`` layer by layer: True/False as given, ``"auto"`` by size (module doc)."""
    if isinstance(mode, bool):
        return mode
    if mode != "auto":
        raise CimError(f"layerwise must be True, False or 'auto' (got {mode!r})")
    return model_bytes(source) > AUTO_FRACTION * available_bytes()


def use_layerwise_here(mode: bool | str, source: SourceCheckpoint) -> bool:
    """:func:`use_layerwise`, refused (CimError on every rank) inside a ``torchrun`` launch: a layer pass
    makes every noise draw itself, so each rank would hold the layer and repeat the work."""
    chosen = use_layerwise(mode, source)
    if chosen and launched():
        raise CimError("layer-by-layer execution runs in one process: launch it without torchrun (its noise "
                       "draws are not shared out over ranks)")  # fmt: skip
    return chosen


def check_onnx_fits(source: SourceCheckpoint, model: str) -> None:
    """CimError (nothing written yet) when the ONNX export of ``source`` would not fit in memory."""
    need = model_bytes(source) * ONNX_FACTOR
    have = available_bytes()
    if need <= have:
        return
    raise CimError(
        f"{model} needs about {need / GIB:.1f} GiB to export ONNX (the whole model in float32 plus its "
        f"graph) and {have / GIB:.1f} GiB are available: convert with --no-onnx to get the bundle without "
        "onnx/model.onnx (validate then cannot run: it compares that graph in onnxruntime with the torch "
        "simulator)"
    )


def layerwise_source(model: str, profile: str | None,
                     layerwise: bool | str) -> tuple[SourceCheckpoint | None, bool]:  # fmt: skip
    """(the resolved checkpoint, or None for a bundle, and whether to run it layer by layer) for eval and
    analyze: a bundle runs whole (``layerwise=True`` on one is a CimError)."""
    if is_bundle(model):
        if layerwise is True:
            raise CimError("layer by layer reads a source checkpoint, not a bundle (run the bundle with "
                           "--whole-model)")
        return None, False
    if not profile:
        raise CimError("--profile is required unless MODEL is a bundle")
    source = resolve_model(model)
    return source, use_layerwise_here(layerwise, source)



def open_layerwise(source: SourceCheckpoint, profile: str | ChipProfile,
                   device: torch.device) -> tuple[LayerwiseModel, ChipProfile, Any]:  # fmt: skip
    """(``source`` run layer by layer on ``device``, the profile, the checkpoint's tokenizer): what eval and
    analyze open when :func:`layerwise_source` says layer by layer."""
    return LayerwiseModel.open(source, device), load_profile(profile), load_tokenizer(source.dir)


__all__ = [
    "AUTO_FRACTION",
    "BUDGET_ENV",
    "ONNX_FACTOR",
    "available_bytes",
    "check_onnx_fits",
    "layerwise_source",
    "model_bytes",
    "open_layerwise",
    "parse_bytes",
    "use_layerwise",
    "use_layerwise_here",
]
