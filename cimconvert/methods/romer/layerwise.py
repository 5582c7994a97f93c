"""ROMER one decoder layer at a time: the router statistics of the clean model and of every fitting draw
are collected in one pass over the layers (:mod:`cimconvert.layerwise.steps`), then fitted exactly as in
:meth:`~cimconvert.methods.romer.method.RomerMethod.apply`.

ROMER changes no stored weight: the routing hooks are re-installed on load, and expert copies
(``--replacement``) are re-applied by the ``romer_replacement`` loader, so the conversion streams the
source checkpoint into the bundle with ROMER's transform entries. Its fit exists only after the whole
pass, so layer by layer it is a recipe's last step. Per-MVM draws follow the whole-model order exactly
when the calibration sequences form one batch (``--calib-samples`` ≤ the calibration batch size); see
:mod:`cimconvert.layerwise.evaluate`.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from typing import Any

import torch

from cimconvert.errors import CimError
from cimconvert.layerwise import LayerwiseModel
from cimconvert.layerwise.passes import Stream
from cimconvert.layerwise.steps import BaseLayerStep, FixedStep, run_layer_steps
from cimconvert.methods.base import MethodResult
from cimconvert.methods.calibration import calibration_tokens, iter_batches
from cimconvert.methods.romer.core import CalibrationStats, RomerConfig, build_plan, fit_seeds
from cimconvert.methods.romer.method import noise_targets, romer_result, skipped_result
from cimconvert.methods.romer.stats import RouterRecorder, RouterStats
from cimconvert.placement import Placement, plan_model
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.romer.moe import MoeRouting, moe_routers


class RomerLayerStep(BaseLayerStep):
    """ROMER's statistics as a layer step (:class:`cimconvert.layerwise.steps.LayerStep`): a recorder per
    stream; nothing changes in the layers; :meth:`finish` fits the plan."""

    name = "romer"
    last_only = True

    def __init__(self, moe: MoeRouting, tokens: torch.Tensor, targets: list[Any], cfg: RomerConfig,
                 adapter: Any = None) -> None:  # fmt: skip
        self.moe, self.tokens, self.all_targets, self.cfg, self.adapter = moe, tokens, targets, cfg, adapter
        self.seeds = fit_seeds(cfg)
        self.fit_seeds: list[int | None] = [None, *self.seeds]
        self.batches = iter_batches(tokens, cfg.calib_batch_size)
        self.recorders = {seed: RouterRecorder(moe.routers, moe.num_experts) for seed in self.fit_seeds}
        self.started = time.perf_counter()

    def targets(self, lw: LayerwiseModel, placement: Placement) -> list[Any]:
        """The analog tensors ROMER's calibration runs noisy (fixed at the start)."""
        return self.all_targets

    def observe(self, index: int, stream: Stream) -> AbstractContextManager[Any]:
        """The stream's router recorder."""
        return self.recorders[stream.seed]

    def stats(self) -> CalibrationStats:
        """Clean and noisy router statistics of the pass."""
        seconds = time.perf_counter() - self.started
        share = seconds / len(self.fit_seeds)
        clean, *runs = [self.recorders[s].stats(int(self.tokens.numel()), share) for s in self.fit_seeds]
        timing = {"layer_passes": seconds}
        return CalibrationStats(self.tokens, clean, RouterStats.merge(runs), runs, self.seeds, "simulated",
                                timing)  # fmt: skip

    def finish(self, ppl: dict[int | None, float]) -> MethodResult:
        """Fit the plan from the pass's statistics: transforms, seeds and report as the method gives them."""
        stats = self.stats()
        plan = build_plan(stats, self.moe, self.cfg)
        run = (self.all_targets, time.perf_counter() - self.started)
        result = romer_result(self.cfg, stats, plan, self.moe, self.adapter, run)
        result.report["layer_by_layer"] = True
        return result


@torch.no_grad()
def layerwise_stats(
    lw: LayerwiseModel, moe: MoeRouting, tokens: torch.Tensor, targets: list[Any], profile: ChipProfile,
    cfg: RomerConfig, progress: bool = False, placement: Placement | None = None,
) -> CalibrationStats:  # fmt: skip
    """Clean and noisy router statistics on ``tokens [N, S]``, one decoder layer in memory at a time."""
    step = RomerLayerStep(moe, tokens, targets, cfg, lw.adapter)
    run_layer_steps(lw, profile, [step], placement or plan_model(lw.model, profile), progress=progress)
    return step.stats()


def romer_layer_step(lw: LayerwiseModel, profile: ChipProfile, options: dict[str, Any],
                     placement: Placement | None = None) -> RomerLayerStep | FixedStep:  # fmt: skip
    """ROMER's layer step for ``lw`` under ``profile`` (a no-op step when the profile adds no noise)."""
    cfg = RomerConfig.from_options(options)
    if cfg.calib_mode == "in-situ" and cfg.insitu_logits:
        raise CimError("--insitu-logits is not supported layer by layer (it needs the whole model in memory)")
    moe = moe_routers(lw.model, lw.adapter)
    targets = noise_targets(lw.model, profile, options, placement)
    if not targets or profile.is_ideal:
        return FixedStep(skipped_result(cfg, profile), RomerLayerStep.name)
    return RomerLayerStep(moe, calibration_tokens(lw.model, options), targets, cfg, lw.adapter)


__all__ = ["RomerLayerStep", "layerwise_stats", "romer_layer_step"]
