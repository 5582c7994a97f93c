"""Robustness methods. Each lives in its own module or subpackage with one entry point and registers itself
with :func:`register_method` on import; importing this package imports every module in it, so a new method
is one new module here (and is then a ``--method`` and a recipe step) with no other edit.
"""

import importlib
import pkgutil

from cimconvert.methods.base import (
    AUTO,
    METHODS,
    Method,
    MethodOption,
    MethodResult,
    all_options,
    auto_steps,
    available_methods,
    check_family,
    option_values,
    register_method,
    resolve_method,
    set_auto_recipe,
    unknown_method,
)

__all__ = [
    "AUTO",
    "METHODS",
    "Method",
    "MethodOption",
    "MethodResult",
    "all_options",
    "auto_steps",
    "available_methods",
    "check_family",
    "option_values",
    "register_method",
    "resolve_method",
    "set_auto_recipe",
    "unknown_method",
]
from cimconvert.methods import hpd, placement_only, romer  # noqa: F401  (each registers itself)


def _import_all() -> list[str]:
    """Import (and so register) every module and subpackage of this package; returns their names."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


MODULES = _import_all()
