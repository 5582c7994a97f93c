"""The HPD split as a model transform: the :class:`HpdLinear` layer, which layers it can replace, and the
``hpd_split`` bundle loader that rebuilds it from a manifest entry.

Below both :mod:`cimconvert.methods.hpd` (which decides what to split and computes the factors) and
:mod:`cimconvert.bundle.reader` (which re-applies the transform on load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers.pytorch_utils import Conv1D

from cimconvert.arch import get_adapter
from cimconvert.errors import BundleError

#: ``type`` of the manifest transform entry (and key in ``TRANSFORM_LOADERS``).
TRANSFORM_TYPE = "hpd_split"
#: Child module names of :class:`HpdLinear` (the tensor names become ``<module>.analog.weight`` etc.).
ANALOG, DIGITAL = "analog", "digital"


class HpdLinear(nn.Module):
    """``y = analog(digital(x))``: a digital factor ``[r, in]`` followed by an analog factor ``[out, r]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.digital = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.analog = nn.Linear(rank, out_features, bias=bias, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Digital factor first, then the analog factor (plus bias)."""
        return self.analog(self.digital(x))

    @property
    def weight(self) -> torch.Tensor:
        """The effective matrix ``A·D`` (read-only; for code that reads ``.weight`` directly)."""
        return self.analog.weight @ self.digital.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias (held by the analog factor)."""
        return self.analog.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and GPT-2 ``Conv1D`` (the layers HPD can split)."""
    return isinstance(module, (nn.Linear, Conv1D))


def _module_of(model: nn.Module, tensor: str) -> nn.Module | None:
    try:
        return model.get_submodule(tensor.rpartition(".")[0])
    except AttributeError:
        return None


def splittable(model: nn.Module, tensor: str) -> bool:
    """Whether HPD can split the module owning ``tensor`` (a called linear layer)."""
    module_path = tensor.rpartition(".")[0]
    module = _module_of(model, tensor)
    weight_only = get_adapter(model.config).is_weight_only(module_path)  # read directly, never called
    return module is not None and is_linear(module) and not weight_only


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def bundle_key_files(bundle_dir: Path) -> dict[str, Path]:
    """Every safetensors key of a bundle's checkpoint → its shard (the index, else one pass over shards)."""
    index = bundle_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return {key: bundle_dir / shard for key, shard in weight_map.items()}
    files: dict[str, Path] = {}
    for file in sorted(bundle_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            files.update(dict.fromkeys(handle.keys(), file))
    return files


def read_bundle_tensor(files: dict[str, Path], key: str, what: str) -> torch.Tensor:
    """Tensor ``key`` from the shard ``files`` names (:func:`bundle_key_files`); BundleError naming the
    ``what`` transform when the bundle lacks it."""
    if key not in files:
        raise BundleError(f"{what} transform: tensor '{key}' is not in the bundle")
    with safe_open(str(files[key]), "pt") as handle:
        return handle.get_tensor(key)


def expected_key_changes(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys the standard class will report missing, keys it will report unexpected) for one split."""
    added = [params["digital"], params["analog"]]
    if params.get("bias"):
        added.append(f"{params['module']}.{ANALOG}.bias")
    return list(params["replaces"]), added


def like_module(model: nn.Module, name: str, what: str) -> dict[str, Any]:
    """``dtype``/``device`` keyword arguments matching module ``name``'s parameters (for a replacement of
    it); BundleError naming ``what`` transform when the model has no such module."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise BundleError(f"{what} transform: the loaded model has no module '{name}'") from None
    ref = next(iter(old.parameters()), None)
    if ref is None:
        return {"dtype": None, "device": None}
    return {"dtype": ref.dtype, "device": ref.device}


def load_hpd_split(model: nn.Module, entry: Any, bundle_dir: str | Path) -> None:
    """``TRANSFORM_LOADERS['hpd_split']``: rebuild the split module and load its factors from the bundle."""
    params = entry.params if hasattr(entry, "params") else entry["params"]
    folder = Path(bundle_dir)
    name = params["module"]
    split = HpdLinear(params["in_features"], params["out_features"], params["rank"], bool(params["bias"]),
                      **like_module(model, name, "HPD"))  # fmt: skip
    tensors = {"digital.weight": params["digital"], "analog.weight": params["analog"]}
    if params["bias"]:
        tensors["analog.bias"] = f"{name}.{ANALOG}.bias"
    files = bundle_key_files(folder)
    state = {local: read_bundle_tensor(files, key, "HPD") for local, key in tensors.items()}
    try:
        split.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"HPD transform on '{name}': {str(exc).splitlines()[0]}") from None
    if params.get("untied_lm_head"):
        model.config.tie_word_embeddings = False
    replace_module(model, name, split.eval())
