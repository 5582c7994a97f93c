"""The ``output_correction`` method: a per-output-channel gain for every analog linear layer, fitted across
simulated chip instances on calibration text and folded into the weights.

Measured on SmolLM2-135M under chipA (docs/ROBUSTNESS.md): an analog layer's outputs come out about
1–3 % smaller than the exact matmul of the same inputs, systematically (clamped programming noise and
drift shrink conductances towards zero; the chip's global drift compensation fixes the mean, not each
channel). Thirty blocks compound the shrinkage along the residual stream. The fit regresses the exact
outputs on the analog ones per channel, ``g = Σ y_exact·y_analog / Σ y_analog²``, pooled over
``correction_draws`` chip instances (cross-instance: the bundle must work on any chip of the profile),
each layer seeing the inputs the noisy model gives it. Scaling a weight row by ``g`` scales that analog
output by ``g`` exactly (the per-channel mapping scale is digital), so the correction costs nothing at
run time and needs no loader: the bundle stores the corrected weights and the manifest entry records the
gains' summary. Keep it the last step of a recipe (after placement and splits): a tensor moved to
digital afterwards would carry a gain it no longer needs.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.analog.experts import expert_matmul
from cimconvert.analog.routes import owner_of
from cimconvert.devices import to_model_device
from cimconvert.errors import CimError
from cimconvert.evaluation.perplexity import next_token_nll, nll_perplexity
from cimconvert.methods.base import MethodOption, MethodResult, register_method
from cimconvert.methods.calibration import (
    CALIB_BATCH_SIZE,
    analog_parts,
    calibration_options,
    calibration_tokens,
    iter_batches,
    observed_experts,
)
from cimconvert.placement import Placement, TensorInfo, current_placement
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.folded import FOLDED_TYPES

LOGGER = logging.getLogger(__name__)

NAME = "output_correction"
TRANSFORM_TYPE = FOLDED_TYPES[0]
DEFAULT_DRAWS = 2
DEFAULT_SEED = 200_000
#: An expert's gains are fitted only from this many routed calibration tokens on (else they stay 1).
MIN_EXPERT_TOKENS = 64


class GainFit:
    """Per-channel sums for the least-squares gain of one layer (float64)."""

    def __init__(self, out_features: int) -> None:
        self.cross = torch.zeros(out_features, dtype=torch.float64)
        self.analog_sq = torch.zeros(out_features, dtype=torch.float64)
        self.rows = 0

    def add(self, analog: torch.Tensor, exact: torch.Tensor) -> None:
        """Accumulate one batch of analog and exact outputs ``[..., out]``."""
        a = analog.reshape(-1, analog.shape[-1]).double()
        e = exact.reshape(-1, exact.shape[-1]).double()
        self.cross += (a * e).sum(0)
        self.analog_sq += (a * a).sum(0)
        self.rows += a.shape[0]

    def gain(self) -> torch.Tensor:
        """``Σ exact·analog / Σ analog²`` per channel (1 where a channel never produced output)."""
        gain = self.cross / self.analog_sq.clamp_min(1e-30)
        return torch.where(self.analog_sq > 0, gain, torch.ones_like(gain))


class ExpertGainFits:
    """One :class:`GainFit` per expert of each fused experts tensor (an expert observer).

    Compares each routed projection's (simulated) output with the exact matmul of the same input by
    the clean matrix (``clean``, copied before any noise is applied).
    """

    def __init__(self, model: nn.Module, tensors: Sequence[TensorInfo]) -> None:
        self.owners = {info.name: owner_of(model, info.name)[0] for info in tensors}
        params = dict(model.named_parameters())
        self.clean = {info.name: params[info.name].detach().clone() for info in tensors}
        self.fits = {
            info.name: [GainFit(_fused_out_features(info)) for _ in range(info.shape[0])] for info in tensors
        }

    def __call__(self, name: str, expert: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """Fold one projection into its expert's fit."""
        exact = expert_matmul(self.owners[name], self.clean[name][expert], x)
        self.fits[name][expert].add(y.detach(), exact)

    def gains(self) -> dict[str, torch.Tensor]:
        """``[experts, out]`` gains per tensor (1 for an expert fewer than ``MIN_EXPERT_TOKENS`` reached)."""
        return {
            name: torch.stack([fit.gain() if fit.rows >= MIN_EXPERT_TOKENS else torch.ones_like(fit.cross)
                               for fit in fits])
            for name, fits in self.fits.items()
        }  # fmt: skip


def _fused_out_features(info: TensorInfo) -> int:
    """Outputs of one expert's matrix of a fused ``[experts, ., .]`` tensor."""
    return info.shape[1] if info.layout == "out_in" else info.shape[2]


def fold_expert_gains(model: nn.Module, gains: dict[str, torch.Tensor], layouts: dict[str, str]) -> None:
    """Scale each expert's output rows of each fused tensor (and its bias) by its gains, in place."""
    with torch.no_grad():
        for name, gain in gains.items():
            owner, _, attr = owner_of(model, name)
            param = getattr(owner, attr)
            g = gain.to(param.dtype)
            param.mul_(g[:, :, None] if layouts[name] == "out_in" else g[:, None, :])
            bias = getattr(owner, f"{attr}_bias", None) if getattr(owner, "has_bias", False) else None
            if bias is not None:
                bias.mul_(g.to(bias.dtype))


def exact_output_hook(fit: GainFit, clean_weight: torch.Tensor):
    """Forward hook: compare the (patched, analog) output with the exact matmul of the same input."""

    def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        x = args[0].detach()
        analog = output.detach()
        if module.bias is not None:
            analog = analog - module.bias.detach()
        fit.add(analog, nn.functional.linear(x, clean_weight))

    return hook


def _batch_nll(model: nn.Module, batch: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, tokens scored) of a ``[rows, seq_len]`` batch."""
    batch = to_model_device(batch, model)
    return next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)


@torch.no_grad()
def calibration_ppl(model: nn.Module, tokens: torch.Tensor, batch_size: int = CALIB_BATCH_SIZE) -> float:
    """Perplexity of ``model`` on the calibration rows (each row its own window)."""
    total, count = 0.0, 0
    for batch in iter_batches(tokens, batch_size):
        nll, n = _batch_nll(model, batch)
        total, count = total + nll, count + n
    return nll_perplexity((total, count))


@torch.no_grad()
def fit_output_gains(
    model: nn.Module, layers: Sequence[str], targets: Sequence[Any], profile: ChipProfile,
    tokens: torch.Tensor, seeds: Sequence[int], batch_size: int = CALIB_BATCH_SIZE,
    ppl_out: list[float] | None = None,
    experts: Sequence[TensorInfo] = (),
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-channel gain of each layer in ``layers`` (and ``[experts, out]`` gains of each fused tensor in
    ``experts``), pooled over chip instances ``seeds`` (noise in ``targets``, the analog tensors of
    ``model``) on the calibration ``tokens``. ``ppl_out`` receives the calibration perplexity of each
    instance (the fitting passes give it for free)."""
    fits = {name: GainFit(model.get_submodule(name).out_features) for name in layers}
    clean = {name: model.get_submodule(name).weight.detach().clone() for name in layers}
    expert_fits = ExpertGainFits(model, experts)
    handles = [model.get_submodule(name).register_forward_hook(exact_output_hook(fits[name], clean[name]))
               for name in layers]  # fmt: skip
    try:
        model.eval()
        with observed_experts(model, [info.name for info in experts], expert_fits):
            for seed in seeds:
                with apply_chip_noise(model, targets, profile, seed):
                    ppl = calibration_ppl(model, tokens, batch_size)
                if ppl_out is not None:
                    ppl_out.append(ppl)
    finally:
        for handle in handles:
            handle.remove()
    return {**{name: fit.gain() for name, fit in fits.items()}, **expert_fits.gains()}


def fold_gains(model: nn.Module, gains: dict[str, torch.Tensor]) -> None:
    """Scale each linear layer's weight rows (and bias) by its gains, in place."""
    with torch.no_grad():
        for name, gain in gains.items():
            module = model.get_submodule(name)
            module.weight.mul_(gain.to(module.weight.dtype)[:, None])
            if module.bias is not None:
                module.bias.mul_(gain.to(module.bias.dtype))


def _summary(gains: dict[str, torch.Tensor]) -> dict[str, Any]:
    every = torch.cat([g.float().reshape(-1) for g in gains.values()]) if gains else torch.ones(1)
    return {"gain_mean": float(every.mean()), "gain_std": float(every.std()) if every.numel() > 1 else 0.0,
            "gain_min": float(every.min()), "gain_max": float(every.max())}  # fmt: skip


class OutputCorrectionMethod:
    """Per-channel output gains fitted across simulated chip instances, folded into the analog weights."""

    name = NAME
    families: tuple[str, ...] = ("dense", "moe", "ssm")
    options = (
        MethodOption("correction_draws", int, DEFAULT_DRAWS,
                     "output_correction: simulated chip instances the gains are pooled over", minimum=1,
                     maximum=64),
        MethodOption("correction_seed", int, DEFAULT_SEED,
                     "output_correction: seed of the first fitting instance (keep apart from evaluation)",
                     minimum=0),
        *calibration_options(),
    )  # fmt: skip

    def apply(self, model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Placement | None = None) -> MethodResult:  # fmt: skip
        """Fit the gains of every analog linear layer and fold them into its weight rows."""
        draws = int(options.get("correction_draws", DEFAULT_DRAWS))
        first = int(options.get("correction_seed", DEFAULT_SEED))
        if draws < 1:
            raise CimError(f"--correction-draws must be at least 1 (got {draws})")
        layers, experts = analog_parts(model, profile, placement)
        if not layers and not experts:
            raise CimError("output_correction: the model has no analog linear layer or fused experts")
        placed = current_placement(model, profile, placement)
        tokens = calibration_tokens(model, options)
        seeds = [first + i for i in range(draws)]
        if progress:
            LOGGER.info("output_correction: fitting %d layers and %d fused experts tensors over %d chip "
                        "draws, %d calibration tokens", len(layers), len(experts), draws, tokens.numel())
        clean_ppl = calibration_ppl(model, tokens)
        before: list[float] = []
        gains = fit_output_gains(model, layers, placed.analog(), profile, tokens, seeds, ppl_out=before,
                                 experts=experts)  # fmt: skip
        fold_gains(model, {name: gains[name] for name in layers})
        fold_expert_gains(model, {info.name: gains[info.name] for info in experts},
                          {info.name: info.layout for info in experts})  # fmt: skip
        check = first + draws  # one more instance, not used by the fit
        with apply_chip_noise(model, placed.analog(), profile, check):
            after = calibration_ppl(model, tokens)
        fitted = Fitted(layers, [info.name for info in experts], gains, seeds, check)
        return correction_result(fitted, int(tokens.numel()), clean_ppl, before, after)


@dataclass
class Fitted:
    """What a correction fitted: corrected linear layers (module paths) and fused experts tensors, their
    gains, the fitting seeds and the check draw."""

    layers: list[str]
    experts: list[str]
    gains: dict[str, torch.Tensor]
    seeds: list[int]
    check: int


def correction_result(fitted: Fitted, tokens: int, clean_ppl: float, before: Sequence[float],
                      after: float) -> MethodResult:  # fmt: skip
    """The manifest entry, seeds and report of a fitted correction (calibration perplexities: clean, each
    fitting draw before the correction, the check draw after it)."""
    summary = _summary(fitted.gains)
    draws = len(fitted.seeds)
    corrected = len(fitted.layers) + len(fitted.experts)
    entry = {"id": "output-correction", "type": TRANSFORM_TYPE,
             "params": {"folded_into": "weight rows (per expert for fused experts)", "layers": corrected,
                        "draws": draws, "seeds": fitted.seeds, **summary},
             "targets": [f"{name}.weight" for name in fitted.layers] + fitted.experts}  # fmt: skip
    noisy = statistics.fmean(before)
    report = {"method": NAME, "layers": corrected, "draws": draws, "calibration_tokens": tokens, **summary,
              "calibration_ppl_clean": clean_ppl, "calibration_ppl_noisy_before": noisy,
              "calibration_ppl_noisy_after": after, "check_seed": fitted.check,
              "summary": f"calibration text, clean PPL {clean_ppl:.2f}: noisy {noisy:.2f} before the "
                         f"correction ({draws} fitting draws), {after:.2f} after (draw {fitted.check})"}
    if after >= noisy:
        report["warnings"] = [f"the correction did not lower the calibration PPL on an unseen chip draw "
                              f"({noisy:.2f} before, {after:.2f} after)"]  # fmt: skip
    return MethodResult(transforms=[entry], seeds={NAME: [*fitted.seeds, fitted.check]}, report=report)


register_method(OutputCorrectionMethod())
