"""Digital input channels of fused experts tensors: the manifest entry and its bundle loader.

The ``outlier_channels`` method keeps, for every expert of an analog fused tensor, the input channels with
the largest calibration activations digital. The fused parameter keeps the whole matrix (so the bundle's
per-expert keys are unchanged and a clean forward is exact); the entry records the channels, and the
loader hands them back to the experts module (:func:`cimconvert.analog.experts.set_digital_inputs`),
which the simulator, STE and the exporter read (:mod:`cimconvert.analog.experts`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimconvert.analog.experts import digital_inputs, set_digital_inputs
from cimconvert.analog.routes import owner_of
from cimconvert.errors import BundleError

#: ``type`` of the manifest transform entry (and key in ``TRANSFORM_LOADERS``).
TRANSFORM_TYPE = "experts_digital_inputs"


def tensor_params(model: nn.Module, name: str, layout: str) -> dict[str, Any]:
    """The manifest description of fused tensor ``name``'s digital input channels (one list per expert)."""
    owner, _, attr = owner_of(model, name)
    index = digital_inputs(owner, attr)
    if index is None:
        raise ValueError(f"'{name}' has no digital input channels")
    return {"tensor": name, "layout": layout, "digital_index": index.tolist()}


def load_experts_inputs(model: nn.Module, entry: Any, bundle_dir: str | Path) -> None:
    """``TRANSFORM_LOADERS['experts_digital_inputs']``: give each fused tensor its digital input channels."""
    del bundle_dir
    params = entry.params if hasattr(entry, "params") else entry["params"]
    for item in params["tensors"]:
        name = item["tensor"]
        try:
            owner, _, attr = owner_of(model, name)
            set_digital_inputs(owner, attr, torch.tensor(item["digital_index"], dtype=torch.long))
        except (AttributeError, ValueError, RuntimeError) as exc:
            raise BundleError(f"experts_digital_inputs transform on '{name}': {str(exc).splitlines()[0]}") \
                from None
