"""The recipes ``--method auto`` runs, per model family: the one place the defaults live.

Chosen from real-model measurements (benchmarks/robust.py, docs/ROBUSTNESS.md), never from the tiny
demo models: on SmolLM2-135M under chipA, keeping each analog linear layer's 5 % largest-activation input
channels digital and then folding per-channel output gains fitted across chip draws into the weights
was the best recipe measured within a 5 % digital budget. ``moe`` runs the same two steps (on the linear
layers and, per expert, on the fused experts): ROMER added after them measured no gain on the real MoE
build under chipA (exploration on WikiText-2 valid, ``benchmarks/robust_explore.py``), so it is not in
the default (docs/ROMER.md). SSMs keep HPD on the last block's ``out_proj``: no
real SSM checkpoint was measured (see ROBUSTNESS.md).

Steps that fit on calibration text need the model's tokenizer; ``auto`` skips them for a checkpoint
without one (``calibration_free``) and says so.
"""

from __future__ import annotations

from typing import Any

from cimconvert.methods.base import METHODS, set_auto_recipe

#: Share of each analog linear layer's input channels the default keeps digital (percent).
DEFAULT_OUTLIER_PERCENT = 5.0
#: Calibration windows (of 256 tokens) the default steps use: 2048 tokens give each channel's maximum
#: and (× 2 draws) each channel's gain from 4096 outputs, and cost a quarter of the 32-window default.
CORRECTION_SAMPLES = 8
DENSE: list[dict[str, Any]] = [
    {"step": "outlier_channels",
     "options": {"outlier_percent": DEFAULT_OUTLIER_PERCENT, "calib_samples": CORRECTION_SAMPLES}},
    {"step": "output_correction", "options": {"calib_samples": CORRECTION_SAMPLES}},
]
MOE: list[dict[str, Any]] = list(DENSE)
SSM: list[dict[str, Any]] = [{"step": "hpd"}]

set_auto_recipe("dense", DENSE)
set_auto_recipe("moe", MOE)
set_auto_recipe("ssm", SSM)


def needs_text(step: str) -> bool:
    """Whether a registered step fits something on calibration text (it declares ``calib_data``)."""
    method = METHODS.get(step)
    return method is not None and any(opt.name == "calib_data" for opt in method.options)


def calibration_free(steps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """(the steps that need no calibration text, the names of those dropped)."""
    kept = [s for s in steps if not needs_text(s["step"])]
    return kept, [s["step"] for s in steps if needs_text(s["step"])]
