"""Evaluate fitted device curves f(x) (drift exponent mean/std, 1/f factor Q_s) on tensors.

A curve is a list of :class:`~cimconvert.profiles.schema.CurvePiece`; piece ``i`` applies where
``x < below_i`` and no earlier piece applied; the last piece (no ``below``) covers the rest. Each
piece is ``poly`` (Σ c_k x^k), ``log`` (a·ln x + b) or ``power`` (c·x^p), then optionally clipped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cimconvert.profiles.schema import CurvePiece

#: Smallest x fed to ln/power so that x = 0 gives a large finite value (then clipped), never NaN.
X_FLOOR = 1e-7


def eval_piece(piece: CurvePiece, x: torch.Tensor) -> torch.Tensor:
    """Value of one curve piece at ``x`` (clip applied)."""
    if piece.poly is not None:
        value = eval_poly(piece.poly, x)
    elif piece.log is not None:
        a, b = piece.log
        value = torch.log(x.clamp_min(X_FLOOR)).mul_(a).add_(b)
    else:
        assert piece.power is not None
        c, p = piece.power
        value = torch.pow(x.clamp_min(X_FLOOR), p).mul_(c)
    if piece.clip is not None:
        value = value.clamp_(piece.clip[0], piece.clip[1])
    return value


def eval_curve(curve: Sequence[CurvePiece], x: torch.Tensor) -> torch.Tensor:
    """Piecewise value of ``curve`` at every element of ``x`` (same shape and dtype)."""
    result = eval_piece(curve[-1], x)
    # Walk earlier pieces back to front so the first matching ``below`` wins.
    for piece in reversed(curve[:-1]):
        assert piece.below is not None
        result = torch.where(x < piece.below, eval_piece(piece, x), result)
    return result


def eval_poly(coeffs: Sequence[float], x: torch.Tensor) -> torch.Tensor:
    """Σ c_k x^k (Horner, in place on one buffer) on a tensor."""
    value = torch.full_like(x, float(coeffs[-1]))
    for coeff in reversed(coeffs[:-1]):
        value.mul_(x).add_(float(coeff))
    return value
