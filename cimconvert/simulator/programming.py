"""Programming noise and stuck faults, drawn once per programming of the chip.

All conductances are in µS and carry a leading device axis (g+, g− for a differential pair).
``poly``: every device — also the one parked at g_min — gets g_prog = g_T + σ(x)·N(0, 1) with
σ(x) = |Σ c_i x^i|·(g_max/ref_g_max)·scale and x = g_T/g_max (aihwkit PCM/HERMES/ReRAM models);
with ``clamp_nonnegative`` g_prog is clamped at 0, which biases small conductances upwards (a real
systematic effect of the device, kept on purpose). ``relative_gaussian``: w' = w + sigma·absmax·N(0, 1)
at the mapping granularity, applied as a conductance offset on the device that holds the weight.
``devices_per_polarity``: the fitted curves describe the combined conductance of the devices of one
polarity (as the HERMES 2-device fit does), so noise is drawn once per polarity; faults are per device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cimconvert.profiles.schema import ChipProfile, FaultSpec, MappingSpec, ProgrammingNoise
from cimconvert.simulator.curves import eval_poly
from cimconvert.simulator.mapping import weight_delta_to_conductance
from cimconvert.simulator.rng import rand, randn


def coeffs_at(programming: ProgrammingNoise, t_inference: float) -> list[float]:
    """Polynomial coefficients (µS) in force at ``t_inference`` (``coeffs`` or the tabulated entry)."""
    if programming.coeffs is not None:
        return list(programming.coeffs)
    table = programming.coeffs_by_time or {}
    for t, coeffs in table.items():
        if math.isclose(float(t), t_inference):
            return list(coeffs)
    raise ValueError(f"t_inference {t_inference:g} s is not tabulated in coeffs_by_time")


def poly_sigma(x: torch.Tensor, profile: ChipProfile) -> torch.Tensor:
    """Programming-noise std in µS at normalised conductance ``x`` (rescaled to the profile g_max)."""
    prog = profile.programming
    assert prog.ref_g_max is not None
    gain = profile.mapping.g_max / prog.ref_g_max * prog.scale
    return eval_poly(coeffs_at(prog, profile.t_inference), x).abs_().mul_(gain)


def add_poly_noise(g: torch.Tensor, profile: ChipProfile, generator: torch.Generator) -> torch.Tensor:
    """g_prog = g + σ(g/g_max)·N(0, 1) on every device, clamped at 0 if the profile says so."""
    g_prog = poly_sigma(g / profile.mapping.g_max, profile).mul_(randn(g.shape, generator, g)).add_(g)
    return g_prog.clamp_min_(0.0) if profile.programming.clamp_nonnegative else g_prog


def add_relative_gaussian(
    g: torch.Tensor, programming: ProgrammingNoise, mapping: MappingSpec, generator: torch.Generator
) -> torch.Tensor:
    """Offset the weight-holding device so that w' = w + sigma·scale·N(0, 1) (scale = abs-max)."""
    assert programming.sigma is not None
    delta = programming.sigma * weight_delta_to_conductance(mapping) * randn(g.shape[1:], generator, g)
    if g.shape[0] == 1:
        g_new = g + delta.unsqueeze(0)
    else:
        positive = g[0] >= g[1]
        zero = torch.zeros_like(delta)
        g_new = g + torch.stack([torch.where(positive, delta, zero), torch.where(positive, zero, -delta)])
    return g_new.clamp_min(0.0) if programming.clamp_nonnegative else g_new


@dataclass(frozen=True)
class Faults:
    """Per-polarity fault fractions: ``healthy`` (share of working devices) and ``stuck_on`` share."""

    healthy: torch.Tensor
    stuck_on: torch.Tensor

    def apply_target(self, g: torch.Tensor) -> torch.Tensor:
        """Target conductance carried by the working devices."""
        return g * self.healthy

    def finish(self, g: torch.Tensor, g_max: float) -> torch.Tensor:
        """Zero fully stuck polarities (no noise reaches them) and add the stuck-on devices at g_max."""
        g = torch.where(self.healthy > 0, g, torch.zeros_like(g))
        return g + self.stuck_on * g_max


def draw_faults(
    shape: torch.Size,
    faults: FaultSpec,
    devices_per_polarity: int,
    generator: torch.Generator,
    like: torch.Tensor,
) -> Faults | None:
    """Draw stuck-off (g = 0) / stuck-on (g = g_max) devices; None when the profile has no faults."""
    if faults.stuck_off == 0 and faults.stuck_on == 0:
        return None
    u = rand((devices_per_polarity, *shape), generator, like)
    off = u < faults.stuck_off
    on = (~off) & (u < faults.stuck_off + faults.stuck_on)
    n = float(devices_per_polarity)
    healthy = 1.0 - (off.sum(0) + on.sum(0)).float() / n
    return Faults(healthy=healthy, stuck_on=on.sum(0).float() / n)
