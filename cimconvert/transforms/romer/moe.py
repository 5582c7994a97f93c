"""The MoE layers of a model with their routers and routing rules (what ROMER's transforms act on)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cimconvert.errors import CimError
from cimconvert.transforms.romer.routing import RoutingRule, rule_for


@dataclass
class MoeRouting:
    """The MoE layers of a model with their routers and routing rules."""

    layers: list[Any]
    rules: dict[int, RoutingRule]
    num_experts: int
    top_k: int

    @property
    def routers(self) -> dict[int, torch.nn.Module]:
        """Decoder-layer index → router module."""
        return {m.index: m.router for m in self.layers}

    def layer(self, index: int) -> Any:
        """The MoeLayer of decoder layer ``index``."""
        return next(m for m in self.layers if m.index == index)


def moe_routers(model: torch.nn.Module, adapter: Any) -> MoeRouting:
    """The model's MoE layers and routing rules; CimError for a dense model or a missing router."""
    if getattr(adapter, "family", None) != "moe":
        raise CimError(
            f"ROMER needs a mixture-of-experts model; '{adapter.model_type}' is a {adapter.family} model"
        )
    layers = list(adapter.moe_layers(model))
    if not layers:
        raise CimError(
            f"no MoE router found in the {adapter.model_type} model (expected "
            f"'{adapter.layers_path}.N.{adapter.moe_block}.{adapter.router}' beside fused experts)"
        )
    for m in layers:
        weight = getattr(m.router, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise CimError(f"router of MoE layer {m.index} ({type(m.router).__name__}) has no [E, H] weight")
    rules = {m.index: rule_for(adapter, model.config, m.router) for m in layers}
    first = rules[layers[0].index]
    return MoeRouting(layers, rules, first.num_experts, first.top_k)
