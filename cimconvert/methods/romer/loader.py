"""Manifest transform entries of ROMER and the loaders that re-apply them on ``load_bundle``.

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
from typing import TYPE_CHECKING, Any

import torch

from cimconvert.errors import BundleError
from cimconvert.methods.romer import replacement
from cimconvert.methods.romer.hook import LayerRouting, install_hook

if TYPE_CHECKING:
    from cimconvert.methods.romer.core import MoeRouting, RomerPlan

REPLACEMENT_TYPE = "romer_replacement"
ROUTING_TYPE = "romer_routing"


def plan_transforms(plan: RomerPlan, moe: MoeRouting, adapter: Any) -> list[dict[str, Any]]:
    """The manifest ``transforms`` entries describing ``plan`` (empty parts are omitted)."""
    entries: list[dict[str, Any]] = []
    copies = [{"layer": i, "pairs": pairs} for i, pairs in sorted(plan.pairs.items()) if pairs]
    if copies:
        targets = [
            f"{moe.layer(c['layer']).path}.{adapter.experts}.{name}"
            for c in copies
            for name in (adapter.fused_gate_up, adapter.fused_down)
        ]
        entries.append({
            "id": "romer-replacement", "type": REPLACEMENT_TYPE,
            "params": {"mode": plan.replacement, "layers": copies}, "targets": targets,
        })  # fmt: skip
    routing = [spec for _, spec in sorted(plan.routing.items()) if not spec.is_identity]
    if routing:
        entries.append({
            "id": "romer-routing", "type": ROUTING_TYPE,
            "params": {
                "layers": [spec.to_dict() for spec in routing],
                "rules": {str(s.layer): moe.rules[s.layer].to_dict() for s in routing},
            },
            "targets": [f"{moe.layer(s.layer).path}.{adapter.router}.weight" for s in routing],
        })  # fmt: skip
    return entries


def _params(entry: Any) -> dict[str, Any]:
    return entry["params"] if isinstance(entry, dict) else entry.params


def _moe(model: torch.nn.Module) -> MoeRouting:
    from cimconvert.arch import get_adapter
    from cimconvert.methods.romer.core import moe_routers

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


def register_loaders() -> None:
    """Register both loaders in ``cimconvert.bundle.reader.TRANSFORM_LOADERS``."""
    from cimconvert.bundle.reader import TRANSFORM_LOADERS

    TRANSFORM_LOADERS[REPLACEMENT_TYPE] = load_replacement
    TRANSFORM_LOADERS[ROUTING_TYPE] = load_routing
