"""Architecture adapters: one small declarative class per Hugging Face ``model_type``.

``get_adapter(model_type)`` returns the adapter whose :meth:`~cimconvert.arch.base.ArchAdapter.classify`
labels every tensor (in-memory parameter or on-disk key) with a kind and a layout, and which declares
everything else the generic code needs to know about the architecture (routing rule, export patches,
weight-only modules, on-disk expert layout, custom config loading);
:mod:`cimconvert.arch.loading` builds and loads models of the registered types without remote code.

Adding an architecture is one module in :mod:`cimconvert.arch.adapters` that defines and registers its
adapter (docs/INTERNALS.md, "Adding an architecture").
"""

from __future__ import annotations

# the adapter modules register their classes on import (registry.py is the bottom: no cycle)
from cimconvert.arch import adapters  # noqa: F401
from cimconvert.arch.base import ArchAdapter, ExpertKey, Family, Layout, MoeLayer
from cimconvert.arch.loading import build_model, load_config, load_model_class, load_pretrained
from cimconvert.arch.registry import get_adapter, register, supported_types

__all__ = [
    "ArchAdapter",
    "ExpertKey",
    "Family",
    "Layout",
    "MoeLayer",
    "build_model",
    "get_adapter",
    "load_config",
    "load_model_class",
    "load_pretrained",
    "register",
    "supported_types",
]
