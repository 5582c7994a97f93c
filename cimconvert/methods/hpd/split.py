"""The matrix factorisations behind the HPD split layer.

A linear layer ``y = W·x + b`` with ``W [out, in]`` is replaced by :class:`HpdLinear` (defined with its
bundle loader in :mod:`cimconvert.transforms.hpd_split`), which computes
``y = A·(D·x) + b``: ``D [r, in]`` runs on the digital unit (child module ``digital``), ``A [out, r]`` on
the analog array (child module ``analog``, which also owns the bias; the simulator adds biases
digitally). ``A·D = W`` up to float error at full rank.

Factor orientations of the SVD ``W = U·Σ·Vᵀ`` (computed in float64):

* ``us_v``  — A = U·Σ, D = Vᵀ (the paper: "U·Σ on the analog array, Vᵀ on digital hardware");
* ``sqrt``  — A = U·√Σ, D = √Σ·Vᵀ;
* ``u``     — A = U, D = Σ·Vᵀ;
* ``hadamard`` — not an SVD: A = W·H, D = H with H the orthonormal (block-)Hadamard matrix of size
  ``in`` (H·H = I), a fixed rotation of the analog input as a cheap baseline.

Keeping the two factors as separate ``nn.Linear`` children keeps the noise simulator's per-MVM hook on
the analog factor alone, with the rotated input ``D·x`` as its input — as on the chip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cimconvert.errors import CimError
from cimconvert.transforms.hpd_split import HpdLinear

#: Factor orientations: name → what goes analog / digital (for help texts and reports).
FACTORS: dict[str, str] = {
    "us_v": "U·Σ analog, Vᵀ digital (the paper)",
    "sqrt": "U·√Σ analog, √Σ·Vᵀ digital",
    "u": "U analog, Σ·Vᵀ digital",
    "hadamard": "W·H analog, H digital (fixed Hadamard rotation baseline)",
}
@dataclass(frozen=True)
class Factors:
    """The two factors of one decomposed matrix (float64) and the singular values (None for Hadamard)."""

    analog: torch.Tensor
    digital: torch.Tensor
    singular_values: torch.Tensor | None


def hadamard_matrix(n: int) -> torch.Tensor:
    """Orthonormal, symmetric Hadamard-type matrix of size ``n`` (float64); ``H·H = I``.

    ``n = m·2^k``: ``I_m ⊗ H_{2^k}`` (Sylvester blocks along the diagonal). An odd ``n`` has no
    Hadamard block and is an error.
    """
    power = n & -n  # largest power of two dividing n
    if power < 2:
        raise CimError(f"hpd_factor hadamard needs an even input size (got {n})")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < power:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(power)
    return torch.block_diag(*([h] * (n // power)))


def decompose(weight: torch.Tensor, factor: str, rank: int | None = None) -> Factors:
    """Split ``weight [out, in]`` into (analog ``[out, r]``, digital ``[r, in]``) in float64.

    ``rank`` keeps the ``rank`` largest singular triplets (None: full rank ``min(out, in)``; not
    accepted with ``hadamard``).
    """
    if factor not in FACTORS:
        raise CimError(f"unknown hpd_factor '{factor}' (choose from {', '.join(FACTORS)})")
    w = weight.detach().to(torch.float64)
    out_f, in_f = w.shape
    full = min(out_f, in_f)
    if factor == "hadamard":
        if rank is not None:
            raise CimError("hpd_rank cannot be combined with hpd_factor hadamard (a full rotation)")
        h = hadamard_matrix(in_f)
        return Factors(w @ h, h, None)
    if rank is not None and not 1 <= rank <= full:
        raise CimError(f"hpd_rank {rank} is out of range for a {out_f}x{in_f} matrix (1..{full})")
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    r = rank or full
    u, s, vh = u[:, :r], s[:r], vh[:r]
    if factor == "us_v":
        return Factors(u * s, vh, s)
    if factor == "sqrt":
        root = s.sqrt()
        return Factors(u * root, root[:, None] * vh, s)
    return Factors(u, s[:, None] * vh, s)


def weight_matrix(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W [out, in], bias)`` of an ``nn.Linear`` or a GPT-2 ``Conv1D`` (whose weight is ``[in, out]``)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if isinstance(module, Conv1D):
        return module.weight.t(), module.bias
    raise CimError(f"HPD needs a linear layer, got {type(module).__name__}")


def build_split(module: nn.Module, factor: str, rank: int | None = None) -> tuple[HpdLinear, Factors]:
    """A :class:`HpdLinear` equivalent to ``module`` (factors cast to its dtype) and the float64 factors."""
    weight, bias = weight_matrix(module)
    factors = decompose(weight, factor, rank)
    split = HpdLinear(
        in_features=weight.shape[1],
        out_features=weight.shape[0],
        rank=factors.digital.shape[0],
        bias=bias is not None,
        dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        split.analog.weight.copy_(factors.analog.to(weight.dtype))
        split.digital.weight.copy_(factors.digital.to(weight.dtype))
        if bias is not None:
            split.analog.bias.copy_(bias.detach())
    return split.train(module.training), factors
