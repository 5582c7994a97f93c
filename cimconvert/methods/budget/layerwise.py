"""The digital budget layer by layer: a placement step whose quick scan runs layer by layer first.

The choice is :func:`~cimconvert.methods.budget.method.budget_result`'s, on the skeleton; without
``--budget-scan`` the quick scan runs one decoder layer at a time (:mod:`cimconvert.layerwise.scan`,
the same numbers as the whole-model scan) before the recipe's pass. The chosen tensors join the placement
like a ``keep_digital`` step's patterns (:class:`~cimconvert.layerwise.steps.FixedStep`).
"""

from __future__ import annotations

from typing import Any

from cimconvert.layerwise.scan import layerwise_perplexities, refuse_scan_after_changes
from cimconvert.layerwise.skeleton import LayerwiseModel
from cimconvert.layerwise.steps import FixedStep
from cimconvert.methods.budget.method import NAME, budget_result
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile


def budget_layer_step(lw: LayerwiseModel, profile: ChipProfile, options: dict[str, Any],
                      placement: Placement | None = None) -> FixedStep:  # fmt: skip
    """The digital budget's layer step (its scan, when none is given, runs layer by layer now)."""
    runner = None
    if not options.get("budget_scan"):
        refuse_scan_after_changes(options, NAME, "--budget-scan")
        runner = layerwise_perplexities(lw, profile)
    result = budget_result(lw.model, lw.adapter, profile, options, placement, progress=False,
                           perplexities=runner)  # fmt: skip
    return FixedStep(result, NAME)


__all__ = ["budget_layer_step"]
