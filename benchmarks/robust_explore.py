"""Exploration behind a default (not evaluation): the MoE build's recipe with and without ROMER.

Measured on WikiText-2 *valid* (1024 tokens) with chip draws 500-501, never the held-out text, WikiText-2
test or the evaluation draws 5000-5004 of ``robust.py``: the choice of ``methods/defaults.py``'s MoE
recipe is made here, the rows of ``robust.py`` then report it. Writes
``benchmarks/results/robust_explore_romer.json``.

    CIMCONVERT_SHARED_DATA=<shared>/data .venv/bin/python benchmarks/robust_explore.py
"""

from __future__ import annotations

import copy
import json
import time

import torch
from robust import RESULTS, apply_recipe, evaluate, load_model

from cimconvert.datasets import load_text, tokenize
from cimconvert.methods import defaults

SEEDS = [500, 501]
TOKENS = 1024


def main() -> None:
    """Measure both variants and write the result file."""
    torch.set_num_threads(1)
    base, tokenizer = load_model("smollm2-135m-moe")
    tokens = {"wikitext2-valid": tokenize(tokenizer, load_text("wikitext2-valid"), TOKENS)}
    variants = {"outliers+corr": list(defaults.DENSE),
                "outliers+corr+romer": [*defaults.DENSE, {"step": "romer"}]}  # fmt: skip
    out = {"model": "smollm2-135m-moe", "profile": "chipA", "seeds": SEEDS, "tokens": TOKENS, "variants": {}}
    for label, steps in variants.items():
        start = time.perf_counter()
        model = copy.deepcopy(base)
        placement, _ = apply_recipe(model, "chipA", steps)
        result = evaluate(model, placement, "chipA", tokens, SEEDS)
        out["variants"][label] = {"steps": steps, **result, "seconds": round(time.perf_counter() - start, 1)}
        print(label, json.dumps(result), flush=True)
    (RESULTS / "robust_explore_romer.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
