"""Robustness methods. Each lives in its own module or subpackage with one entry point and registers itself
with :func:`register_method` on import; importing this package imports every module in it, so a new method
is one new module here (and is then a ``--method`` and a recipe step) with no other edit.
"""

from cimconvert.methods.base import (
    AUTO,
    LAYERWISE,
    METHODS,
    Method,
    MethodOption,
    MethodResult,
    all_options,
    auto_steps,
    available_methods,
    check_family,
    option_values,
    register_layerwise,
    register_method,
    resolve_method,
    set_auto_recipe,
    unknown_method,
)

__all__ = [
    "AUTO",
    "LAYERWISE",
    "METHODS",
    "Method",
    "MethodOption",
    "MethodResult",
    "all_options",
    "auto_steps",
    "available_methods",
    "check_family",
    "option_values",
    "register_layerwise",
    "register_method",
    "resolve_method",
    "set_auto_recipe",
    "unknown_method",
]
from cimconvert.methods import hpd, outliers, placement_only, romer  # noqa: F401  (each registers itself)
from cimconvert.plugins import import_submodules

#: every module of the package, imported (and so registered) in name order: a new method needs no edit here
MODULES = import_submodules(__name__, __path__)
