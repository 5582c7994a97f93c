"""Registry of architecture adapters keyed by Hugging Face ``model_type``.

The bottom of :mod:`cimconvert.arch`: every adapter module imports :func:`register` from here and
registers its classes on import; the package ``__init__`` imports the adapter modules, so importing
anything from ``cimconvert.arch`` fills the registry. This module imports no adapter module (no cycle).
"""

from __future__ import annotations

from typing import Any, TypeVar

from cimconvert.arch.base import ArchAdapter
from cimconvert.errors import ModelInputError

_REGISTRY: dict[str, ArchAdapter] = {}

A = TypeVar("A", bound=type[ArchAdapter])


def register(cls: A) -> A:
    """Class decorator: register one instance of an adapter class under its ``model_type``."""
    if cls.model_type in _REGISTRY:
        raise ValueError(f"an adapter for model type '{cls.model_type}' is already registered")
    _REGISTRY[cls.model_type] = cls()
    return cls


def supported_types() -> list[str]:
    """All registered model types, sorted."""
    return sorted(_REGISTRY)


def get_adapter(model_type: str | Any) -> ArchAdapter:
    """The adapter for a ``model_type`` string, or for a config object / dict that carries one.

    Raises ModelInputError naming the supported types when none is registered.
    """
    if not isinstance(model_type, str):
        config = model_type
        model_type = (
            config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
        )
    adapter = _REGISTRY.get(model_type or "")
    if adapter is None:
        raise ModelInputError(
            f"unsupported model type '{model_type}' (supported: {', '.join(sorted(_REGISTRY))})"
        )
    return adapter

