"""Weight ↔ conductance mapping (abs-max scaling to g_max, differential pair, optional levels).

Scales: a weight matrix ``[..., out, in]`` is normalised by its abs-max at the profile granularity
(``channel``: per output row within each input-tile slice; ``tile``: per tile; ``tensor``: one value
for the whole tensor). :func:`weight_scales` always returns shape ``[..., out, n_in_tiles]`` — one
value per output row and input tile, repeated where the granularity is coarser — so that the same
tensor serves the mapping, the back-mapping and the per-tile digital output scale of the MVM.

Conductances: with a differential pair, the normalised magnitude ``x = |w| / scale`` ∈ [0, 1] is
programmed as ``g_min + x·(g_max − g_min)`` on g+ for positive weights and on g− for negative ones;
the other device sits at g_min. Without a pair (``differential: false``) a single device holds the
affine map ``x = (w/scale + 1)/2``. Conductance tensors carry a leading device axis: ``[2, ...]``
(g+, g−) or ``[1, ...]``.
"""

from __future__ import annotations

import torch

from cimconvert.profiles.schema import MappingSpec
from cimconvert.simulator.tiles import TileGrid, expand_segments, segment_amax


def weight_scales(w: torch.Tensor, mapping: MappingSpec, grid: TileGrid) -> torch.Tensor:
    """Abs-max of ``w [..., out, in]`` at the mapping granularity, shape ``[..., out, n_in_tiles]``.

    An all-zero group gets scale 1 (its weights map to g_min either way).
    """
    absw = w.abs()
    per_channel = segment_amax(absw, grid.in_sizes, dim=-1)  # [..., out, n_in]
    if mapping.scale == "channel":
        scales = per_channel
    elif mapping.scale == "tile":
        per_tile = segment_amax(per_channel, grid.out_sizes, dim=-2)  # [..., n_out, n_in]
        scales = expand_segments(per_tile, grid.out_sizes, dim=-2)
    else:
        scales = absw.amax().expand_as(per_channel)
    scales = scales.contiguous()
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def expand_scales(scales: torch.Tensor, grid: TileGrid) -> torch.Tensor:
    """``[..., out, n_in_tiles]`` scales → per-element scales ``[..., out, in]``."""
    return expand_segments(scales, grid.in_sizes, dim=-1)


def quantise_levels(x: torch.Tensor, levels: int | None) -> torch.Tensor:
    """Round normalised conductances ``x ∈ [0, 1]`` to ``levels`` equally spaced levels (None: exact)."""
    if levels is None:
        return x
    steps = levels - 1
    return torch.round(x * steps) / steps


def weights_to_conductances(w: torch.Tensor, scale_full: torch.Tensor, mapping: MappingSpec) -> torch.Tensor:
    """Target conductances in µS, ``[2, ...]`` (g+, g−) for a pair or ``[1, ...]`` for a single device."""
    span = mapping.g_max - mapping.g_min
    wn = (w / scale_full).clamp(-1.0, 1.0)
    if not mapping.differential:
        x = quantise_levels((wn + 1.0) * 0.5, mapping.levels)
        return (mapping.g_min + x * span).unsqueeze(0)
    x = quantise_levels(wn.abs(), mapping.levels)
    g_on = mapping.g_min + x * span
    positive = wn >= 0
    g_off = torch.full_like(g_on, mapping.g_min)
    return torch.stack([torch.where(positive, g_on, g_off), torch.where(positive, g_off, g_on)])


def normalised_weights(g: torch.Tensor, mapping: MappingSpec) -> torch.Tensor:
    """Weights read from conductances in units of the scale (|w| ≤ 1 for exact conductances)."""
    span = mapping.g_max - mapping.g_min
    if not mapping.differential:
        return 2.0 * (g[0] - mapping.g_min) / span - 1.0
    return (g[0] - g[1]) / span


def conductances_to_weights(g: torch.Tensor, scale_full: torch.Tensor, mapping: MappingSpec) -> torch.Tensor:
    """Back-map conductances ``[D, ...]`` to weights with the per-element scales."""
    return normalised_weights(g, mapping) * scale_full


def weight_delta_to_conductance(mapping: MappingSpec) -> float:
    """µS of conductance per unit of normalised weight (for noise defined in the weight domain)."""
    span = mapping.g_max - mapping.g_min
    return span if mapping.differential else span / 2.0
