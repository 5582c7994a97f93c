"""Finite results: every figure a command reports is a finite number, and its JSON is valid JSON.

``json.dumps`` writes ``NaN``/``Infinity`` by default, which no strict JSON parser accepts; results go
through :func:`dumps` (``allow_nan=False``), and :func:`require_finite` turns a non-finite figure into
one :class:`~cimconvert.errors.CimError` line naming the field.
"""

from __future__ import annotations

import json
import math
from typing import Any

from cimconvert.errors import CimError


def first_non_finite(value: Any, path: str = "") -> tuple[str, float] | None:
    """``(path, value)`` of the first NaN/±Inf float inside nested dicts, lists and tuples, else None."""
    if isinstance(value, float):
        return None if math.isfinite(value) else (path or "(value)", value)
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub_path, sub in items:
        found = first_non_finite(sub, sub_path)
        if found is not None:
            return found
    return None


def require_finite(value: Any, what: str) -> Any:
    """Return ``value`` unchanged, or raise CimError naming the first non-finite field of ``what``."""
    found = first_non_finite(value)
    if found is not None:
        raise CimError(f"{what}: {found[0]} is {found[1]} (not a finite number)")
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text (``allow_nan=False``; other objects through ``str``); a NaN/Inf is a CimError."""
    require_finite(value, "result")
    return json.dumps(value, allow_nan=False, default=str, **kwargs)


def nulls_for_non_finite(value: Any) -> Any:
    """A copy with every NaN/±Inf float replaced by None (JSON null), for reports that mark a FAIL."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: nulls_for_non_finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [nulls_for_non_finite(v) for v in value]
    return value
