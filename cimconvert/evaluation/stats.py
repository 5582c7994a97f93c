"""Paired comparison of two runtimes' per-seed perplexities when their noise draws differ.

Used by ``cimconvert validate --mvm-noise native``: per seed both runtimes share the programmed weights
but draw their per-MVM noise from different generators, so per-seed perplexities differ by chance. The
test works on ``d_i = ln(PPL_a,i / PPL_b,i)`` (paired by seed):

* **difference** (false-failure rate ``alpha``): two-sided one-sample Student t-test of ``E[d] = 0``;
  a correct pair of runtimes is rejected with probability ``alpha``;
* **equivalence** (TOST, level ``alpha``): the ``1 − 2·alpha`` confidence interval of ``E[d]`` lies in
  ``±ln(1 + margin)``; a pair differing by more than ``margin`` passes with probability ≤ ``alpha``.

Verdict: ``fail`` when the difference test rejects, ``pass`` when equivalence is shown, else
``inconclusive`` (too few seeds for the spread; never a pass).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

_EPS = 1e-15
_TINY = 1e-300


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 ≤ x ≤ 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_sf2(t: float, df: int) -> float:
    """Two-sided tail probability P(|T| ≥ |t|) of Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.5 < p < 1.0:
        raise ValueError("t_quantile needs 0.5 < p < 1")
    lo, hi = 0.0, 1.0
    while t_sf2(hi, df) / 2.0 > 1.0 - p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_sf2(mid, df) / 2.0 > 1.0 - p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def paired_log_ratio_test(
    a: Sequence[float], b: Sequence[float], alpha: float = 0.01, margin: float = 0.01
) -> dict[str, Any]:
    """Difference + equivalence test of per-seed values ``a`` vs ``b`` (see the module docstring)."""
    if len(a) != len(b):
        raise ValueError("paired test needs as many values on each side")
    d = [math.log(x / y) for x, y in zip(a, b, strict=True)]
    n = len(d)
    bound = math.log1p(margin)
    out: dict[str, Any] = {
        "method": "paired t-test on ln(PPL_onnxruntime/PPL_torch) per seed + TOST equivalence",
        "n": n, "alpha": alpha, "margin": margin,
        "mean_log_ratio": statistics.fmean(d) if d else float("nan"),
        "sd_log_ratio": None, "t": None, "df": n - 1, "p_value": None,
        "ci_low": None, "ci_high": None, "rejected": False, "equivalent": False,
    }  # fmt: skip
    if n < 2:
        return {**out, "verdict": "inconclusive"}
    mean, sd = out["mean_log_ratio"], statistics.stdev(d)
    se = sd / math.sqrt(n)
    t = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    half = t_quantile(1.0 - alpha, n - 1) * se
    low, high = mean - half, mean + half
    out.update(sd_log_ratio=sd, t=t, p_value=t_sf2(t, n - 1))
    out.update(ci_low=math.expm1(low), ci_high=math.expm1(high))
    out["rejected"] = out["p_value"] < alpha
    out["equivalent"] = -bound < low and high < bound
    verdict = "fail" if out["rejected"] else ("pass" if out["equivalent"] else "inconclusive")
    return {**out, "verdict": verdict}
