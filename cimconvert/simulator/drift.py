"""Conductance drift, accumulated 1/f read noise and drift compensation (aihwkit PCM semantics).

* Drift exponent per device, drawn once: ν = |N(nu_mean(x_T), nu_std(x_T))|·scale, x_T = g_T/g_max.
* Drift: g(t) = g_prog·((t + t0)/t0)^(−ν).
* 1/f read noise accumulated up to t: σ = |g(t)|·Q_s(x_prog)·√ln((t + t0 + t_read)/(2·t_read))·scale,
  g ← max(0, g(t) + σ·N(0, 1)), x_prog = g_prog/g_max.
* Compensation: α = mean|W_prog| / mean|W(t)| on normalised (conductance-domain) weights, per tile
  (``global``, the one-hot-readout equivalent of aihwkit ``GlobalDriftCompensation``) or per output
  channel within a tile (``per_column``); the digital output gain α multiplies the weights returned.
"""

from __future__ import annotations

import math

import torch

from cimconvert.profiles.schema import DriftSpec, ReadNoise1f
from cimconvert.simulator.curves import eval_curve
from cimconvert.simulator.rng import randn
from cimconvert.simulator.tiles import TileGrid, expand_segments, segment_sum


def draw_nu(
    g_target: torch.Tensor, drift: DriftSpec, g_max: float, generator: torch.Generator
) -> torch.Tensor:
    """Per-device drift exponents ν (drawn once) from the target conductances."""
    assert drift.nu_mean is not None and drift.nu_std is not None
    x = g_target / g_max
    mean = eval_curve(drift.nu_mean, x)
    nu = eval_curve(drift.nu_std, x).mul_(randn(x.shape, generator, x)).add_(mean).abs_()
    return nu if drift.scale == 1.0 else nu.mul_(drift.scale)


def drift_factor(nu: torch.Tensor, t: float, t0: float) -> torch.Tensor:
    """((t + t0)/t0)^(−ν)."""
    return torch.pow(torch.as_tensor((t + t0) / t0, dtype=nu.dtype, device=nu.device), -nu)


def apply_drift(g_prog: torch.Tensor, nu: torch.Tensor, t: float, t0: float) -> torch.Tensor:
    """g(t) = g_prog·((t + t0)/t0)^(−ν)."""
    return g_prog * drift_factor(nu, t, t0)


def read_noise_time_factor(t: float, t0: float, t_read: float) -> float:
    """√ln((t + t0 + t_read)/(2·t_read)); 0 when the log is not positive."""
    return math.sqrt(max(math.log((t + t0 + t_read) / (2.0 * t_read)), 0.0))


def read_noise_sigma(
    g_drift: torch.Tensor, g_prog: torch.Tensor, read: ReadNoise1f, g_max: float, t: float, t0: float
) -> torch.Tensor:
    """σ_read = |g(t)|·Q_s(g_prog/g_max)·√ln((t + t0 + t_read)/(2 t_read))·scale, in µS."""
    assert read.q_s is not None
    q_s = eval_curve(read.q_s, g_prog / g_max)
    return q_s.mul_(g_drift.abs()).mul_(read_noise_time_factor(t, t0, read.t_read) * read.scale)


def add_read_noise(
    g_drift: torch.Tensor,
    g_prog: torch.Tensor,
    read: ReadNoise1f,
    g_max: float,
    t: float,
    t0: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """g ← max(0, g(t) + σ_read·N(0, 1))."""
    sigma = read_noise_sigma(g_drift, g_prog, read, g_max, t, t0)
    return sigma.mul_(randn(g_drift.shape, generator, g_drift)).add_(g_drift).clamp_min_(0.0)


def compensation_gain(
    w_prog: torch.Tensor, w_t: torch.Tensor, grid: TileGrid, mode: str
) -> torch.Tensor | None:
    """Digital gain α = mean|W_prog| / mean|W_t| broadcastable to ``[..., out, in]`` (None for ``none``).

    Means are over each tile (``global``) or each output channel within a tile (``per_column``);
    tiles have the same element count in both tensors, so ratios of sums equal ratios of means.
    """
    if mode == "none":
        return None
    ref = segment_sum(w_prog.abs(), grid.in_sizes, dim=-1)  # [..., out, n_in]
    now = segment_sum(w_t.abs(), grid.in_sizes, dim=-1)
    if mode == "global":
        ref = expand_segments(segment_sum(ref, grid.out_sizes, dim=-2), grid.out_sizes, dim=-2)
        now = expand_segments(segment_sum(now, grid.out_sizes, dim=-2), grid.out_sizes, dim=-2)
    alpha = torch.where(now > 0, ref / now.clamp_min(1e-30), torch.ones_like(now))
    return expand_segments(alpha, grid.in_sizes, dim=-1)
