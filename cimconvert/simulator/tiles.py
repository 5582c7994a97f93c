"""Crossbar tiles: how a weight matrix is split into tiles (aihwkit ``TileModuleArray`` semantics).

A 2-D matrix ``[out, in]`` is cut along the input dimension into chunks of at most ``tile_rows`` inputs
(crossbar rows) and along the output dimension into chunks of at most ``tile_cols`` outputs (crossbar
columns). Each dimension is split into ``ceil(n / max)`` near-equal chunks, the first ones one larger
(1000 with 512 → [500, 500]; 1001 → [501, 500]). A 3-D fused-experts tensor ``[E, out, in]`` holds one
matrix per expert, each on its own set of tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cimconvert.profiles.schema import MappingSpec


def split_sizes(n: int, max_size: int) -> list[int]:
    """Split ``n`` into ``ceil(n / max_size)`` near-equal chunks (larger chunks first)."""
    if n <= 0:
        return [0] if n == 0 else []
    count = math.ceil(n / max_size)
    base, extra = divmod(n, count)
    return [base + 1] * extra + [base] * (count - extra)


@dataclass(frozen=True)
class TileGrid:
    """Tile split of one matrix (or of each of ``n_matrices`` expert matrices).

    ``in_sizes``: inputs per tile along the input dimension (crossbar rows used);
    ``out_sizes``: outputs per tile along the output dimension (crossbar columns used).
    """

    in_sizes: tuple[int, ...]
    out_sizes: tuple[int, ...]
    n_matrices: int = 1

    @property
    def n_in(self) -> int:
        """Number of tiles along the input dimension (partial sums added digitally)."""
        return len(self.in_sizes)

    @property
    def n_out(self) -> int:
        """Number of tiles along the output dimension (outputs concatenated)."""
        return len(self.out_sizes)

    @property
    def n_tiles(self) -> int:
        """Total number of crossbar tiles, over all expert matrices."""
        return self.n_matrices * self.n_in * self.n_out

    @property
    def max_in(self) -> int:
        """Largest input chunk (tiles are padded to this size when batched)."""
        return max(self.in_sizes)


def tile_grid(shape: tuple[int, ...] | torch.Size, mapping: MappingSpec) -> TileGrid:
    """Tile split of a ``[out, in]`` matrix or a ``[E, out, in]`` stack of expert matrices."""
    if len(shape) not in (2, 3):
        raise ValueError(f"expected a 2-D [out, in] or 3-D [E, out, in] shape, got {tuple(shape)}")
    out_dim, in_dim = int(shape[-2]), int(shape[-1])
    n_matrices = int(shape[0]) if len(shape) == 3 else 1
    return TileGrid(
        in_sizes=tuple(split_sizes(in_dim, mapping.tile_rows)),
        out_sizes=tuple(split_sizes(out_dim, mapping.tile_cols)),
        n_matrices=n_matrices,
    )


def padded_index(sizes: tuple[int, ...], device: torch.device | None = None) -> torch.Tensor | None:
    """Gather index that lays chunks of ``sizes`` out as ``len(sizes) × max(sizes)`` slots.

    Index ``n = sum(sizes)`` marks a padding slot (point it at an appended zero). Returns None when all
    chunks have the same size (a plain reshape then suffices).
    """
    if len(set(sizes)) <= 1:
        return None
    width = max(sizes)
    total = sum(sizes)
    index = torch.full((len(sizes), width), total, dtype=torch.long, device=device)
    start = 0
    for tile, size in enumerate(sizes):
        index[tile, :size] = torch.arange(start, start + size, device=device)
        start += size
    return index.reshape(-1)


def to_tiles(x: torch.Tensor, sizes: tuple[int, ...], dim: int = -1) -> torch.Tensor:
    """View/gather ``x`` along ``dim`` as ``[..., n_tiles, max_size, ...]``, zero-padding short chunks."""
    dim = dim % x.dim()
    width = max(sizes)
    index = padded_index(sizes, x.device)
    if index is not None:
        pad_shape = list(x.shape)
        pad_shape[dim] = 1
        x = torch.cat([x, x.new_zeros(pad_shape)], dim=dim).index_select(dim, index)
    return x.unflatten(dim, (len(sizes), width))


def segment_amax(x: torch.Tensor, sizes: tuple[int, ...], dim: int = -1) -> torch.Tensor:
    """Max over each chunk of ``sizes`` along ``dim`` (chunk axis replaces ``dim``). Use on |x| ≥ 0."""
    if len(sizes) == 1:
        return x.amax(dim=dim, keepdim=True)
    dim = dim % x.dim()
    return to_tiles(x, sizes, dim).amax(dim=dim + 1)


def segment_sum(x: torch.Tensor, sizes: tuple[int, ...], dim: int = -1) -> torch.Tensor:
    """Sum over each chunk of ``sizes`` along ``dim`` (chunk axis replaces ``dim``)."""
    if len(sizes) == 1:
        return x.sum(dim=dim, keepdim=True)
    dim = dim % x.dim()
    return to_tiles(x, sizes, dim).sum(dim=dim + 1)


def expand_segments(x: torch.Tensor, sizes: tuple[int, ...], dim: int = -1) -> torch.Tensor:
    """Repeat per-chunk values along ``dim`` back to full length (inverse of a segment reduction)."""
    if len(sizes) == 1:
        shape = list(x.shape)
        shape[dim % x.dim()] = sizes[0]
        return x.expand(shape)
    repeats = torch.tensor(sizes, device=x.device)
    return x.repeat_interleave(repeats, dim=dim)
