"""The contract between the conversion pipeline and a robustness method.

A method is a self-contained module with one entry point, ``apply``: it receives the in-memory HF model,
its architecture adapter and the chip profile, transforms the model in place, and returns the manifest
``transforms`` entries that describe what it did (and that ``load_bundle`` re-applies), plus a report of
what it measured. The pipeline calls methods; methods never call each other. Methods declare their
options as data so the CLI builds its flags from the registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from cimconvert.errors import CimError
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

    @property
    def flag(self) -> str:
        """The command-line flag, e.g. ``calib_samples`` → ``--calib-samples``."""
        return "--" + self.name.replace("_", "-")


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
              progress: bool = True) -> MethodResult:  # fmt: skip
        """Transform ``model`` in place for ``profile``; return what was done."""
        ...


METHODS: dict[str, Method] = {}
#: Model family → the method ``--method auto`` picks.
AUTO: dict[str, str] = {}


def register_method(method: Method, auto_for: tuple[str, ...] = ()) -> Method:
    """Add a method to the registry; ``auto_for`` lists the families for which ``auto`` selects it."""
    METHODS[method.name] = method
    for family in auto_for:
        AUTO[family] = method.name
    return method


def available_methods() -> list[str]:
    """Names accepted by ``--method``."""
    return ["auto", "none", *sorted(METHODS)]


def resolve_method(name: str, family: str) -> str:
    """Resolve ``auto`` for a model family and check that the method applies to it."""
    if name == "auto":
        return AUTO.get(family, "none")
    if name == "none":
        return name
    if name not in METHODS:
        raise CimError(f"unknown method '{name}' (available: {', '.join(available_methods())})")
    method = METHODS[name]
    if family not in method.families:
        raise CimError(
            f"method '{name}' applies to {'/'.join(method.families)} models, not to a {family} model"
        )
    return name


def all_options() -> list[MethodOption]:
    """Every registered method's options (a flag declared by two methods appears once)."""
    seen: dict[str, MethodOption] = {}
    for method in METHODS.values():
        for opt in method.options:
            seen.setdefault(opt.name, opt)
    return list(seen.values())


def option_values(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``method`` with defaults filled in from ``given`` (CLI or API kwargs)."""
    if method not in METHODS:
        return {}
    return {opt.name: given.get(opt.name, opt.default) for opt in METHODS[method].options}


ProgressFn = Callable[[str], None]
