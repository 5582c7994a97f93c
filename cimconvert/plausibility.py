"""Plausibility of a validation result: finite perplexities, and no worse than guessing tokens uniformly.

``cimconvert validate`` compares onnxruntime with the torch simulator; two runtimes can agree on a
useless chip (a converter so coarse that every analog output rounds to zero gives the same huge
perplexity in both). :func:`fail_implausible` wraps ``validate`` so such a bundle FAILs with a reason.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any


def plausibility_problems(res: dict[str, Any], vocab_size: int | None) -> list[str]:
    """Why a validation result cannot pass however well the two runtimes agree (empty: plausible).

    Every clean and noisy perplexity must be finite, and no noisy mean may exceed the vocabulary size:
    a model that does worse than guessing tokens uniformly has lost its outputs (e.g. a converter so
    coarse that every analog output rounds to zero), even if onnxruntime and torch agree on it.
    """
    problems = []
    for runtime in ("onnxruntime", "torch"):
        part = res[runtime]
        values = [("clean", part["clean_ppl"]), ("noisy mean", part["noisy_ppl"]["mean"])]
        per_seed = zip(res["seeds"], part["noisy_ppl"]["per_seed"], strict=False)
        values += [(f"noisy seed {s}", v) for s, v in per_seed]
        for label, value in values:
            if not math.isfinite(value):
                problems.append(f"{runtime} {label} perplexity is {value}")
                break
        mean = part["noisy_ppl"]["mean"]
        if vocab_size and math.isfinite(mean) and mean > vocab_size:
            problems.append(
                f"{runtime} noisy perplexity {mean:.4g} exceeds the vocabulary size {vocab_size} "
                "(worse than uniform guessing: the analog outputs are lost)"
            )
    return problems


def fail_implausible(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Decorate :func:`validate`: add ``summary.problems`` and FAIL on :func:`plausibility_problems`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> dict[str, Any]:
        res = fn(*args, **kwargs)
        config = json.loads((Path(res["bundle"]) / "config.json").read_text(encoding="utf-8"))
        vocab = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
        problems = plausibility_problems(res, vocab)
        res["summary"]["problems"] = problems
        res["summary"]["passed"] = bool(res["summary"]["passed"] and not problems)
        return res

    return wrapper
