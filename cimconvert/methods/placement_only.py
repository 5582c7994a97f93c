"""Placement-only recipe steps: ``keep_digital`` and ``keep_analog`` change no weight, only where tensors run.

Each takes ``patterns`` (the ``--digital`` / ``--analog`` syntax: exact name, ``re:REGEX`` or a plain
regex, a split layer's name selecting its analog factor) and returns them as ``MethodResult.digital`` /
``analog``; the recipe runner adds them to the placement overrides, and a pattern that matches no tensor
of the model as it is at that step is an error naming it. They apply to every family.
"""

from __future__ import annotations

from typing import Any, get_args

from torch import nn

from cimconvert.arch import Family
from cimconvert.errors import CimError
from cimconvert.layerwise.steps import FixedStep
from cimconvert.methods.base import MethodOption, MethodResult, register_layerwise, register_method
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile


class PlacementStep:
    """A recipe step that forces tensors onto one unit (``unit``), leaving the weights untouched."""

    options = (
        MethodOption(
            "patterns",
            str,
            (),
            "keep_digital / keep_analog: tensors to place on that unit, exact name or regex (repeatable)",
            multiple=True,
        ),
    )
    families: tuple[str, ...] = get_args(Family)  # every family

    def __init__(self, unit: str) -> None:
        self.unit = unit
        self.name = f"keep_{unit}"

    def apply(self, model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Placement | None = None) -> MethodResult:  # fmt: skip
        """Return the ``patterns`` option as this unit's placement patterns (the model is not touched)."""
        patterns = [str(p) for p in options.get("patterns") or ()]
        if not patterns:
            raise CimError(f"{self.name}: option 'patterns' names no tensor")
        report = {"method": self.name, "unit": self.unit, "patterns": patterns,
                  "summary": f"placed {', '.join(patterns)} on the {self.unit} unit (the model is unchanged)"}
        if self.unit == "digital":
            return MethodResult(report=report, digital=patterns)
        return MethodResult(report=report, analog=patterns)


def placement_layer_step(step: PlacementStep) -> Any:
    """The layer-step factory of a placement step (the patterns are checked like ``apply`` checks them)."""

    def factory(lw: Any, profile: ChipProfile, options: dict[str, Any],
                placement: Placement | None = None) -> FixedStep:  # fmt: skip
        return FixedStep(step.apply(lw.model, lw.adapter, profile, options), step.name)

    return factory


KEEP_DIGITAL = register_method(PlacementStep("digital"))
KEEP_ANALOG = register_method(PlacementStep("analog"))
register_layerwise(KEEP_DIGITAL.name, placement_layer_step(KEEP_DIGITAL))
register_layerwise(KEEP_ANALOG.name, placement_layer_step(KEEP_ANALOG))
