"""The contract between the conversion pipeline and a robustness method.

A method is a self-contained module with one entry point, ``apply``: it receives the in-memory HF model,
its architecture adapter and the chip profile, transforms the model in place, and returns the manifest
``transforms`` entries that describe what it did (and that ``load_bundle`` re-applies), plus a report of
what it measured. The pipeline calls methods; methods never call each other. Methods declare their
options as data so the CLI builds its flags from the registry.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cimconvert.errors import CimError
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile


@dataclass(frozen=True)
class MethodOption:
    """One method option; the CLI exposes it as ``--<flag>`` (underscores become dashes)."""

    name: str
    type: type
    default: Any
    help: str
    multiple: bool = False
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``calib_samples`` → ``--calib-samples``."""
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, where: str) -> Any:
        """``value`` checked against the declared type, choices and range (a list → tuple when
        ``multiple``); ``where`` prefixes the one-line CimError (e.g. ``recipe step 1 (hpd)``)."""
        if self.multiple:
            items = [value] if isinstance(value, str | int | float) else value
            if not isinstance(items, list | tuple):
                raise CimError(f"{where}: option '{self.name}' expects a list of {self.type.__name__}")
            return tuple(self._check_one(item, where) for item in items)
        return self._check_one(value, where)

    def _check_one(self, value: Any, where: str) -> Any:
        """One scalar value checked (see :meth:`check`)."""
        if value is None and self.default is None:
            return None
        typed = _typed(value, self.type)
        if typed is None:
            raise CimError(f"{where}: option '{self.name}' expects a {self.type.__name__}, got {value!r}")
        value = typed
        if self.choices is not None and value not in self.choices:
            raise CimError(f"{where}: option '{self.name}' must be one of {', '.join(self.choices)} "
                           f"(got {value!r})")  # fmt: skip
        if self.minimum is not None and value < self.minimum:
            raise CimError(f"{where}: option '{self.name}' must be >= {self.minimum:g} (got {value})")
        if self.maximum is not None and value > self.maximum:
            raise CimError(f"{where}: option '{self.name}' must be <= {self.maximum:g} (got {value})")
        return value


def _typed(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` when it is one (an int is a float; a bool is neither), else None."""
    if isinstance(value, bool):
        return value if kind is bool else None
    if kind is float and isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return value if isinstance(value, kind) and kind is not float else None


@dataclass
class MethodResult:
    """What a method did: manifest transform entries, seeds it drew, and measurements for the report.

    ``analog`` / ``digital`` name tensors the method intends for a unit (e.g. HPD's analog factor of an
    LM head, whose kind is digital by default); the pipeline adds them to the placement overrides.
    """

    transforms: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)
    analog: list[str] = field(default_factory=list)
    digital: list[str] = field(default_factory=list)


class Method(Protocol):
    """A robustness method (ROMER, HPD, ...)."""

    name: str
    families: tuple[str, ...]
    options: tuple[MethodOption, ...]

    def apply(self, model: torch.nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Placement | None = None) -> MethodResult:  # fmt: skip
        """Transform ``model`` in place for ``profile``; return what was done.

        ``placement``: the conversion's placement of the checkpoint ``model`` was loaded from (mapped
        onto the model with ``placement.model_placement``); None when a method is called on its own.
        """
        ...


METHODS: dict[str, Method] = {}
#: Model family → the steps of the recipe ``--method auto`` runs for it (``{"step": name, "options": {...}}``
#: each, in order). The one place the default recipes live: ``register_method(..., auto_for=...)`` sets a
#: one-step default, :func:`set_auto_recipe` any other.
AUTO: dict[str, list[dict[str, Any]]] = {}
#: Method name → its layer-step factory ``fn(lw, profile, options, placement=)`` → a
#: ``cimconvert.layerwise.steps.LayerStep``, for models larger than memory (``recipe.run_recipe_layerwise``
#: runs every step of a recipe in one pass); a method without one runs on the whole in-memory model only.
LAYERWISE: dict[str, Callable[..., Any]] = {}


def register_layerwise(name: str, factory: Callable[..., Any]) -> None:
    """Register the layer-step factory of method ``name`` (see :data:`LAYERWISE`)."""
    LAYERWISE[name] = factory


def register_method(method: Method, auto_for: tuple[str, ...] = ()) -> Method:
    """Add a method to the registry; ``auto_for`` lists the families whose ``auto`` recipe is this method
    alone (with its default options)."""
    METHODS[method.name] = method
    for family in auto_for:
        set_auto_recipe(family, [{"step": method.name}])
    return method


def set_auto_recipe(family: str, steps: list[dict[str, Any]]) -> None:
    """Make ``steps`` (``{"step": name, "options": {...}, "seed": int|None}`` each) the ``auto`` recipe of
    ``family``; an empty list means no method."""
    AUTO[family] = [dict(step) for step in steps]


def auto_steps(family: str) -> list[dict[str, Any]]:
    """The steps ``--method auto`` runs for ``family`` (a copy; empty: none)."""
    return [dict(step) for step in AUTO.get(family, [])]


def available_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return ["auto", "none", *sorted(METHODS)]


def unknown_method(name: str, what: str = "method") -> CimError:
    """The one-line error for a name that is no registered method."""
    return CimError(f"unknown {what} '{name}' (available: {', '.join(sorted(METHODS))})")


def check_family(name: str, family: str, where: str = "") -> None:
    """CimError when method ``name`` does not apply to a model of ``family`` (``where`` prefixes it)."""
    method = METHODS[name]
    if family not in method.families:
        families = "/".join(method.families)
        prefix = f"{where}: " if where else ""
        raise CimError(f"{prefix}method '{name}' applies to {families} models, not to a {family} model")


def resolve_method(name: str, family: str) -> str:
    """Resolve ``auto`` for a model family (its default steps joined by ``+``; ``none`` when empty) and
    check that a named method applies to it."""
    if name == "auto":
        return "+".join(step["step"] for step in auto_steps(family)) or "none"
    if name == "none":
        return name
    if name not in METHODS:
        raise CimError(f"unknown method '{name}' (available: {', '.join(available_methods())})")
    check_family(name, family)
    return name


def all_options() -> list[MethodOption]:
    """Every registered method's options (a flag declared by two methods appears once)."""
    seen: dict[str, MethodOption] = {}
    for method in METHODS.values():
        for opt in method.options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def option_values(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``method`` with defaults filled in from ``given`` (CLI or API kwargs), each given
    value checked (:meth:`MethodOption.check`); keys of other methods' options are ignored."""
    if method not in METHODS:
        return {}
    return {
        opt.name: opt.check(given[opt.name], f"--method {method}") if opt.name in given else opt.default
        for opt in METHODS[method].options
    }


ProgressFn = Callable[[str], None]
