"""The built-in architecture adapters: every module of this package defines and registers some.

Each module imports :func:`cimconvert.arch.registry.register` and decorates its adapter classes with it;
importing this package imports every module in it, so a new architecture is one new module here and no
other edit. Modules are imported in name order (a module may import another one's base class).
"""

from __future__ import annotations

import importlib
import pkgutil


def _import_all() -> list[str]:
    """Import (and so register) every adapter module of this package; returns their names."""
    names = sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))
    for name in names:
        importlib.import_module(f"{__name__}.{name}")
    return names


MODULES = _import_all()
