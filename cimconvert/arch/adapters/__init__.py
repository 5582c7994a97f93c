"""The built-in architecture adapters: every module of this package defines and registers some.

Each module imports :func:`cimconvert.arch.registry.register` and decorates its adapter classes with it;
importing this package imports every module in it, so a new architecture is one new module here and no
other edit. Modules are imported in name order (a module may import another one's base class).
"""

from __future__ import annotations

from cimconvert.plugins import import_submodules

#: the adapter modules, imported (and so registered) in name order
MODULES = import_submodules(__name__, __path__)
