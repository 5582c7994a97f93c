"""Per-MVM effects of an analog layer y = x·Wᵀ (aihwkit ``IOParameters`` semantics, per input tile).

For every input tile j (a slice of the input features) and every input vector:

1. noise management: α_j = max|x_j| (per vector), x̂ = x_j/α_j ∈ [-1, 1];
2. DAC: x̂ rounded to a grid of 2^dac_bits − 2 steps over [-1, 1] (254 steps at 8 bit);
3. analog MVM with the normalised weights Ŵ_j = W_j/s_j (|ŵ| ≤ 1, s_j the per-channel digital scale);
4. per-MVM noise: out_noise·N(0,1) per output, plus w_noise with σ_i = w_noise·√(Σ_k |ŵ_ik| x̂_k²)
   (``pcm_read``) or σ_i = w_noise·‖x̂‖ (``additive_constant``), both drawn in one normal per output;
5. clip to ±out_bound and ADC rounding to 2^adc_bits − 2 steps over [-out_bound, out_bound];
6. scale back digitally (·α_j·s_j) and add the input-tile partial sums digitally.

Output tiles only concatenate outputs, so they need no separate treatment here. Everything is float32;
normalised weights are prepared once per programming (:func:`prepare_mvm`) and each call costs one
batched matmul over the input tiles (two with ``pcm_read`` w_noise). To save passes over the output,
the prepared weights are expressed in ADC steps (``unit``): the matmul result is already in ADC units,
noise σ and out_bound are divided by ``unit`` and the digital scales multiplied by it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cimconvert.profiles.schema import ChipProfile, MvmSpec
from cimconvert.simulator.mapping import weight_scales
from cimconvert.simulator.program import Layout, to_out_in
from cimconvert.simulator.rng import NoiseSource, mvm_normal
from cimconvert.simulator.tiles import tile_grid, to_tiles


@dataclass(frozen=True)
class MvmWeights:
    """Prepared analog weights of one matrix or a stack of expert matrices.

    ``weight_t``: normalised weights / ``unit``, ``[..., n_in, max_in, out]`` (input tiles zero-padded);
    ``abs_weight_t``: |normalised weights| / unit² when ``pcm_read`` w_noise is on, else None;
    ``scales``: digital output scales · ``unit``, ``[..., n_in, 1, out]``; ``in_sizes``: inputs per tile;
    ``unit``: the ADC step in normalised output units (1.0 with an ideal ADC).
    """

    weight_t: torch.Tensor
    abs_weight_t: torch.Tensor | None
    scales: torch.Tensor
    in_sizes: tuple[int, ...]
    spec: MvmSpec
    unit: float = 1.0

    @property
    def out_features(self) -> int:
        """Number of outputs."""
        return int(self.weight_t.shape[-1])

    def expert(self, index: int) -> MvmWeights:
        """The prepared weights of expert ``index`` of a 3-D stack (views, no copy)."""
        abs_w = self.abs_weight_t[index] if self.abs_weight_t is not None else None
        return MvmWeights(
            self.weight_t[index], abs_w, self.scales[index], self.in_sizes, self.spec, self.unit
        )


def step_size(bits: int | None, bound: float) -> float | None:
    """Quantiser step: 2·bound/(2^bits − 2) (254 steps at 8 bit); None for an ideal converter."""
    if bits is None:
        return None
    return 2.0 * bound / max(2**bits - 2, 1)


@torch.no_grad()
def prepare_mvm(
    w: torch.Tensor, profile: ChipProfile, layout: Layout = "out_in", scales: torch.Tensor | None = None
) -> MvmWeights:
    """Normalise programmed weights per tile for :func:`analog_matmul` (2-D or 3-D expert stacks).

    ``scales`` (``[..., out, n_in_tiles]``, from :func:`weight_scales` on the clean weights) are the
    digital output scales fixed at mapping time; by default they are taken from ``w`` itself.
    """
    w3 = to_out_in(w.detach(), layout)
    grid = tile_grid(w3.shape, profile.mapping)
    if scales is None:
        scales = weight_scales(w3, profile.mapping, grid)
    scales = scales.reshape(w3.shape[0], w3.shape[1], grid.n_in).float().to(w3.device)
    tiles = to_tiles(w3, grid.in_sizes, dim=-1)  # [E, out, n_in, max_in]
    normalised = tiles.new_empty((tiles.shape[0], tiles.shape[2], tiles.shape[3], tiles.shape[1]))
    for e in range(tiles.shape[0]):  # one expert at a time: one temporary of one matrix, not of the stack
        normalised[e] = (tiles[e] / scales[e].unsqueeze(-1)).permute(1, 2, 0)  # [n_in, max_in, out]
    scales_t = scales.permute(0, 2, 1).unsqueeze(-2).contiguous()  # [E, n_in, 1, out]
    if w.dim() == 2:
        normalised, scales_t = normalised[0], scales_t[0]
    spec = profile.mvm
    unit = step_size(spec.adc_bits, spec.out_bound) or 1.0
    abs_w = None
    if spec.w_noise > 0 and spec.w_noise_type == "pcm_read":
        abs_w = normalised.abs().mul_(1.0 / unit**2)
    return MvmWeights(normalised.mul_(1.0 / unit), abs_w, scales_t * unit, grid.in_sizes, spec, unit)


def quantise_(x: torch.Tensor, bits: int | None, bound: float) -> torch.Tensor:
    """Round in place to a grid of 2^bits − 2 steps over [-bound, bound] (round to nearest)."""
    step = step_size(bits, bound)
    if step is None:
        return x
    return x.div_(step).round_().mul_(step)


def _dac(xt: torch.Tensor, bits: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise management + DAC: (x̂ = Q(x/α), α) with α = max|x| per vector (tiny for all-zero vectors)."""
    alpha = xt.abs().amax(-1, keepdim=True).clamp_min_(torch.finfo(torch.float32).tiny)
    step = step_size(bits, 1.0)
    if step is None:
        return xt / alpha, alpha
    return xt.div(alpha * step).round_().mul_(step), alpha


def _noise_sigma(xn: torch.Tensor, mw: MvmWeights) -> torch.Tensor | float:
    """Std of the per-MVM output noise in ADC units, ``[n_in, N, out]``-broadcastable (0.0 when off)."""
    spec = mw.spec
    var: torch.Tensor | float = (spec.out_noise / mw.unit) ** 2
    if spec.w_noise > 0:
        if mw.abs_weight_t is not None:
            read = torch.matmul(xn * xn, mw.abs_weight_t)  # Σ_k |ŵ_ik| x̂_k² / unit²
        else:
            read = (xn * xn).sum(-1, keepdim=True).mul_(1.0 / mw.unit**2)  # ‖x̂‖² / unit²
        var = read.mul_(spec.w_noise**2).add_(var)
    return var.sqrt_() if isinstance(var, torch.Tensor) else var**0.5


def _add_noise_(y: torch.Tensor, xn: torch.Tensor, mw: MvmWeights, source: NoiseSource | None) -> None:
    """Add out_noise and w_noise (one normal per output and MVM) in place.

    ``y += ε·σ`` as a multiply then an add (no fused multiply-add), the float32 operations of the ONNX
    per-MVM body, so that with counter noise both runtimes round alike.
    """
    sigma = _noise_sigma(xn, mw)
    if isinstance(sigma, float) and sigma == 0:
        return
    if source is None:
        raise ValueError("per-MVM noise needs a generator or a counter noise source")
    noise = mvm_normal(y.shape, source, y)
    y.add_(noise.mul_(sigma))


def _digital_sum(y: torch.Tensor, alpha: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Σ_j y_j·α_j·s_j over the input tiles (axis 0)."""
    out = y[0].mul_(alpha[0]).mul_(scales[0])
    for j in range(1, y.shape[0]):
        out.addcmul_(y[j].mul_(alpha[j]), scales[j])
    return out


@torch.no_grad()
def analog_matmul(x: torch.Tensor, mw: MvmWeights, generator: NoiseSource | None) -> torch.Tensor:
    """Simulated analog y = x·Wᵀ for ``x [..., in]`` → ``[..., out]`` in x's dtype (no bias).

    ``generator`` drives the per-MVM noise (required when out_noise or w_noise is on): a
    ``torch.Generator`` or a :class:`~cimconvert.simulator.rng.CounterNoise` (counter mode).
    """
    spec = mw.spec
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float()
    xt = to_tiles(x2, mw.in_sizes, dim=-1).transpose(0, 1)  # [n_in, N, max_in]
    xn, alpha = _dac(xt, spec.dac_bits)
    y = torch.matmul(xn, mw.weight_t)  # [n_in, N, out], in ADC units
    _add_noise_(y, xn, mw, generator)
    bound = spec.out_bound / mw.unit
    y.clamp_(-bound, bound)
    if spec.adc_bits is not None:
        y.round_()
    return _digital_sum(y, alpha, mw.scales).reshape(*lead, mw.out_features).to(x.dtype)
