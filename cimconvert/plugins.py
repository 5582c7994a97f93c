"""Self-registering packages: import every module of a package so that each registers what it defines.

Used by ``arch/adapters`` (one module per architecture) and ``methods`` (one module per method): adding
one is one new module, with no import list to edit. Imports nothing of cimconvert.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable


def import_submodules(package: str, path: Iterable[str]) -> list[str]:
    """Import every module and subpackage of ``package`` (its ``__path__`` is ``path``) in name order,
    skipping ``_private`` ones; returns their names."""
    names = sorted(info.name for info in pkgutil.iter_modules(path) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return names
