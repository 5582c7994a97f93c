"""The ``outlier_channels`` method: calibration maxima per input channel, the split, its manifest entry.

Why it helps (measured on SmolLM2-135M, docs/ROBUSTNESS.md): the chip scales every input vector by its
largest entry before the DAC (noise management), so a handful of channels whose activations are 10–100×
the median leave the other channels a few DAC steps each, and the analog output sits close to the output
noise and the ADC step. Running those channels digitally lets the crossbar see a well-scaled input.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cimconvert.devices import to_model_device
from cimconvert.errors import CimError
from cimconvert.methods.base import MethodOption, MethodResult
from cimconvert.methods.calibration import (
    CALIB_BATCH_SIZE,
    analog_parts,
    calibration_options,
    calibration_tokens,
    iter_batches,
)
from cimconvert.methods.outliers.experts import observe_expert_maxima, split_expert_outliers
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile
from cimconvert.transforms import experts_inputs
from cimconvert.transforms.hpd_split import replace_module
from cimconvert.transforms.outlier_split import (
    ANALOG,
    DIGITAL,
    TRANSFORM_TYPE,
    OutlierSplitLinear,
    layer_params,
)

LOGGER = logging.getLogger(__name__)

DEFAULT_PERCENT = 3.0
#: Largest share of a layer's input channels the method moves (beyond it, keep the layer digital).
MAX_PERCENT = 50.0
#: Which analog matmuls get digital outlier channels: ``all`` (linear layers and fused experts) or ``linear``.
SCOPES = ("all", "linear")


@contextmanager
def recording_maxima(model: nn.Module, layers: Sequence[str],
                     maxima: dict[str, torch.Tensor]) -> Iterator[None]:  # fmt: skip
    """While open, ``maxima[name]`` keeps max |x_j| over every input the linear layer ``name`` sees."""

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            seen = x.reshape(-1, x.shape[-1]).abs().amax(0).float()
            maxima[name] = torch.maximum(maxima[name], seen) if name in maxima else seen

        return hook

    handles = [model.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_maxima(layers: Sequence[str], maxima: dict[str, torch.Tensor]) -> None:
    """CimError naming the first layer of ``layers`` the calibration text never reached."""
    missing = [name for name in layers if name not in maxima]
    if missing:
        raise CimError(f"outlier_channels: layer '{missing[0]}' never ran on the calibration text")


@torch.no_grad()
def channel_maxima(model: nn.Module, layers: Sequence[str], tokens: torch.Tensor,
                  batch_size: int = CALIB_BATCH_SIZE):  # fmt: skip
    """max |x_j| over the calibration ``tokens`` for every input channel j of each layer in ``layers``."""
    maxima: dict[str, torch.Tensor] = {}
    model.eval()
    with recording_maxima(model, layers, maxima):
        for batch in iter_batches(tokens, batch_size):
            model(input_ids=to_model_device(batch, model), use_cache=False)
    check_maxima(layers, maxima)
    return maxima


def channels_for(in_features: int, percent: float) -> int:
    """How many input channels ``percent`` % of ``in_features`` keeps digital: rounded down (at least one),
    so the digital share stays within ``percent`` (5 % of 576 → 28, 4.86 %) except where one channel is
    already more than ``percent`` of the layer."""
    return max(1, math.floor(percent / 100.0 * in_features + 1e-9))


def split_outliers(
    model: nn.Module, maxima: dict[str, torch.Tensor], percent: float
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split every layer of ``maxima`` in place (its top ``percent`` % channels digital).

    Returns (manifest layer params, report rows).
    """
    layers, rows = [], []
    for name, channel_max in maxima.items():
        linear = model.get_submodule(name)
        k = channels_for(linear.in_features, percent)
        top = torch.topk(channel_max, k).indices.tolist()
        split = OutlierSplitLinear.from_linear(linear, top)
        replace_module(model, name, split)
        layers.append(layer_params(name, split))
        kept = channel_max[split.analog_index]
        rows.append({
            "layer": name,
            "digital_channels": k,
            "in_features": linear.in_features,
            "digital_macs_per_token": k * linear.out_features,
            "digital_extra_bytes": k * linear.out_features * linear.weight.element_size(),
            "analog_macs_per_token": (linear.in_features - k) * linear.out_features,
            "input_max_before": float(channel_max.max()),
            "input_max_after": float(kept.max()),
            "input_median": float(channel_max.median()),
        })  # fmt: skip
    return layers, rows


def checked_percent(options: dict[str, Any]) -> float:
    """``outlier_percent`` (CimError outside (0, MAX_PERCENT])."""
    percent = float(options.get("outlier_percent", DEFAULT_PERCENT))
    if not 0.0 < percent <= MAX_PERCENT:
        raise CimError(f"--outlier-percent must be in (0, {MAX_PERCENT:g}] (got {percent:g})")
    return percent


def split_targets(model: nn.Module, profile: ChipProfile, placement: Placement | None,
                  options: dict[str, Any]) -> tuple[list[str], list[Any]]:  # fmt: skip
    """(analog linear layers, analog fused experts tensors) the split covers (``outlier_scope``); CimError
    when there is none."""
    layers, experts = analog_parts(model, profile, placement)
    if options.get("outlier_scope", SCOPES[0]) != "all":
        experts = []
    if not layers and not experts:
        raise CimError("outlier_channels: the model has no analog linear layer or fused experts to split")
    return layers, experts


def outlier_report(rows: list[dict[str, Any]], percent: float, tokens: torch.Tensor) -> dict[str, Any]:
    digital = sum(r["digital_macs_per_token"] for r in rows)
    total = digital + sum(r["analog_macs_per_token"] for r in rows)
    ratios = [r["input_max_before"] / max(r["input_max_after"], 1e-30) for r in rows]
    share = 100.0 * digital / total if total else 0.0
    median = float(torch.tensor(ratios).median()) if ratios else 1.0
    return {
        "summary": f"{percent:g} % of the input channels of {len(rows)} layers digital ({share:.2f} % of "
                   f"their MACs); the analog input range shrank {median:.2f}x (median)",
        "method": "outlier_channels",
        "percent": percent,
        "layers": len(rows),
        "calibration_tokens": int(tokens.numel()),
        "digital_macs_per_token": digital,
        "digital_extra_bytes": sum(r["digital_extra_bytes"] for r in rows),
        "split_layers_macs_per_token": total,
        "digital_share_of_split_layers_pct": share,
        "median_input_range_reduction": median,
        "rows": rows,
    }


class OutlierChannelsMethod:
    """Keep each analog linear layer's largest-activation input channels digital (exact split)."""

    name = "outlier_channels"
    families: tuple[str, ...] = ("dense", "moe", "ssm")
    options = (
        MethodOption(
            "outlier_percent", float, DEFAULT_PERCENT,
            "outlier_channels: % of each analog linear layer's input channels kept digital (those with the "
            "largest calibration activations)",
        ),
        MethodOption(
            "outlier_scope", str, SCOPES[0],
            "outlier_channels: which analog matmuls get digital outlier channels (all: linear layers and "
            "fused experts, per expert; linear: linear layers only)", choices=SCOPES,
        ),
        *calibration_options(),
    )  # fmt: skip

    def apply(self, model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Placement | None = None) -> MethodResult:  # fmt: skip
        """Measure the calibration maxima of every analog linear layer (and fused experts tensor) and split
        off its outlier channels."""
        percent = checked_percent(options)
        layers, experts = split_targets(model, profile, placement, options)
        tokens = calibration_tokens(model, options)
        if progress:
            LOGGER.info("outlier_channels: calibration maxima of %d layers and %d fused experts tensors "
                        "on %d tokens", len(layers), len(experts), tokens.numel())
        observing, expert_maxima = observe_expert_maxima(model, experts)
        with observing:
            maxima = channel_maxima(model, layers, tokens)
        params, rows = split_outliers(model, maxima, percent)
        top_k = adapter.top_k(model.config) if experts else 0
        expert_params, expert_rows = split_expert_outliers(
            model, experts, expert_maxima.result(), lambda n: channels_for(n, percent), top_k
        )
        return MethodResult(
            transforms=outlier_entries(params, expert_params, percent),
            report=outlier_report(rows + expert_rows, percent, tokens),
            analog=split_parts(params, ANALOG),
            digital=split_parts(params, DIGITAL),
        )


def split_parts(params: list[dict[str, Any]], part: str) -> list[str]:
    """The weight names of one part (``ANALOG`` or ``DIGITAL``) of each split layer in ``params``."""
    return [f"{p['module']}.{part}.weight" for p in params]


def outlier_entries(params: list[dict[str, Any]], expert_params: list[dict[str, Any]],
                    percent: float) -> list:  # fmt: skip
    """The manifest transform entries: split linear layers, then fused experts' digital input channels."""
    entries = []
    if params:
        entries.append({
            "id": "outlier-channels",
            "type": TRANSFORM_TYPE,
            "params": {"percent": percent, "order": "y = analog(x[analog]) + digital(x[digital])",
                       "layers": params},
            "targets": [f"{p['module']}.{part}.weight" for p in params for part in (ANALOG, DIGITAL)],
        })  # fmt: skip
    if expert_params:
        entries.append({
            "id": "outlier-channels-experts",
            "type": experts_inputs.TRANSFORM_TYPE,
            "params": {"percent": percent, "order": "y_e = analog(x with digital[e] zeroed) + "
                       "digital(x[digital[e]])", "tensors": expert_params},
            "targets": [p["tensor"] for p in expert_params],
        })  # fmt: skip
    return entries
