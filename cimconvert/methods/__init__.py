"""Robustness methods. Each lives in its own subpackage with one entry point and registers itself here."""

from cimconvert.methods.base import (
    AUTO,
    METHODS,
    Method,
    MethodOption,
    MethodResult,
    all_options,
    available_methods,
    option_values,
    register_method,
    resolve_method,
)

__all__ = [
    "AUTO",
    "METHODS",
    "Method",
    "MethodOption",
    "MethodResult",
    "all_options",
    "available_methods",
    "option_values",
    "register_method",
    "resolve_method",
]
from cimconvert.methods import hpd, outliers, romer  # noqa: F401  (each registers itself and its bundle loaders)
