"""Program a weight tensor onto simulated crossbars and read it back at t_inference.

Chain, per tile and fully vectorised over tiles and experts (float32):
map to conductances → stuck faults → programming noise → drift → 1/f read noise → back-map →
drift compensation. Large tensors are processed in blocks of whole output tiles to bound memory;
the block size is fixed, so a given seed always gives the same draw.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch

from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator.drift import add_read_noise, apply_drift, compensation_gain, draw_nu
from cimconvert.simulator.mapping import (
    expand_scales,
    normalised_weights,
    weight_scales,
    weights_to_conductances,
)
from cimconvert.simulator.programming import add_poly_noise, add_relative_gaussian, draw_faults
from cimconvert.simulator.tiles import TileGrid, tile_grid

Layout = Literal["out_in", "in_out"]

#: Elements per processing block (whole output tiles); bounds the float32 temporaries.
BLOCK_ELEMENTS = 1 << 22


def out_in_view(w: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Differentiable view of a 2-D/3-D weight as ``[..., out, in]`` (``in_out``, e.g. Conv1D, transposed).

    Same dims and dtype as ``w``; its own inverse (``out_in_view(out_in_view(w, l), l)`` is ``w``).
    """
    return w.transpose(-1, -2) if layout == "in_out" else w


def to_out_in(w: torch.Tensor, layout: Layout) -> torch.Tensor:
    """View ``w`` (2-D or 3-D, given layout) as float32 ``[E, out, in]``."""
    if w.dim() not in (2, 3):
        raise ValueError(f"analog weights must be 2-D or 3-D, got shape {tuple(w.shape)}")
    if layout not in ("out_in", "in_out"):
        raise ValueError(f"unknown layout {layout!r} (expected 'out_in' or 'in_out')")
    return out_in_view(w if w.dim() == 3 else w.unsqueeze(0), layout).float()


def clean_scales(w: torch.Tensor, layout: Layout, profile: ChipProfile) -> torch.Tensor:
    """Digital output scales fixed at mapping time from the clean weight ``w`` (abs-max per tile).

    Shape ``[E, out, n_in_tiles]`` for a 3-D expert stack, ``[out, n_in_tiles]`` for a 2-D weight
    (float32). Every consumer (simulator hooks, STE, ONNX export, bundle writer) takes them from here.
    """
    w3 = to_out_in(w.detach(), layout)
    scales = weight_scales(w3, profile.mapping, tile_grid(w3.shape, profile.mapping))
    return scales if w.dim() == 3 else scales[0]


def from_out_in(w3: torch.Tensor, like: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`to_out_in`: back to ``like``'s shape, layout and dtype (contiguous)."""
    if layout == "in_out":
        w3 = w3.transpose(-1, -2)
    w = w3 if like.dim() == 3 else w3.squeeze(0)
    return w.to(like.dtype).contiguous()


def has_time_effects(profile: ChipProfile) -> bool:
    """True when drift or 1/f read noise change the conductances after programming."""
    return profile.drift.kind != "none" or profile.read_noise.kind != "none"


def _blocks(grid: TileGrid, n_in_total: int) -> Iterator[tuple[slice, slice, TileGrid]]:
    """(expert slice, row slice, grid of the block) covering the tensor in whole output tiles."""
    per_matrix = sum(grid.out_sizes) * n_in_total
    if per_matrix <= BLOCK_ELEMENTS:
        step = max(1, BLOCK_ELEMENTS // max(per_matrix, 1))
        for e0 in range(0, grid.n_matrices, step):
            e1 = min(e0 + step, grid.n_matrices)
            yield slice(e0, e1), slice(None), TileGrid(grid.in_sizes, grid.out_sizes, e1 - e0)
        return
    tiles_per_block = max(1, BLOCK_ELEMENTS // (max(grid.out_sizes) * n_in_total))
    for e in range(grid.n_matrices):
        start = 0
        for t0 in range(0, grid.n_out, tiles_per_block):
            sizes = grid.out_sizes[t0 : t0 + tiles_per_block]
            yield slice(e, e + 1), slice(start, start + sum(sizes)), TileGrid(grid.in_sizes, sizes, 1)
            start += sum(sizes)


def _device_chain(
    g_target: torch.Tensor, profile: ChipProfile, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Faults, programming noise, drift and 1/f noise on conductances ``[D, ...]``.

    Returns (g_programmed, g_at_t_inference), both in µS.
    """
    mapping, prog = profile.mapping, profile.programming
    faults = draw_faults(g_target.shape, profile.faults, mapping.devices_per_polarity, generator, g_target)
    g_t = faults.apply_target(g_target) if faults is not None else g_target
    if prog.kind == "poly":
        g_prog = add_poly_noise(g_t, profile, generator)
    elif prog.kind == "relative_gaussian":
        g_prog = add_relative_gaussian(g_t, prog, mapping, generator)
    else:
        g_prog = g_t
    g_now = g_prog
    t = profile.t_inference
    if profile.drift.kind == "power_law":
        nu = draw_nu(g_t, profile.drift, mapping.g_max, generator)
        g_now = apply_drift(g_prog, nu, t, profile.drift.t0)
    if profile.read_noise.kind == "pcm_1f":
        g_now = add_read_noise(
            g_now, g_prog, profile.read_noise, mapping.g_max, t, profile.drift.t0, generator
        )
    if faults is not None:
        g_prog = faults.finish(g_prog, mapping.g_max)
        g_now = faults.finish(g_now, mapping.g_max)
    return g_prog, g_now


def program_block(
    w: torch.Tensor, scales: torch.Tensor, grid: TileGrid, profile: ChipProfile, generator: torch.Generator
) -> torch.Tensor:
    """Programmed-and-read weights for one block ``[E, rows, in]`` with scales ``[E, rows, n_in]``."""
    scale_full = expand_scales(scales, grid)
    g_target = weights_to_conductances(w, scale_full, profile.mapping)
    g_prog, g_now = _device_chain(g_target, profile, generator)
    w_now = normalised_weights(g_now, profile.mapping)
    if has_time_effects(profile):
        alpha = compensation_gain(
            normalised_weights(g_prog, profile.mapping), w_now, grid, profile.drift.compensation
        )
        if alpha is not None:
            w_now = w_now * alpha
    return w_now * scale_full


@torch.no_grad()
def program_weight(
    w: torch.Tensor, profile: ChipProfile, generator: torch.Generator, layout: Layout = "out_in"
) -> torch.Tensor:
    """Weights as read from the simulated chip at ``profile.t_inference``: same shape, dtype, device.

    ``w`` is ``[out, in]``, ``[E, out, in]`` (fused experts, one tile set per expert) or, with
    ``layout="in_out"``, the transposed form (GPT-2 ``Conv1D``). An ideal profile returns an exact copy.
    All randomness comes from ``generator``.
    """
    if profile.is_ideal:
        return w.detach().clone()
    w3 = to_out_in(w.detach(), layout)
    grid = tile_grid(w3.shape, profile.mapping)
    scales = weight_scales(w3, profile.mapping, grid)
    out = torch.empty_like(w3)
    for experts, rows, block_grid in _blocks(grid, w3.shape[-1]):
        out[experts, rows] = program_block(
            w3[experts, rows], scales[experts, rows], block_grid, profile, generator
        )
    return from_out_in(out, w, layout)
