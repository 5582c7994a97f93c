"""ROMER one decoder layer at a time: the router statistics of the clean model and of every fitting draw
are collected in one pass over the layers (:mod:`cimconvert.layerwise`), then fitted exactly as in
:meth:`~cimconvert.methods.romer.method.RomerMethod.apply`.

The conversion streams the source checkpoint into the bundle with ROMER's transform entries: the routing
hooks are re-installed on load, and expert copies (``--replacement``) are re-applied by the
``romer_replacement`` loader (which copies the experts on load), so the stored weights stay the source's.
Per-MVM draws follow the whole-model order exactly when the calibration sequences form one batch
(``--calib-samples`` ≤ the calibration batch size); see :mod:`cimconvert.layerwise.evaluate`.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cimconvert.errors import CimError
from cimconvert.layerwise import LayerwiseModel, capture_inputs, run_layers, start_streams
from cimconvert.methods.base import MethodResult
from cimconvert.methods.calibration import calibration_tokens, iter_batches
from cimconvert.methods.romer.core import CalibrationStats, RomerConfig, build_plan, fit_seeds
from cimconvert.methods.romer.method import noise_targets, romer_result
from cimconvert.methods.romer.stats import RouterRecorder, RouterStats
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.romer.moe import MoeRouting, moe_routers


@torch.no_grad()
def layerwise_stats(
    lw: LayerwiseModel, moe: MoeRouting, tokens: torch.Tensor, targets: list[Any], profile: ChipProfile,
    cfg: RomerConfig, progress: bool = False,
) -> CalibrationStats:  # fmt: skip
    """Clean and noisy router statistics on ``tokens [N, S]``, one decoder layer in memory at a time."""
    seeds = fit_seeds(cfg)
    start = time.perf_counter()
    inputs = capture_inputs(lw, iter_batches(tokens, cfg.calib_batch_size))
    streams = start_streams(lw, [None, *seeds], inputs, targets, profile)
    recorders = {id(s): RouterRecorder(moe.routers, moe.num_experts) for s in streams}
    run_layers(lw, inputs, streams, targets, profile, context=lambda s: recorders[id(s)], progress=progress)
    seconds = time.perf_counter() - start
    share = seconds / len(streams)
    clean, *runs = [recorders[id(s)].stats(int(tokens.numel()), share) for s in streams]
    timing = {"layer_passes": seconds}
    return CalibrationStats(tokens, clean, RouterStats.merge(runs), runs, seeds, "simulated", timing)


def apply_layerwise(lw: LayerwiseModel, profile: ChipProfile, options: dict[str, Any], progress: bool = True,
                    placement: Placement | None = None) -> MethodResult:  # fmt: skip
    """ROMER's fit on a model run layer by layer: transforms, seeds and report as the method gives them."""
    start = time.perf_counter()
    cfg = RomerConfig.from_options(options)
    if cfg.calib_mode == "in-situ" and cfg.insitu_logits:
        raise CimError("--insitu-logits is not supported layer by layer (it needs the whole model in memory)")
    moe = moe_routers(lw.model, lw.adapter)
    tokens = calibration_tokens(lw.model, options)
    targets = noise_targets(lw.model, profile, options, placement)
    if not targets or profile.is_ideal:
        note = f"profile {profile.name} adds no analog noise: ROMER left the model unchanged"
        return MethodResult(report={"config": dict(cfg.__dict__), "skipped": note, "summary": note,
                                    "warnings": [note]})  # fmt: skip
    stats = layerwise_stats(lw, moe, tokens, targets, profile, cfg, progress)
    plan = build_plan(stats, moe, cfg)
    result = romer_result(cfg, stats, plan, moe, lw.adapter, (targets, time.perf_counter() - start))
    result.report["layer_by_layer"] = True
    return result


__all__ = ["apply_layerwise", "layerwise_stats"]
