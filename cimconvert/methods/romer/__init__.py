"""ROMER: expert replacement and router calibration for MoE LLMs on analog CIM (arXiv 2605.11800).

Importing this package registers the ``romer`` method (``--method auto`` picks it for MoE models) and
the ``romer_replacement`` / ``romer_routing`` bundle transform loaders. Modules: :mod:`.routing` (stock
top-k rules), :mod:`.hook` (digital routing hook), :mod:`.stats` (router statistics), :mod:`.replacement`,
:mod:`.calibrate` (fits), :mod:`.core` (planning/installing), :mod:`.method`, :mod:`.loader`.
"""

from cimconvert.methods.base import register_method
from cimconvert.methods.romer.core import (
    CalibrationStats,
    MoeRouting,
    RomerConfig,
    RomerPlan,
    build_plan,
    calibration_stats,
    install,
    moe_routers,
)
from cimconvert.methods.romer.hook import LayerRouting, install_hook, remove_hook
from cimconvert.methods.romer.loader import REPLACEMENT_TYPE, ROUTING_TYPE, load_replacement, load_routing
from cimconvert.methods.romer.method import METHOD, OPTIONS, RomerMethod
from cimconvert.methods.romer.routing import RoutingRule, route
from cimconvert.methods.romer.stats import RouterStats, collect, load_router_logits, save_router_logits


def _register_loaders() -> None:
    """Add the bundle loaders (the bundle package may be absent in a partial checkout)."""
    try:
        from cimconvert.methods.romer.loader import register_loaders
    except ImportError:  # pragma: no cover
        return
    try:
        register_loaders()
    except ImportError:  # pragma: no cover - bundle package not installed
        return


register_method(METHOD, auto_for=("moe",))
_register_loaders()

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
    "remove_hook",
    "route",
    "save_router_logits",
]
