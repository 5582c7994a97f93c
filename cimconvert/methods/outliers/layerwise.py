"""``outlier_channels`` one decoder layer at a time (:mod:`cimconvert.layerwise.steps`).

The same split as :meth:`~cimconvert.methods.outliers.method.OutlierChannelsMethod.apply`: the clean
calibration stream runs through each layer as the earlier steps left it, recording the input maxima of
its analog linear layers and fused experts, then the layer's outlier channels are split off. Decoder
layers only (:func:`~cimconvert.methods.calibration.decoder_layers_only`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any

import torch

from cimconvert.layerwise.passes import Stream
from cimconvert.layerwise.skeleton import LayerwiseModel
from cimconvert.layerwise.steps import BaseLayerStep
from cimconvert.methods.base import MethodResult
from cimconvert.methods.calibration import (
    CALIB_BATCH_SIZE,
    calibration_tokens,
    decoder_layers_only,
    iter_batches,
    layer_targets,
    observed_experts,
)
from cimconvert.methods.outliers.experts import ExpertMaxima, split_expert_outliers
from cimconvert.methods.outliers.method import (
    SCOPES,
    channels_for,
    check_maxima,
    checked_percent,
    outlier_entries,
    outlier_report,
    recording_maxima,
    split_outliers,
    split_parts,
    split_targets,
)
from cimconvert.placement import Placement, TensorInfo
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.outlier_split import ANALOG, DIGITAL


class OutlierLayerStep(BaseLayerStep):
    """``outlier_channels`` as a layer step (:class:`cimconvert.layerwise.steps.LayerStep`): the clean
    stream's maxima, then the split."""

    name = "outlier_channels"
    changes_weights = True
    fit_seeds = (None,)

    def __init__(self, profile: ChipProfile, tokens: torch.Tensor, percent: float, experts: bool) -> None:
        self.profile, self.tokens, self.percent, self.with_experts = profile, tokens, percent, experts
        self.batches = iter_batches(tokens, CALIB_BATCH_SIZE)  # channel_maxima's batches
        self.params: list[dict[str, Any]] = []
        self.expert_params: list[dict[str, Any]] = []
        self.rows: list[dict[str, Any]] = []
        self.expert_rows: list[dict[str, Any]] = []
        self._lw: LayerwiseModel | None = None
        self._layers: list[str] = []
        self._experts: list[TensorInfo] = []
        self._maxima: dict[str, torch.Tensor] = {}
        self._expert_maxima = ExpertMaxima([])

    def begin_layer(self, lw: LayerwiseModel, index: int, placement: Placement) -> None:
        """The layer's analog linears and experts tensors, empty maxima."""
        self._lw = lw
        self._layers, experts = layer_targets(lw, index, self.profile, placement)
        self._experts = experts if self.with_experts else []
        self._maxima = {}
        self._expert_maxima = ExpertMaxima(self._experts)

    def observe(self, index: int, stream: Stream) -> AbstractContextManager[Any]:
        """Record the input maxima of the layer's linears and experts."""
        assert self._lw is not None
        stack = ExitStack()
        stack.enter_context(recording_maxima(self._lw.model, self._layers, self._maxima))
        names = [info.name for info in self._experts]
        stack.enter_context(observed_experts(self._lw.model, names, self._expert_maxima))
        return stack

    def transform(self, lw: LayerwiseModel, index: int) -> tuple[list[str], list[str]]:
        """Split the layer's outlier channels off; returns the split parts' names."""
        check_maxima(self._layers, self._maxima)
        params, rows = split_outliers(lw.model, self._maxima, self.percent)
        top_k = lw.adapter.top_k(lw.model.config) if self._experts else 0
        maxima = self._expert_maxima.result()
        expert_params, expert_rows = split_expert_outliers(
            lw.model, self._experts, maxima, lambda n: channels_for(n, self.percent), top_k
        )
        self.params += params
        self.expert_params += expert_params
        self.rows += rows
        self.expert_rows += expert_rows
        return split_parts(params, ANALOG), split_parts(params, DIGITAL)

    def finish(self, ppl: dict[int | None, float]) -> MethodResult:
        """The method's entries, report and the split parts' units."""
        return MethodResult(
            transforms=outlier_entries(self.params, self.expert_params, self.percent),
            report=outlier_report(self.rows + self.expert_rows, self.percent, self.tokens),
            analog=split_parts(self.params, ANALOG),
            digital=split_parts(self.params, DIGITAL),
        )


def outlier_layer_step(lw: LayerwiseModel, profile: ChipProfile, options: dict[str, Any],
                       placement: Placement | None = None) -> OutlierLayerStep:  # fmt: skip
    """``outlier_channels``' layer step for ``lw`` under ``profile``."""
    percent = checked_percent(options)
    split_targets(lw.model, profile, placement, options)
    decoder_layers_only(lw, "outlier_channels", profile, placement)
    experts = options.get("outlier_scope", SCOPES[0]) == "all"
    return OutlierLayerStep(profile, calibration_tokens(lw.model, options), percent, experts)

__all__ = ["OutlierLayerStep", "outlier_layer_step"]
