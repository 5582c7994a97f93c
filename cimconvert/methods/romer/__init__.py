"""ROMER: expert replacement and router calibration for MoE LLMs on analog CIM (arXiv 2605.11800).

Importing this package registers the ``romer`` method (``--method auto`` picks it for MoE models).
Modules: :mod:`.stats` (router statistics), :mod:`.calibrate` (fits), :mod:`.core` (planning/installing),
:mod:`.method`. What ROMER puts into a model (stock top-k rules, the digital routing hook, expert copies,
the MoE layer discovery and the bundle loaders of ``romer_replacement`` / ``romer_routing``) lives in
:mod:`cimconvert.transforms.romer`, below both the methods and the bundle reader.
"""

from cimconvert.methods.base import register_layerwise, register_method
from cimconvert.methods.romer.core import (
    CalibrationStats,
    RomerConfig,
    RomerPlan,
    build_plan,
    calibration_stats,
    install,
)
from cimconvert.methods.romer.layerwise import romer_layer_step
from cimconvert.methods.romer.method import METHOD, OPTIONS, RomerMethod, plan_transforms
from cimconvert.methods.romer.stats import RouterStats, collect, load_router_logits, save_router_logits
from cimconvert.transforms.romer.hook import LayerRouting, install_hook, remove_hook
from cimconvert.transforms.romer.loader import REPLACEMENT_TYPE, ROUTING_TYPE, load_replacement, load_routing
from cimconvert.transforms.romer.moe import MoeRouting, moe_routers
from cimconvert.transforms.romer.routing import RoutingRule, route

register_method(METHOD)
register_layerwise(METHOD.name, romer_layer_step)

__all__ = [
    "METHOD",
    "OPTIONS",
    "REPLACEMENT_TYPE",
    "ROUTING_TYPE",
    "CalibrationStats",
    "LayerRouting",
    "MoeRouting",
    "RomerConfig",
    "RomerMethod",
    "RomerPlan",
    "RouterStats",
    "RoutingRule",
    "build_plan",
    "calibration_stats",
    "collect",
    "install",
    "install_hook",
    "load_replacement",
    "load_router_logits",
    "load_routing",
    "moe_routers",
    "plan_transforms",
    "remove_hook",
    "route",
    "save_router_logits",
]
