"""Outlier input channels kept digital: a linear layer split by input channel, and its bundle loader.

``y = analog(x[..., analog_index]) + digital(x[..., digital_index])``: the few input channels whose
activations are largest (found on calibration text by :mod:`cimconvert.methods.outliers`) run in a small
digital matmul; the rest run on the crossbar. With per-vector abs-max input scaling (noise management)
one large channel shrinks every other channel's DAC input, so taking the outliers out raises the analog
signal against the chip's output noise and ADC step. The split is exact without noise.

Below both :mod:`cimconvert.methods.outliers` (which picks the channels) and
:mod:`cimconvert.bundle.reader` (which re-applies the transform on load). The child names follow the
split convention the adapters know (``<module>.analog.weight`` keeps the layer's kind,
``<module>.digital.weight`` is digital).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimconvert.errors import BundleError
from cimconvert.transforms.hpd_split import (
    ANALOG,
    DIGITAL,
    bundle_key_files,
    like_module,
    read_bundle_tensor,
    replace_module,
)

#: ``type`` of the manifest transform entry (and key in ``TRANSFORM_LOADERS``).
TRANSFORM_TYPE = "outlier_split"


class OutlierSplitLinear(nn.Module):
    """A linear layer whose ``digital_index`` input channels run digitally and the rest on the crossbar."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        digital_index: Sequence[int],
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        digital = sorted({int(i) for i in digital_index})
        if not digital or digital[0] < 0 or digital[-1] >= in_features or len(digital) >= in_features:
            raise ValueError(f"digital channels must be a proper subset of 0..{in_features - 1}")
        keep = sorted(set(range(in_features)) - set(digital))
        self.register_buffer("digital_index", torch.tensor(digital, device=device), persistent=False)
        self.register_buffer("analog_index", torch.tensor(keep, device=device), persistent=False)
        self.analog = nn.Linear(len(keep), out_features, bias=bias, dtype=dtype, device=device)
        self.digital = nn.Linear(len(digital), out_features, bias=False, dtype=dtype, device=device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, digital_index: Sequence[int]) -> OutlierSplitLinear:
        """The exact split of ``linear`` (its weight columns copied, bias kept on the analog part)."""
        weight = linear.weight.detach()
        split = cls(linear.in_features, linear.out_features, digital_index, linear.bias is not None,
                    dtype=weight.dtype, device=weight.device)  # fmt: skip
        with torch.no_grad():
            split.analog.weight.copy_(weight[:, split.analog_index])
            split.digital.weight.copy_(weight[:, split.digital_index])
            if linear.bias is not None:
                split.analog.bias.copy_(linear.bias.detach())
        return split

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Analog part on the kept channels plus digital part on the outlier channels."""
        return self.analog(x.index_select(-1, self.analog_index)) + self.digital(
            x.index_select(-1, self.digital_index)
        )

    @property
    def weight(self) -> torch.Tensor:
        """The full ``[out, in]`` matrix (read-only; for code that reads ``.weight`` directly)."""
        full = self.analog.weight.new_zeros(self.out_features, self.in_features)
        full[:, self.analog_index] = self.analog.weight
        full[:, self.digital_index] = self.digital.weight
        return full

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias (held by the analog part)."""
        return self.analog.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"digital_channels={len(self.digital_index)}"  # fmt: skip


def layer_params(name: str, split: OutlierSplitLinear) -> dict[str, Any]:
    """The manifest description of one split layer (what the loader needs to rebuild it)."""
    return {
        "module": name,
        "in_features": split.in_features,
        "out_features": split.out_features,
        "bias": split.analog.bias is not None,
        "digital_index": [int(i) for i in split.digital_index],
    }


def _replaced_and_added(layer: dict[str, Any]) -> tuple[list[str], list[str]]:
    module = layer["module"]
    replaced = [f"{module}.weight"] + ([f"{module}.bias"] if layer["bias"] else [])
    added = [f"{module}.{ANALOG}.weight", f"{module}.{DIGITAL}.weight"]
    if layer["bias"]:
        added.append(f"{module}.{ANALOG}.bias")
    return replaced, added


def expected_key_changes(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys a stock class reports missing, keys it reports unexpected) for every split layer."""
    missing: list[str] = []
    unexpected: list[str] = []
    for layer in params["layers"]:
        replaced, added = _replaced_and_added(layer)
        missing += replaced
        unexpected += added
    return missing, unexpected


def _rebuild(model: nn.Module, layer: dict[str, Any], files: dict[str, Path]) -> None:
    """Replace module ``layer['module']`` by its split, with the weights read from the bundle."""
    name = layer["module"]
    split = OutlierSplitLinear(layer["in_features"], layer["out_features"], layer["digital_index"],
                               bool(layer["bias"]), **like_module(model, name, "outlier_split"))
    _, added = _replaced_and_added(layer)
    state = {key.removeprefix(f"{name}."): read_bundle_tensor(files, key, "outlier_split") for key in added}
    try:
        split.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"outlier_split transform on '{name}': {str(exc).splitlines()[0]}") from None
    replace_module(model, name, split.eval())


def load_outlier_split(model: nn.Module, entry: Any, bundle_dir: str | Path) -> None:
    """``TRANSFORM_LOADERS['outlier_split']``: rebuild every split layer of the entry from the bundle."""
    params = entry.params if hasattr(entry, "params") else entry["params"]
    files = bundle_key_files(Path(bundle_dir))
    for layer in params["layers"]:
        _rebuild(model, layer, files)
