"""Router-logit calibration fits: per-expert affine percentile map and per-token normalisation.

Both are fitted on calibration text from the clean model's logits (the reference) and the noisy model's
logits (pooled over the fitting noise draws, or one programmed instance for in-situ calibration).

* ``affine``: per expert e, ``z'_e = a_e·z_e + b_e`` maps the noisy logits' (P_lo, P_hi) percentiles
  onto the clean logits' percentiles (``a_e`` clamped to [1/8, 8]).
* ``token_norm``: ``z' = (z − median(z)) / (P_q(z) − P_(1−q)(z)) · s + m`` per token, across experts;
  ``m`` is the clean logits' median (it matters only for sigmoid scoring) and the temperature ``s`` is
  chosen on a grid to minimise the divergence between the clean routing probabilities and the
  calibrated noisy ones on the calibration tokens (which are the same tokens in both runs).
"""

from __future__ import annotations

import math

import torch

from cimconvert.transforms.romer.hook import token_normalise

#: torch.quantile refuses inputs above 16M elements; larger columns are subsampled evenly.
_QUANTILE_LIMIT = 1 << 24
A_MIN, A_MAX = 1.0 / 8.0, 8.0


def column_percentiles(z: torch.Tensor, pcts: tuple[float, ...]) -> torch.Tensor:
    """Percentiles (0–100) of each column of ``z [T, E]``: ``[len(pcts), E]``."""
    if z.shape[0] > _QUANTILE_LIMIT // max(z.shape[1], 1):
        step = math.ceil(z.shape[0] * z.shape[1] / _QUANTILE_LIMIT)
        z = z[::step]
    q = torch.tensor([p / 100.0 for p in pcts], dtype=torch.float32)
    return torch.quantile(z.float(), q, dim=0)


def fit_affine(
    noisy: torch.Tensor, clean: torch.Tensor, p_lo: float, p_hi: float
) -> tuple[list[float], list[float]]:
    """Per-expert ``(a, b)`` mapping the noisy (p_lo, p_hi) percentiles onto the clean ones."""
    n = column_percentiles(noisy, (p_lo, p_hi))
    c = column_percentiles(clean, (p_lo, p_hi))
    spread_n = (n[1] - n[0]).clamp_min(1e-6)
    a = ((c[1] - c[0]) / spread_n).clamp(A_MIN, A_MAX)
    b = c[0] - a * n[0]
    return [float(x) for x in a], [float(x) for x in b]


def within_deadband(
    a: list[float], b: list[float], clean: torch.Tensor, p_lo: float, p_hi: float, deadband: float
) -> bool:
    """True when the affine map is identity up to ``deadband``: |a_e − 1| and |b_e| / clean spread.

    Zero-mean noise leaves no systematic distortion to correct; a map fitted to it is noise itself, and
    skipping it avoids the small loss it causes (docs/ROMER.md).
    """
    if deadband <= 0:
        return False
    c = column_percentiles(clean, (p_lo, p_hi))
    spread = (c[1] - c[0]).clamp_min(1e-6)
    a_t, b_t = torch.tensor(a), torch.tensor(b)
    # b measured at the clean median, where the map's shift acts
    mid = (c[0] + c[1]) / 2
    shift = (a_t * mid + b_t - mid).abs() / spread
    return bool((a_t - 1).abs().max() < deadband and shift.max() < deadband)


def spread_ratio(noisy: torch.Tensor, clean: torch.Tensor, p_lo: float, p_hi: float) -> float:
    """Mean over experts of the noisy/clean (P_hi − P_lo) logit spread: < 1 means the logits shrank."""
    n = column_percentiles(noisy, (p_lo, p_hi))
    c = column_percentiles(clean, (p_lo, p_hi))
    return float(((n[1] - n[0]) / (c[1] - c[0]).clamp_min(1e-6)).mean())


def _divergence(reference: torch.Tensor, z: torch.Tensor, scoring: str) -> float:
    """Mean KL(p_ref || p_z) over tokens (softmax) or mean squared score error (sigmoid)."""
    if scoring == "sigmoid":
        return float((reference.sigmoid() - z.sigmoid()).pow(2).mean())
    log_ref = torch.log_softmax(reference, dim=-1)
    log_z = torch.log_softmax(z, dim=-1)
    return float((log_ref.exp() * (log_ref - log_z)).sum(-1).mean())


def fit_token_norm(
    noisy: torch.Tensor, clean: torch.Tensor, q: float, scoring: str, grid: int = 41
) -> tuple[float, float]:
    """``(scale, shift)`` of the per-token normalisation (see the module docstring).

    ``noisy [R·T, E]`` holds R runs over the same ``T`` calibration tokens as ``clean [T, E]``.
    """
    reference = clean.float().repeat(max(1, noisy.shape[0] // clean.shape[0]), 1)[: noisy.shape[0]]
    shift = float(clean.float().median(dim=-1).values.median()) if scoring == "sigmoid" else 0.0
    unit = token_normalise(noisy, q, 1.0, 0.0)
    spreads = torch.quantile(clean.float(), torch.tensor([1.0 - q, q]), dim=-1)
    s_ref = float((spreads[1] - spreads[0]).median().clamp_min(1e-3))
    best = (math.inf, s_ref)
    for s in (s_ref * math.exp(x) for x in torch.linspace(-1.5, 1.5, grid).tolist()):
        loss = _divergence(reference, unit * s + shift, scoring)
        if loss < best[0]:
            best = (loss, s)
    return best[1], shift
