"""cimconvert: make Hugging Face language models deployable on analog compute-in-memory chips."""

from __future__ import annotations

__version__ = "0.1.0"

from cimconvert import hf_quantizer  # noqa: F401  registers the bundle loader with transformers
from cimconvert.errors import CimError

__all__ = ["CimError", "__version__"]
