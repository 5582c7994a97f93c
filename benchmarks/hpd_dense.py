#!/usr/bin/env python
"""Does HPD help outside SSMs? SVD split of output projections of the demo MoE transformer.

tiny-olmoe (tied LM head: the baseline head is the embedding and stays digital, so splitting it can only
add analog noise) — decomposes the last decoder layer's attention output projection ``o_proj`` and, as a
second case, the LM head with its U·Σ factor forced analog. Held-out PPL, mean ± std over the same 5
noise seeds for every variant, under chipA and relative-Gaussian noise.
Writes benchmarks/results/hpd_dense.{json,md}.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hpd_dense.py
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter, load_pretrained
from cimconvert.datasets import load_text, tokenize
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.methods.hpd import apply_hpd, hpd_placement
from cimconvert.profiles import load_profile

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODEL = REPO / "examples" / "models" / "tiny-olmoe"
SEEDS = range(1000, 1005)
PROFILES = ["chipA", "gaussian:sigma=0.2", "gaussian:sigma=0.4"]
VARIANTS = {
    "baseline": ((), ()),
    "o_proj us_v": (("model.layers.3.self_attn.o_proj",), ()),
    "o_proj hadamard": (("model.layers.3.self_attn.o_proj",), ()),
    "lm_head us_v (analog)": (("lm_head",), ("lm_head",)),
}


def noisy_ppl(
    model: torch.nn.Module, tokens: torch.Tensor, profile: str, analog: tuple[str, ...]
) -> list[float]:
    """Perplexity under each seed's programmed chip."""
    chip = load_profile(profile)
    targets = hpd_placement(model, chip, analog=list(analog)).analog()
    values = []
    for seed in SEEDS:
        with apply_chip_noise(model, targets, chip, seed):
            values.append(perplexity(model, tokens, seq_len=256))
    return values


def main() -> None:
    """Evaluate every variant under every profile; write json + md."""
    torch.set_num_threads(1)
    base = load_pretrained(MODEL, dtype=torch.float32)
    from transformers import AutoTokenizer

    tokens = tokenize(AutoTokenizer.from_pretrained(MODEL), load_text("heldout"), 4096)
    rows = []
    for variant, (layers, analog) in VARIANTS.items():
        model = copy.deepcopy(base)
        if layers:
            factor = "hadamard" if "hadamard" in variant else "us_v"
            apply_hpd(model, get_adapter(model.config), list(layers), factor=factor)
        clean = perplexity(model, tokens, seq_len=256)
        for profile in PROFILES:
            values = noisy_ppl(model, tokens, profile, analog)
            rows.append({"variant": variant, "profile": profile, "clean_ppl": clean, "per_seed": values,
                         "mean": statistics.fmean(values), "std": statistics.stdev(values)})
            print(f"{variant:24s} {profile:20s} clean {clean:7.2f} noisy {rows[-1]['mean']:7.2f} "
                  f"± {rows[-1]['std']:.2f}", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "hpd_dense.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    lines = ["| variant | clean | " + " | ".join(PROFILES) + " |", "|---|---|" + "---|" * len(PROFILES)]
    for variant in VARIANTS:
        cells = {r["profile"]: r for r in rows if r["variant"] == variant}
        clean = next(iter(cells.values()))["clean_ppl"]
        lines.append(f"| {variant} | {clean:.2f} | "
                     + " | ".join(f"{cells[p]['mean']:.4g} ± {cells[p]['std']:.2g}" for p in PROFILES) + " |")
    intro = (__doc__ or "").split("\n\n")[1]
    text = f"# HPD on a non-SSM model (tiny-olmoe)\n\n{intro}\n\n" + "\n".join(lines) + "\n"
    (RESULTS / "hpd_dense.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
