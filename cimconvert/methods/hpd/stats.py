"""Measurements that explain when HPD helps: singular spectra, dynamic range, activation outliers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from cimconvert.devices import to_model_device


def spectrum_stats(s: torch.Tensor) -> dict[str, Any]:
    """Summary of a singular spectrum (descending): extremes, condition, energy share, effective rank.

    ``effective_rank`` is exp(entropy of σ²/Σσ²) (Roy & Vetterli); ``energy_top10pct`` is the share of
    Σσ² carried by the largest 10% of singular values.
    """
    s = s.detach().double()
    energy = s.square() / s.square().sum()
    top = max(1, len(s) // 10)
    entropy = -(energy * energy.clamp_min(1e-300).log()).sum()
    return {
        "rank": len(s),
        "s_max": float(s[0]),
        "s_min": float(s[-1]),
        "condition": float(s[0] / s[-1].clamp_min(1e-300)),
        "energy_top10pct": float(energy[:top].sum()),
        "effective_rank": float(entropy.exp()),
    }


def row_dynamic_range(matrix: torch.Tensor) -> dict[str, float]:
    """Per-output-row max|w| / rms(w) of ``[out, in]`` (mean, median, max) and the whole-matrix ratio.

    Under per-channel abs-max mapping the programming noise of a row scales with its max|w| while its
    signal scales with its rms: a higher ratio means a lower signal-to-noise ratio on the array.
    """
    w = matrix.detach().double()
    rms = w.square().mean(dim=1).sqrt().clamp_min(1e-300)
    ratio = w.abs().amax(dim=1) / rms
    return {
        "row_max_over_rms_mean": float(ratio.mean()),
        "row_max_over_rms_median": float(ratio.median()),
        "row_max_over_rms_max": float(ratio.max()),
        "tensor_max_over_rms": float(w.abs().max() / w.square().mean().sqrt().clamp_min(1e-300)),
    }


def activation_stats(x: torch.Tensor) -> dict[str, float]:
    """Outlier statistics of activations ``[tokens, features]``.

    ``kurtosis``: mean over tokens of the (non-excess) kurtosis E[x⁴]/E[x²]² across features (3 for a
    Gaussian); ``channel_max_over_rms``: max over channels of rms(channel) / rms(all) (a channel
    outlier); ``token_max_over_rms``: mean over tokens of max|x| / rms(x) (what per-vector DAC
    range normalisation pays for).
    """
    x = x.detach().double().reshape(-1, x.shape[-1])
    m2 = x.square().mean(dim=1).clamp_min(1e-300)
    kurt = (x.pow(4).mean(dim=1) / m2.square()).mean()
    chan_rms = x.square().mean(dim=0).sqrt()
    total_rms = x.square().mean().sqrt().clamp_min(1e-300)
    return {
        "kurtosis": float(kurt),
        "channel_max_over_rms": float(chan_rms.max() / total_rms),
        "token_max_over_rms": float((x.abs().amax(dim=1) / m2.sqrt()).mean()),
    }


@torch.no_grad()
def capture_inputs(
    model: nn.Module, modules: Iterable[str], batches: Iterable[torch.Tensor], max_rows: int = 8192
) -> dict[str, torch.Tensor]:
    """Inputs seen by each named module while running ``batches`` of token ids (at most ``max_rows`` rows)."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name in modules:
        rows = seen.setdefault(name, [])

        def hook(_mod: nn.Module, args: tuple[Any, ...], rows: list[torch.Tensor] = rows) -> None:
            if sum(r.shape[0] for r in rows) < max_rows:
                rows.append(args[0].detach().reshape(-1, args[0].shape[-1]).float().cpu())

        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(input_ids=to_model_device(batch, model), use_cache=False)
    finally:
        for handle in hooks:
            handle.remove()
    return {name: torch.cat(rows)[:max_rows] for name, rows in seen.items() if rows}
