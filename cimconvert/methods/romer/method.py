"""The ROMER method: expert replacement + router calibration for MoE models under analog noise.

``RomerMethod.apply`` runs the calibration text through the clean model and through the noisy model
(simulated chip instances of the target profile, or one programmed instance for in-situ calibration),
replaces under-activated experts, fits the router-logit calibration, installs the digital routing hooks
and returns the manifest transform entries that :mod:`cimconvert.transforms.romer.loader` re-applies on
``load_bundle``.

Besides the declared options, ``apply`` reads these keys of ``options`` when present (API use, not
flags): ``analog`` / ``digital`` (the placement overrides, so that a router forced analog is noisy during
calibration), ``tokenizer`` (object or folder; default: the model's folder) and ``calib_tokens``
(a ``[samples, seq_len]`` LongTensor that replaces the calibration text).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from cimconvert.methods.base import MethodOption, MethodResult
from cimconvert.methods.calibration import calibration_options, calibration_tokens
from cimconvert.methods.romer.core import (
    CALIB_MODES,
    CALIBRATIONS,
    REPLACEMENTS,
    SPLITS,
    RomerConfig,
    RomerPlan,
    build_plan,
    calibration_stats,
    install,
)
from cimconvert.placement import Placement, model_placement, plan_model
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.romer.loader import REPLACEMENT_TYPE, ROUTING_TYPE
from cimconvert.transforms.romer.moe import MoeRouting, moe_routers

_D = RomerConfig()

OPTIONS: tuple[MethodOption, ...] = (
    *calibration_options(),
    MethodOption("calib_seeds", int, _D.calib_seeds,
                 "ROMER: simulated noise draws used for fitting (cross-instance)", minimum=1),
    MethodOption("calib_seed", int, _D.calib_seed,
                 "ROMER: first seed of the fitting draws (keep them apart from evaluation seeds)"),
    MethodOption("calib_mode", str, _D.calib_mode,
                 "ROMER: fit on simulated draws of the profile (cross-instance) or on one programmed chip "
                 "(in-situ)",
                 choices=CALIB_MODES),
    MethodOption("insitu_seed", int, _D.insitu_seed, "ROMER in-situ: seed of the simulated chip instance"),
    MethodOption("insitu_logits", str, _D.insitu_logits,
                 "ROMER in-situ: safetensors file of router logits measured on the chip (docs/ROMER.md)"),
    MethodOption("replacement", str, _D.replacement, "ROMER expert replacement", choices=REPLACEMENTS),
    MethodOption("replace_tau", float, _D.replace_tau, "ROMER: expert is cold if its load < tau * k/E",
                 minimum=0.0, maximum=1.0),
    MethodOption("replace_bottom", int, _D.replace_bottom,
                 "ROMER: replace the r least-used experts (overrides tau)", minimum=0),
    MethodOption("replace_split", str, _D.replace_split,
                 "ROMER replicate_split: donor tokens to both copies at half weight (mean) or alternate",
                 choices=SPLITS),
    MethodOption("router_calibration", str, _D.router_calibration, "ROMER router-logit calibration",
                 choices=CALIBRATIONS),
    MethodOption("router_p_lo", float, _D.router_p_lo, "ROMER affine: lower percentile matched",
                 minimum=0.0, maximum=100.0),
    MethodOption("router_p_hi", float, _D.router_p_hi, "ROMER affine: upper percentile matched",
                 minimum=0.0, maximum=100.0),
    MethodOption("router_deadband", float, _D.router_deadband,
                 "ROMER affine: keep a layer uncalibrated when |a_e-1| and the shift are below this"),
    MethodOption("router_q", float, _D.router_q, "ROMER token_norm: per-token spread P_q - P_(1-q)"),
)  # fmt: skip


def skipped_result(cfg: RomerConfig, profile: ChipProfile) -> MethodResult:
    """ROMER's result on a profile (or placement) without analog noise: the model left unchanged."""
    note = f"profile {profile.name} adds no analog noise: ROMER left the model unchanged"
    return MethodResult(report={"config": dict(cfg.__dict__), "skipped": note, "summary": note,
                                "warnings": [note]})  # fmt: skip


def noise_targets(
    model: torch.nn.Module, profile: ChipProfile, options: dict[str, Any], placement: Placement | None
) -> list[Any]:
    """The analog tensors the calibration runs noisy: the conversion's ``placement`` mapped onto
    ``model``; called on its own (no placement), ROMER plans the model here, with the options' overrides."""
    if placement is not None:
        return model_placement(model, placement, profile).analog()
    analog = tuple(options.get("analog") or ())
    digital = tuple(options.get("digital") or ())
    return plan_model(model, profile, analog=analog, digital=digital).analog()


def plan_transforms(plan: RomerPlan, moe: MoeRouting, adapter: Any) -> list[dict[str, Any]]:
    """The manifest ``transforms`` entries describing ``plan`` (empty parts are omitted)."""
    entries: list[dict[str, Any]] = []
    copies = [{"layer": i, "pairs": pairs} for i, pairs in sorted(plan.pairs.items()) if pairs]
    if copies:
        targets = [
            f"{moe.layer(c['layer']).path}.{adapter.experts}.{name}"
            for c in copies
            for name in (adapter.fused_gate_up, adapter.fused_down)
        ]
        entries.append({
            "id": "romer-replacement", "type": REPLACEMENT_TYPE,
            "params": {"mode": plan.replacement, "layers": copies}, "targets": targets,
        })  # fmt: skip
    routing = [spec for _, spec in sorted(plan.routing.items()) if not spec.is_identity]
    if routing:
        entries.append({
            "id": "romer-routing", "type": ROUTING_TYPE,
            "params": {
                "layers": [spec.to_dict() for spec in routing],
                "rules": {str(s.layer): moe.rules[s.layer].to_dict() for s in routing},
            },
            "targets": [f"{moe.layer(s.layer).path}.{adapter.router}.weight" for s in routing],
        })  # fmt: skip
    return entries


def plan_outcome(plan: RomerPlan, cfg: RomerConfig, router_analog: bool) -> dict[str, Any]:
    """The report's ``summary`` (what ROMER changed) and ``warnings`` (e.g. router calibration inactive)."""
    calibrated = sum(1 for spec in plan.routing.values() if spec.calibration != "none")
    copies = sum(len(pairs) for pairs in plan.pairs.values())
    layers = len(plan.routing)
    replaced = "expert replacement off"
    if cfg.replacement != "none":
        replaced = f"{copies} cold expert(s) replaced ({cfg.replacement})"
    summary = f"router calibration ({cfg.router_calibration}) active in {calibrated} of {layers} MoE layers; "
    summary += replaced
    warnings = []
    if calibrated == 0 and cfg.router_calibration != "none":
        why = "the routers are digital and " if not router_analog else ""
        warnings.append(f"router calibration inactive under this profile: {why}every layer's noisy router "
                        "logits stayed within router_deadband of the clean ones")  # fmt: skip
    if copies == 0 and cfg.replacement != "none":
        warnings.append("expert replacement inactive: no expert was cold under noise (replace_tau)")
    return {"summary": summary, "warnings": warnings}


class RomerMethod:
    """ROMER (arXiv 2605.11800): expert replacement and router calibration, post-training, no labels."""

    name = "romer"
    families = ("moe",)
    options = OPTIONS

    def apply(self, model: torch.nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Placement | None = None) -> MethodResult:  # fmt: skip
        """Calibrate on noisy statistics, replace experts, install the routing hooks; see module docs."""
        start = time.perf_counter()
        cfg = RomerConfig.from_options(options)
        moe = moe_routers(model, adapter)
        measured = cfg.calib_mode == "in-situ" and cfg.insitu_logits
        targets = noise_targets(model, profile, options, placement)
        if (not targets or profile.is_ideal) and not measured:
            return skipped_result(cfg, profile)
        tokens = None if measured else calibration_tokens(model, options)
        with torch.no_grad():
            stats = calibration_stats(model, moe, tokens, targets, profile, cfg, progress)
            plan = build_plan(stats, moe, cfg)
            install(moe, plan)
        return romer_result(cfg, stats, plan, moe, adapter, (targets, time.perf_counter() - start))


def romer_result(cfg: RomerConfig, stats: Any, plan: RomerPlan, moe: MoeRouting, adapter: Any,
                 run: tuple[list[Any], float]) -> MethodResult:  # fmt: skip
    """The method result of a fitted plan: transforms, seeds and the report (``run``: targets, seconds)."""
    targets, total = run
    passes = stats.noisy_runs if stats.source == "simulated" else [stats.clean]
    one_pass = sum(r.seconds for r in passes) / max(len(passes), 1)
    report = {
        "config": dict(cfg.__dict__),
        "calibration_tokens": int(stats.tokens.numel()),
        "noise_seeds": stats.seeds,
        "logits_source": stats.source,
        "analog_tensors": len(targets),
        "router_analog": any(t.kind == "router" for t in targets),
        "seconds": {**{k: round(v, 3) for k, v in stats.seconds.items()}, "total": round(total, 3)},
        "cost_vs_one_noisy_pass": round(total / max(one_pass, 1e-9), 2),
        **plan.report,
    }
    report.update(plan_outcome(plan, cfg, report["router_analog"]))
    return MethodResult(
        transforms=plan_transforms(plan, moe, adapter),
        seeds={"romer_calibration": stats.seeds},
        report=report,
    )


METHOD = RomerMethod()
