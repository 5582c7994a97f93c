"""``output_correction`` one decoder layer at a time (:mod:`cimconvert.layerwise.steps`).

The same fit as :meth:`~cimconvert.methods.output_correction.OutputCorrectionMethod.apply`: at each layer
the ``correction_draws`` fitting streams run through the layer as the earlier steps left it (analog
outputs against the exact matmul of the same inputs), the layer's gains are folded into its rows, then
the check draw runs through the corrected layer; the clean stream and every draw give the calibration
perplexities of the report. Decoder layers only (:func:`~cimconvert.methods.calibration.decoder_layers_only`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import Any

import torch

from cimconvert.errors import CimError
from cimconvert.layerwise.passes import Stream
from cimconvert.layerwise.skeleton import LayerwiseModel
from cimconvert.layerwise.steps import BaseLayerStep
from cimconvert.methods.base import MethodResult, register_layerwise
from cimconvert.methods.calibration import (
    CALIB_BATCH_SIZE,
    analog_parts,
    calibration_tokens,
    decoder_layers_only,
    iter_batches,
    layer_targets,
    observed_experts,
)
from cimconvert.methods.output_correction import (
    DEFAULT_DRAWS,
    DEFAULT_SEED,
    NAME,
    ExpertGainFits,
    Fitted,
    GainFit,
    correction_result,
    exact_output_hook,
    fold_expert_gains,
    fold_gains,
)
from cimconvert.placement import Placement, TensorInfo, current_placement
from cimconvert.profiles import ChipProfile


class CorrectionLayerStep(BaseLayerStep):
    """``output_correction`` as a layer step (:class:`cimconvert.layerwise.steps.LayerStep`)."""

    name = NAME
    wants_ppl = True
    changes_weights = True

    def __init__(self, profile: ChipProfile, tokens: torch.Tensor, draws: int, first: int) -> None:
        self.profile, self.tokens = profile, tokens
        self.seeds = [first + i for i in range(draws)]
        self.check = first + draws  # one more instance, not used by the fit
        self.fit_seeds: list[int | None] = [None, *self.seeds]
        self.check_seeds = [self.check]
        self.batches = iter_batches(tokens, CALIB_BATCH_SIZE)  # calibration_ppl's batches
        self.fitted = Fitted([], [], {}, self.seeds, self.check)
        self._lw: LayerwiseModel | None = None
        self._layers: list[str] = []
        self._experts: list[TensorInfo] = []
        self._fits: dict[str, GainFit] = {}
        self._clean: dict[str, torch.Tensor] = {}
        self._expert_fits: ExpertGainFits | None = None
        self._linear_gains: dict[str, torch.Tensor] = {}
        self._expert_gains: dict[str, torch.Tensor] = {}

    def targets(self, lw: LayerwiseModel, placement: Placement) -> list[Any]:
        """The analog tensors of the model as it is now."""
        return current_placement(lw.model, self.profile, placement).analog()

    def begin_layer(self, lw: LayerwiseModel, index: int, placement: Placement) -> None:
        """The layer's analog linears and experts tensors; their fits and clean weights."""
        self._lw = lw
        self._layers, self._experts = layer_targets(lw, index, self.profile, placement)
        self._fits = {name: GainFit(lw.model.get_submodule(name).out_features) for name in self._layers}
        self._clean = {name: lw.model.get_submodule(name).weight.detach().clone() for name in self._layers}
        self._expert_fits = ExpertGainFits(lw.model, self._experts)

    def observe(self, index: int, stream: Stream) -> AbstractContextManager[Any]:
        """A fitting draw: output hooks on the layer's linears and the experts observer."""
        if stream.seed not in self.seeds or self._lw is None or self._expert_fits is None:
            return nullcontext()
        model = self._lw.model
        stack = ExitStack()
        for name in self._layers:
            hook = exact_output_hook(self._fits[name], self._clean[name])
            stack.callback(model.get_submodule(name).register_forward_hook(hook).remove)
        stack.enter_context(observed_experts(model, [info.name for info in self._experts], self._expert_fits))
        return stack

    def transform(self, lw: LayerwiseModel, index: int) -> tuple[list[str], list[str]]:
        """Fold the layer's gains into its rows."""
        assert self._expert_fits is not None
        gains = {name: fit.gain() for name, fit in self._fits.items()}
        expert_gains = self._expert_fits.gains()
        fold_gains(lw.model, gains)
        fold_expert_gains(lw.model, expert_gains, {info.name: info.layout for info in self._experts})
        self.fitted.layers += self._layers
        self.fitted.experts += [info.name for info in self._experts]
        self._linear_gains.update(gains)
        self._expert_gains.update(expert_gains)
        self._clean, self._expert_fits = {}, None
        return [], []

    def finish(self, ppl: dict[int | None, float]) -> MethodResult:
        """The method's entry, seeds and report from the pass."""
        before = [ppl[seed] for seed in self.seeds]
        self.fitted.gains = {**self._linear_gains, **self._expert_gains}  # the whole-model order
        return correction_result(self.fitted, int(self.tokens.numel()), ppl[None], before, ppl[self.check])


def correction_layer_step(lw: LayerwiseModel, profile: ChipProfile, options: dict[str, Any],
                          placement: Placement | None = None) -> CorrectionLayerStep:  # fmt: skip
    """``output_correction``'s layer step for ``lw`` under ``profile``."""
    draws = int(options.get("correction_draws", DEFAULT_DRAWS))
    if draws < 1:
        raise CimError(f"--correction-draws must be at least 1 (got {draws})")
    if not any(analog_parts(lw.model, profile, placement)):
        raise CimError("output_correction: the model has no analog linear layer or fused experts")
    decoder_layers_only(lw, NAME, profile, placement)
    first = int(options.get("correction_seed", DEFAULT_SEED))
    return CorrectionLayerStep(profile, calibration_tokens(lw.model, options), draws, first)


register_layerwise(NAME, correction_layer_step)

__all__ = ["CorrectionLayerStep", "correction_layer_step"]
