"""``outlier_channels`` on fused experts: per expert, the input channels with the largest calibration
activations run digitally (:mod:`cimconvert.transforms.experts_inputs` records them).

Each expert sees its own tokens, so each expert gets its own channels: ``gate_up_proj`` reads the layer's
hidden state (where a model's massive-activation channels live), ``down_proj`` the expert's own
intermediate activations. An expert that no calibration token reached takes the layer's maxima.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from cimconvert.analog.experts import input_dim, set_digital_inputs
from cimconvert.analog.routes import owner_of
from cimconvert.methods.calibration import observed_experts
from cimconvert.placement import TensorInfo
from cimconvert.transforms.experts_inputs import tensor_params


class ExpertMaxima:
    """Running ``max |x_j|`` per expert and input channel of fused experts tensors (an expert observer)."""

    def __init__(self, tensors: Sequence[TensorInfo]) -> None:
        self.maxima = {
            info.name: torch.zeros(info.shape[0], info.shape[input_dim(info.layout)]) for info in tensors
        }

    def __call__(self, name: str, expert: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold one projection's input into its expert's maxima."""
        if x.numel() == 0:
            return
        seen = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).float()
        table = self.maxima[name]
        table[expert] = torch.maximum(table[expert], seen.to(table.device))

    def result(self) -> dict[str, torch.Tensor]:
        """``[experts, in]`` maxima per tensor; experts no token reached take the layer's maxima."""
        filled = {}
        for name, table in self.maxima.items():
            unseen = table.amax(1) == 0
            filled[name] = torch.where(unseen[:, None], table.amax(0, keepdim=True), table)
        return filled


def split_expert_outliers(
    model: nn.Module, tensors: Sequence[TensorInfo], maxima: dict[str, torch.Tensor], k_for: Any, top_k: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Give each fused tensor its per-expert digital input channels (``k_for(in_features)`` each).

    Returns (manifest tensor params, report rows); MACs per token count ``top_k`` experts per token.
    """
    params, rows = [], []
    for info in tensors:
        table = maxima[info.name]
        in_features = table.shape[1]
        out_features = info.shape[1] if info.layout == "out_in" else info.shape[2]
        k = k_for(in_features)
        index = torch.topk(table, k, dim=1).indices.sort(dim=1).values
        owner, _, attr = owner_of(model, info.name)
        set_digital_inputs(owner, attr, index)
        params.append(tensor_params(model, info.name, info.layout))
        kept = table.scatter(1, index, 0.0)  # the maxima the crossbar still sees
        rows.append({
            "layer": info.name,
            "digital_channels": k,
            "in_features": in_features,
            "digital_macs_per_token": k * out_features * top_k,
            "digital_extra_bytes": info.shape[0] * k * out_features * (info.nbytes // max(info.params, 1)),
            "analog_macs_per_token": (in_features - k) * out_features * top_k,
            "input_max_before": float(table.max()),
            "input_max_after": float(kept.max()),
            "input_median": float(table.median()),
        })  # fmt: skip
    return params, rows


def observe_expert_maxima(
    model: nn.Module, tensors: Sequence[TensorInfo]
) -> tuple[AbstractContextManager[None], ExpertMaxima]:
    """(context manager that records the maxima while the calibration text runs, the recorder)."""
    recorder = ExpertMaxima(tensors)
    return observed_experts(model, [info.name for info in tensors], recorder), recorder
