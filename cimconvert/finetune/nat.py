"""Standard noise-aware training (the baseline): differentiable noise injected inside autograd.

Two noise models, both built in the autograd graph each step and both seeded from (seed, step):

* ``gaussian`` (default; aihwkit ``ADD_NORMAL`` / analog-foundation-models ``add_gauss_channel``):
  ``W̃ = W + σ·max|W_row|·ε`` per output channel (per expert for fused tensors), ε ~ N(0, 1). The
  abs-max is not detached, so the gradient also flows through the noise term. σ defaults to the
  profile's *effective relative weight noise*: the RMS of ``(H(W) − W)/max|W_row|`` over every analog
  tensor for one calibration draw of the full weight-level chip chain (:func:`matched_sigma`).
* ``chip``: the simulator's weight-level chain (mapping, faults, programming noise, drift, 1/f read
  noise, compensation) evaluated *inside* autograd (``simulator.program.program_block`` is written with
  out-of-place ops), i.e. "the same chip model written differentiably"; gradients flow through the
  conductance-dependent σ(g), the drift exponents and the compensation gain.

Neither runs the per-MVM quantisers (their gradient is zero almost everywhere; a differentiable
model idealises them away), which is the gap the straight-through method closes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import nn

from cimconvert.errors import CimError
from cimconvert.finetune.base import Target, generator, iter_targets, named_parameters, step_seed
from cimconvert.profiles import ChipProfile
from cimconvert.simulator import program_weight, tile_grid, weight_scales
from cimconvert.simulator.program import Layout, out_in_view, program_block
from cimconvert.simulator.rng import stable_seed

NatKind = Literal["gaussian", "chip"]
NAT_KINDS: tuple[str, ...] = ("gaussian", "chip")
#: Seed stream of the calibration draw behind :func:`matched_sigma` (never a training or eval draw).
CALIBRATION_STREAM = "nat-calibration"


def row_absmax(w3: torch.Tensor) -> torch.Tensor:
    """max|w| per output channel of ``[..., out, in]`` (differentiable; tiny floor for all-zero rows)."""
    return w3.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(w3.dtype).tiny)


@torch.no_grad()
def matched_sigma(model: nn.Module, targets: Sequence[Target], profile: ChipProfile, seed: int = 0) -> float:
    """RMS of ``(H(W) − W)/max|W_row|`` over all analog weights for one calibration draw of ``profile``."""
    params = named_parameters(model, targets)
    base = stable_seed(seed, CALIBRATION_STREAM)
    total, count = 0.0, 0
    for target, param in iter_targets(targets, params):
        w = param.detach()
        h = program_weight(w, profile, generator(stable_seed(base, target.name)), target.layout)
        w3, h3 = out_in_view(w, target.layout).float(), out_in_view(h, target.layout).float()
        rel = (h3 - w3) / row_absmax(w3)
        total += float(rel.pow(2).sum())
        count += rel.numel()
    return math.sqrt(total / max(count, 1))


def gaussian_weight(w: torch.Tensor, layout: Layout, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """``W + σ·max|W_row|·ε`` inside autograd (same shape and layout as ``w``)."""
    w3 = out_in_view(w, layout)
    eps = torch.randn(w3.shape, generator=gen, dtype=w3.dtype).to(w3.device)  # CPU draws, any device
    noisy = w3 + sigma * row_absmax(w3) * eps
    return out_in_view(noisy, layout)


def chip_weight(w: torch.Tensor, layout: Layout, profile: ChipProfile, gen: torch.Generator) -> torch.Tensor:
    """The simulator's weight-level chain inside autograd (differentiable ``program_weight``)."""
    w3 = out_in_view(w, layout).float()
    w3 = w3 if w3.dim() == 3 else w3.unsqueeze(0)
    grid = tile_grid(w3.shape, profile.mapping)
    out = program_block(w3, weight_scales(w3, profile.mapping, grid), grid, profile, gen)
    out = out if w.dim() == 3 else out.squeeze(0)
    return out_in_view(out, layout).to(w.dtype)


class NatNoise:
    """Differentiable noise-aware training baseline (see the module docstring)."""

    name = "nat"

    def __init__(
        self,
        model: nn.Module,
        targets: Sequence[Target],
        profile: ChipProfile,
        seed: int,
        kind: str = "gaussian",
        sigma: float | None = None,
    ) -> None:
        if kind not in NAT_KINDS:
            raise CimError(f"unknown NAT noise model '{kind}' (expected one of: {', '.join(NAT_KINDS)})")
        if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
            raise CimError(f"NAT sigma must be a finite number >= 0, got {sigma}")
        self.model = model
        self.targets = list(targets)
        self.profile = profile
        self.seed = seed
        self.kind: NatKind = kind  # type: ignore[assignment]
        self.params = named_parameters(model, self.targets)
        self.sigma_source = "given" if sigma is not None else "matched"
        if kind == "gaussian" and sigma is None:
            sigma = matched_sigma(model, self.targets, profile, seed)
        self.sigma = sigma

    def describe(self) -> dict[str, Any]:
        """Method summary (JSON-serialisable)."""
        forward = (
            f"W + sigma*max|W_row|*eps, sigma={self.sigma:.4g} ({self.sigma_source})"
            if self.kind == "gaussian"
            else "chip weight-level chain inside autograd"
        )
        return {
            "method": self.name,
            "nat_noise": self.kind,
            "sigma": self.sigma,
            "sigma_source": self.sigma_source if self.kind == "gaussian" else None,
            "forward": forward,
            "backward": "autograd through the noise model",
            "analog_tensors": len(self.targets),
        }

    @contextmanager
    def perturbed(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Noisy weights of ``step``, differentiable w.r.t. the parameters (noise path included)."""
        base = step_seed(self.seed, step, "nat")
        weights: dict[str, torch.Tensor] = {}
        for target, param in iter_targets(self.targets, self.params):
            gen = generator(stable_seed(base, target.name))
            if self.kind == "gaussian":
                assert self.sigma is not None
                weights[target.name] = gaussian_weight(param, target.layout, self.sigma, gen)
            else:
                weights[target.name] = chip_weight(param, target.layout, self.profile, gen)
        yield weights
