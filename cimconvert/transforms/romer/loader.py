"""ROMER's manifest transform entries and the loaders that re-apply them on ``load_bundle``.

Two entry types, each self-contained (JSON params only):

* ``romer_replacement``: ``params = {"mode", "layers": [{"layer": i, "pairs": [[dst, src], ...]}]}``;
  ``targets`` are the fused expert tensors. The converted checkpoint already holds the copies (written
  by ``save_pretrained``); the loader copies again, which is idempotent and also restores them when
  the weights come from elsewhere.
* ``romer_routing``: ``params = {"layers": [LayerRouting dicts], "rules": {i: RoutingRule}}``;
  ``targets`` are the router weights. The loader installs the digital routing hook on each router.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from cimconvert.arch import get_adapter
from cimconvert.errors import BundleError
from cimconvert.transforms.romer import replacement
from cimconvert.transforms.romer.hook import LayerRouting, install_hook
from cimconvert.transforms.romer.moe import MoeRouting, moe_routers

REPLACEMENT_TYPE = "romer_replacement"
ROUTING_TYPE = "romer_routing"


def _params(entry: Any) -> dict[str, Any]:
    return entry["params"] if isinstance(entry, dict) else entry.params


def _moe(model: torch.nn.Module) -> MoeRouting:
    return moe_routers(model, get_adapter(model.config.model_type))


def _layer(moe: MoeRouting, index: int, what: str) -> Any:
    if index not in moe.routers:
        raise BundleError(f"{what}: the model has no MoE layer {index}")
    return moe.layer(index)


def load_replacement(model: torch.nn.Module, entry: Any, bundle_dir: Path | None = None) -> None:
    """Re-apply the expert copies of a ``romer_replacement`` entry (idempotent)."""
    moe = _moe(model)
    for layer in _params(entry)["layers"]:
        replacement.copy_experts(_layer(moe, int(layer["layer"]), REPLACEMENT_TYPE).experts, layer["pairs"])


def load_routing(model: torch.nn.Module, entry: Any, bundle_dir: Path | None = None) -> None:
    """Install the routing hooks of a ``romer_routing`` entry on the model's routers."""
    moe = _moe(model)
    for data in _params(entry)["layers"]:
        spec = LayerRouting.from_dict(dict(data))
        if spec.num_experts != moe.num_experts:
            raise BundleError(
                f"{ROUTING_TYPE}: layer {spec.layer} has {moe.num_experts} experts, not {spec.num_experts}"
            )
        install_hook(_layer(moe, spec.layer, ROUTING_TYPE).router, spec, moe.rules[spec.layer])
