"""ROMER building blocks: configuration, statistics under noise, planning, installing and undoing.

The method (:mod:`.method`) chains them: :func:`moe_routers` → :func:`calibration_stats` (clean pass +
noisy passes) → :func:`build_plan` (replacement pairs and per-layer routing parameters) →
:func:`install` (expert copies + routing hooks). Benchmarks call the same functions to build several
variants (replacement only, calibration only, both) from one set of statistics and undo each with
:meth:`Installed.remove`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.devices import model_device
from cimconvert.distributed import spread
from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import run_fingerprint
from cimconvert.methods.romer import calibrate
from cimconvert.methods.romer.stats import RouterStats, collect, load_router_logits
from cimconvert.transforms.romer import replacement
from cimconvert.transforms.romer.hook import LayerRouting, install_hook, remove_hook
from cimconvert.transforms.romer.moe import MoeRouting
from cimconvert.transforms.romer.routing import route

CALIB_MODES = ("cross-instance", "in-situ")
REPLACEMENTS = ("none", "substitute", "replicate_split")
CALIBRATIONS = ("none", "affine", "token_norm")
SPLITS = ("mean", "alternate")


@dataclass(frozen=True)
class RomerConfig:
    """Validated ROMER options (see :data:`cimconvert.methods.romer.method.OPTIONS` for the flags)."""

    calib_seeds: int = 2
    calib_seed: int = 100_000
    calib_mode: str = "cross-instance"
    insitu_seed: int = 0
    insitu_logits: str = ""
    replacement: str = "none"
    replace_tau: float = 0.25
    replace_bottom: int = 0
    replace_split: str = "mean"
    router_calibration: str = "affine"
    router_p_lo: float = 5.0
    router_p_hi: float = 95.0
    router_q: float = 0.9
    router_deadband: float = 0.05
    calib_batch_size: int = 8

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> RomerConfig:
        """Build from a method-options dict (unknown keys ignored); CimError on out-of-range values."""
        names = cls.__dataclass_fields__
        values = {k: v for k, v in options.items() if k in names and v is not None}
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """One-line CimError for each invalid value."""
        checks = [
            (self.calib_mode in CALIB_MODES, f"--calib-mode must be one of {', '.join(CALIB_MODES)}"),
            (self.replacement in REPLACEMENTS, f"--replacement must be one of {', '.join(REPLACEMENTS)}"),
            (self.router_calibration in CALIBRATIONS,
             f"--router-calibration must be one of {', '.join(CALIBRATIONS)}"),
            (self.replace_split in SPLITS, f"--replace-split must be one of {', '.join(SPLITS)}"),
            (self.calib_seeds >= 1, "--calib-seeds must be at least 1"),
            (0.0 <= self.replace_tau <= 1.0, "--replace-tau must be in [0, 1]"),
            (self.replace_bottom >= 0, "--replace-bottom must be >= 0"),
            (0.0 <= self.router_p_lo < self.router_p_hi <= 100.0,
             "need 0 <= --router-p-lo < --router-p-hi <= 100"),
            (0.5 < self.router_q < 1.0, "--router-q must be in (0.5, 1)"),
            (0.0 <= self.router_deadband < 1.0, "--router-deadband must be in [0, 1)"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise CimError(message)

    def variant(self, **changes: Any) -> RomerConfig:
        """A copy with some fields changed (benchmarks build replacement-only / calibration-only)."""
        return RomerConfig(**{**self.__dict__, **changes})


@dataclass
class CalibrationStats:
    """Clean reference statistics, noisy statistics (pooled over the fitting draws) and timings."""

    tokens: torch.Tensor
    clean: RouterStats
    noisy: RouterStats
    noisy_runs: list[RouterStats] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    source: str = "simulated"
    seconds: dict[str, float] = field(default_factory=dict)


def counts_from_logits(stats: RouterStats, moe: MoeRouting) -> None:
    """Fill ``stats.counts`` by routing its logits with each layer's rule (for measured logits)."""
    for i, z in stats.logits.items():
        router = moe.routers[i]
        bias = getattr(router, "e_score_correction_bias", None)
        _, index = route(z, moe.rules[i], bias.detach().cpu() if bias is not None else None)
        stats.counts[i] = torch.bincount(index.reshape(-1), minlength=moe.num_experts)[: moe.num_experts]


def _noisy_run(
    model: torch.nn.Module, moe: MoeRouting, tokens: torch.Tensor, cfg: RomerConfig,
    noise: tuple[Sequence[Any], Any, int], progress: bool,
) -> tuple[RouterStats, float]:  # fmt: skip
    """Statistics under one programmed chip instance; returns them and the programming time."""
    targets, profile, seed = noise
    start = time.perf_counter()
    with apply_chip_noise(model, targets, profile, seed):
        programmed = time.perf_counter() - start
        stats = collect(model, moe.routers, moe.num_experts, tokens, cfg.calib_batch_size,
                        progress=progress, desc=f"calibration (noise seed {seed})")  # fmt: skip
    return stats, programmed


def fit_seeds(cfg: RomerConfig) -> list[int]:
    """The simulated chip instances the fit uses: ``calib_seeds`` draws from ``calib_seed`` (cross-instance)
    or the one in-situ instance."""
    if cfg.calib_mode == "in-situ":
        return [cfg.insitu_seed]
    return [cfg.calib_seed + i for i in range(cfg.calib_seeds)]


def calibration_stats(
    model: torch.nn.Module,
    moe: MoeRouting,
    tokens: torch.Tensor,
    targets: Sequence[Any],
    profile: Any,
    cfg: RomerConfig,
    progress: bool = False,
    clean: RouterStats | None = None,
) -> CalibrationStats:
    """Clean and noisy router statistics on the calibration tokens, per ``cfg.calib_mode``.

    cross-instance: ``calib_seeds`` simulated draws (seeds ``calib_seed, calib_seed+1, ...``);
    in-situ: the simulated instance ``insitu_seed``, or logits measured on a chip (``insitu_logits``).
    ``clean``: reuse clean statistics of the same tokens (benchmarks fitting many instances).
    """
    measured: RouterStats | None = None
    if cfg.calib_mode == "in-situ" and cfg.insitu_logits:
        tokens, measured = load_router_logits(cfg.insitu_logits, sorted(moe.routers), moe.num_experts)
        counts_from_logits(measured, moe)
    if clean is None:
        clean = collect(model, moe.routers, moe.num_experts, tokens, cfg.calib_batch_size,
                        progress=progress, desc="calibration (clean)")  # fmt: skip
    seconds = {"clean_pass": clean.seconds, "programming": 0.0}
    if measured is not None:
        return CalibrationStats(tokens, clean, measured, [measured], [], "measured", seconds)
    seeds = fit_seeds(cfg)

    def run(seed: int) -> tuple[dict[str, Any], float]:  # plain data: it may travel between ranks
        stats, programmed = _noisy_run(model, moe, tokens, cfg, (targets, profile, seed),
                                       progress)  # fmt: skip
        return dict(vars(stats)), programmed  # shallow: asdict would deep-copy every logits tensor

    # Under a torchrun launch the instances are shared out over the ranks (cimconvert.distributed).
    agree = run_fingerprint(model, tokens, targets, profile, seeds, repr(cfg))
    desc = "ROMER noise draws" if progress and len(seeds) > 1 else None
    done = spread(seeds, run, model_device(model), agree, progress=desc)
    runs = [RouterStats(**stats) for stats, _ in done]
    seconds["programming"] = sum(programmed for _, programmed in done)
    seconds["noisy_passes"] = sum(r.seconds for r in runs)
    return CalibrationStats(tokens, clean, RouterStats.merge(runs), runs, seeds, "simulated", seconds)


@dataclass
class RomerPlan:
    """What ROMER will do: expert copies per layer and the routing parameters per layer."""

    routing: dict[int, LayerRouting]
    pairs: dict[int, list[list[int]]]
    replacement: str
    report: dict[str, Any] = field(default_factory=dict)


def _layer_routing(index: int, stats: CalibrationStats, moe: MoeRouting, cfg: RomerConfig) -> LayerRouting:
    spec = LayerRouting(layer=index, num_experts=moe.num_experts, calibration=cfg.router_calibration)  # type: ignore[arg-type]
    noisy, clean = stats.noisy.logits[index], stats.clean.logits[index]
    if cfg.router_calibration == "affine":
        spec.a, spec.b = calibrate.fit_affine(noisy, clean, cfg.router_p_lo, cfg.router_p_hi)
        if calibrate.within_deadband(
            spec.a, spec.b, clean, cfg.router_p_lo, cfg.router_p_hi, cfg.router_deadband
        ):
            spec.calibration, spec.a, spec.b = "none", [], []
    elif cfg.router_calibration == "token_norm":
        spec.q = cfg.router_q
        spec.scale, spec.shift = calibrate.fit_token_norm(
            noisy, clean, cfg.router_q, moe.rules[index].scoring
        )
    return spec


def build_plan(stats: CalibrationStats, moe: MoeRouting, cfg: RomerConfig) -> RomerPlan:
    """Replacement pairs (from the noisy frequencies) and fitted routing parameters for every MoE layer."""
    plan = RomerPlan(routing={}, pairs={}, replacement=cfg.replacement)
    noisy_freq, clean_freq = stats.noisy.frequencies(), stats.clean.frequencies()
    layers_report = []
    for m in moe.layers:
        i = m.index
        spec = _layer_routing(i, stats, moe, cfg)
        pairs: list[list[int]] = []
        if cfg.replacement != "none":
            pairs = replacement.plan_pairs(noisy_freq[i], moe.top_k, cfg.replace_tau, cfg.replace_bottom)
        if cfg.replacement == "replicate_split" and pairs:
            spec.masked = [cold for cold, _ in pairs]
            spec.replicas = [[donor, cold] for cold, donor in pairs]
            spec.split = cfg.replace_split  # type: ignore[assignment]
        plan.routing[i] = spec
        plan.pairs[i] = pairs
        layers_report.append({
            "layer": i,
            "clean_freq": [round(float(x), 5) for x in clean_freq[i]],
            "noisy_freq": [round(float(x), 5) for x in noisy_freq[i]],
            "pairs": pairs,
            "logit_spread_ratio": round(calibrate.spread_ratio(
                stats.noisy.logits[i], stats.clean.logits[i], cfg.router_p_lo, cfg.router_p_hi), 4),
        })  # fmt: skip
    plan.report["layers"] = layers_report
    return plan


@dataclass
class Installed:
    """A plan applied to a model; :meth:`remove` undoes it (hooks removed, expert tensors restored)."""

    moe: MoeRouting
    saved: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    hooked: list[int] = field(default_factory=list)

    def remove(self) -> None:
        """Undo the expert copies and remove the routing hooks."""
        for i, tensors in self.saved.items():
            replacement.restore(self.moe.layer(i).experts, tensors)
        for i in self.hooked:
            remove_hook(self.moe.routers[i])
        self.saved.clear()
        self.hooked.clear()


def install(moe: MoeRouting, plan: RomerPlan, keep_undo: bool = False) -> Installed:
    """Copy experts and install routing hooks as planned (``keep_undo``: keep copies to undo it)."""
    done = Installed(moe)
    for m in moe.layers:
        pairs = plan.pairs.get(m.index, [])
        if pairs:
            if keep_undo:
                done.saved[m.index] = replacement.snapshot(m.experts)
            replacement.copy_experts(m.experts, pairs)
        spec = plan.routing.get(m.index)
        if spec is not None and not spec.is_identity:
            install_hook(m.router, spec, moe.rules[m.index])
            done.hooked.append(m.index)
    return done
