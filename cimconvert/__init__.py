"""cimconvert: make Hugging Face language models deployable on analog compute-in-memory chips.

The public API is importable from the package itself: ``cimconvert.convert``, ``evaluate``,
``load_bundle``, ``inspect``, ``validate``, ``analyze`` and ``finetune`` (and the ``cimconvert.api``
module: ``profiles``, ``show_profile``, ``recipe_of``, ...). Every function returns plain JSON-ready dicts
(docs/JSON.md) and raises :class:`CimError` (one line) on bad input.
"""

from __future__ import annotations

__version__ = "0.1.0"

# The version is set first: modules imported below read it (bundle producer, ONNX metadata).
from cimconvert import (
    api,
    hf_quantizer,  # noqa: F401  registers the bundle loader with transformers
)
from cimconvert.analysis import analyze
from cimconvert.api import convert, evaluate, inspect, load_bundle
from cimconvert.errors import CimError
from cimconvert.finetune import finetune
from cimconvert.validate import validate

__all__ = [
    "CimError",
    "__version__",
    "analyze",
    "api",
    "convert",
    "evaluate",
    "finetune",
    "inspect",
    "load_bundle",
    "validate",
]
