"""Random draws from an explicit ``torch.Generator`` (the only source of randomness in the simulator)."""

from __future__ import annotations

import torch


def randn(
    shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor
) -> torch.Tensor:
    """Standard normal draws in float32 on the generator's device, moved to ``like``'s device."""
    draw = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.to(like.device)


def rand(shape: torch.Size | tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Uniform [0, 1) draws in float32 on the generator's device, moved to ``like``'s device."""
    draw = torch.rand(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return draw.to(like.device)
