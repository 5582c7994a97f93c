#!/usr/bin/env python
"""HPD evaluation: held-out perplexity and PIQA accuracy, clean / noisy baseline / HPD variants.

One command (CPU, one thread, ~15 minutes for the two demo Mamba models)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hpd_eval.py

For each demo model the last block's ``mixer.out_proj`` is decomposed in every orientation (``us_v``,
``sqrt``, ``u``) and with the Hadamard baseline; ``digital`` keeps that layer exact (HPD's ceiling).
Noise conditions: chipA, chipB and relative-Gaussian levels (per-channel abs-max) on every analog tensor
(``all``), plus Gaussian noise in the decomposed layer alone (``layer``) to isolate the effect on that
matrix. Each cell is mean ± std over the same noise seeds for every variant. The "why" measurements:
singular spectrum, per-row max/rms of W and of each analog factor, activation outliers at the layer
input and after the digital factor. Writes benchmarks/results/hpd_eval.{json,md,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter, load_pretrained
from cimconvert.datasets import load_text, tokenize
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.evaluation.piqa import load_piqa, prepare_piqa, score_piqa
from cimconvert.methods.hpd import apply_hpd, hpd_placement
from cimconvert.methods.hpd.split import FACTORS, HpdLinear
from cimconvert.methods.hpd.stats import activation_stats, capture_inputs, row_dynamic_range, spectrum_stats
from cimconvert.profiles import load_profile

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = ("baseline", "digital", *FACTORS)
#: (label, profile spec, scope, run PIQA)
CONDITIONS = (
    ("chipA", "chipA", "all", True),
    ("chipB", "chipB", "all", True),
    ("gauss 0.1", "gaussian:sigma=0.1", "all", False),
    ("gauss 0.2", "gaussian:sigma=0.2", "all", False),
    ("gauss 0.35", "gaussian:sigma=0.35", "all", True),
    ("gauss 0.5", "gaussian:sigma=0.5", "all", False),
    ("gauss 0.5 layer", "gaussian:sigma=0.5", "layer", False),
    ("gauss 1.0 layer", "gaussian:sigma=1.0", "layer", False),
    ("MVM out_noise 0.5 layer", "chipA:programming.scale=0,mvm.out_noise=0.5", "layer", False),
)
PIQA_VARIANTS = ("baseline", "us_v")


def mean_std(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and the values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def build_variants(model: torch.nn.Module, layer: str) -> dict[str, torch.nn.Module]:
    """The baseline model, and one deep copy per HPD factor orientation with ``layer`` split."""
    adapter = get_adapter(model.config)
    variants = {"baseline": model, "digital": model}
    for factor in FACTORS:
        split = copy.deepcopy(model)
        apply_hpd(split, adapter, [layer], factor)
        variants[factor] = split
    return variants


def targets_for(name: str, model: torch.nn.Module, profile: Any, layer: str, scope: str) -> list[Any]:
    """Analog targets of a variant: all analog tensors (or only ``layer``'s); ``digital`` drops ``layer``."""
    targets = hpd_placement(model, profile).analog()
    if name == "digital":
        return [t for t in targets if not t.name.startswith(layer + ".")]
    if scope == "layer":
        return [t for t in targets if t.name.startswith(layer + ".")]
    return targets


def why_stats(variants: dict[str, torch.nn.Module], layer: str, tokens: torch.Tensor) -> dict[str, Any]:
    """Spectrum of W, per-row max/rms of W and of each analog factor, activation outliers before/after."""
    base = variants["baseline"]
    weight = base.get_submodule(layer).weight.detach()
    rows = min(8, tokens.numel() // 256)
    batches = [tokens[: rows * 256].reshape(rows, 256)]
    x = capture_inputs(base, [layer], batches)[layer]
    out: dict[str, Any] = {
        "layer": layer,
        "shape": list(weight.shape),
        "spectrum": spectrum_stats(torch.linalg.svdvals(weight.double())),
        "singular_values": torch.linalg.svdvals(weight.double()).tolist(),
        "dynamic_range": {"W": row_dynamic_range(weight)},
        "activations": {"input x": activation_stats(x)},
    }
    for factor in FACTORS:
        split = variants[factor].get_submodule(layer)
        assert isinstance(split, HpdLinear)
        out["dynamic_range"][factor] = row_dynamic_range(split.analog.weight)
        with torch.no_grad():
            out["activations"][f"after digital ({factor})"] = activation_stats(split.digital(x))
    return out


def evaluate_condition(
    variants: dict[str, torch.nn.Module],
    layer: str,
    condition: tuple[str, str, str, bool],
    tokens: torch.Tensor,
    piqa: Any,
    seeds: list[int],
    seq_len: int,
) -> dict[str, Any]:
    """PPL (and PIQA for flagged conditions) of every variant under one noise condition, per seed."""
    label, spec, scope, run_piqa = condition
    profile = load_profile(spec)
    cell: dict[str, Any] = {"profile": spec, "scope": scope, "ppl": {}, "piqa": {}}
    for name, model in variants.items():
        targets = targets_for(name, model, profile, layer, scope)
        if scope == "layer" and name == "digital":
            continue
        ppls, accs = [], []
        for seed in seeds:
            with apply_chip_noise(model, targets, profile, seed):
                ppls.append(perplexity(model, tokens, seq_len=seq_len))
                if run_piqa and name in PIQA_VARIANTS:
                    accs.append(score_piqa(model, piqa)["acc"])
        cell["ppl"][name] = mean_std(ppls)
        if accs:
            cell["piqa"][name] = mean_std(accs)
        print(f"  {label:16s} {name:9s} PPL {cell['ppl'][name]['mean']:9.2f} ± {cell['ppl'][name]['std']:.2f}"
              + (f"  PIQA {statistics.fmean(accs):.3f}" if accs else ""), flush=True)  # fmt: skip
    return cell


def evaluate_model(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Everything for one demo model."""
    from transformers import AutoTokenizer

    start = time.perf_counter()
    model = load_pretrained(path, dtype=torch.float32)  # demo checkpoints may be saved in bf16
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    tokens = tokenize(tokenizer, load_text("heldout"), args.tokens)
    piqa = prepare_piqa(tokenizer, load_piqa(args.piqa))
    layer = get_adapter(model.config).ssm_out_projs(model)[-1][0]
    variants = build_variants(model, layer)
    clean = {name: perplexity(m, tokens, seq_len=args.seq_len) for name, m in variants.items()}
    result: dict[str, Any] = {
        "model": str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path),
        "layer": layer,
        "tokens": int(tokens.numel()),
        "piqa_items": len(piqa),
        "clean_ppl": clean,
        "clean_piqa": score_piqa(model, piqa),
        "why": why_stats(variants, layer, tokens),
        "conditions": {},
    }
    print(
        f"{path.name}: clean PPL {clean['baseline']:.3f}, PIQA {result['clean_piqa']['acc']:.3f}", flush=True
    )
    seeds = [args.first_seed + i for i in range(args.seeds)]
    for condition in CONDITIONS:
        result["conditions"][condition[0]] = evaluate_condition(
            variants, layer, condition, tokens, piqa, seeds, args.seq_len
        )
    result["seconds"] = time.perf_counter() - start
    return result


# ------------------------------------------------------------------------------------------ report
def markdown(results: dict[str, Any]) -> str:
    """Results tables (PPL, PIQA) and the "why" measurements, per model."""
    lines = [f"# HPD evaluation\n\nCommand: `{results['command']}` ({results['seconds']:.0f} s, "
             f"{results['seeds']} noise seeds per cell, mean ± std)\n"]  # fmt: skip
    for res in results["models"]:
        lines += _model_tables(res)
    return "\n".join(lines) + "\n"


def _model_tables(res: dict[str, Any]) -> list[str]:
    clean = res["clean_ppl"]["baseline"]
    lines = [
        f"## {res['model']} — decomposed layer `{res['layer']}` {res['why']['shape']}",
        f"\nClean: PPL {clean:.3f} ({res['tokens']} held-out tokens), PIQA acc "
        f"{res['clean_piqa']['acc']:.3f} / acc_norm {res['clean_piqa']['acc_norm']:.3f} "
        f"({res['piqa_items']} items). Clean PPL of every split: "
        + ", ".join(f"{k} {v:.4f}" for k, v in res["clean_ppl"].items() if k in FACTORS),
        "\n### Perplexity (`all`: noise in every analog tensor; `layer`: only in the decomposed layer)\n",
        "| condition | " + " | ".join(VARIANTS) + " |",
        "|---|" + "---|" * len(VARIANTS),
    ]
    for label, cell in res["conditions"].items():
        cells = [f"{cell['ppl'][v]['mean']:.2f} ± {cell['ppl'][v]['std']:.2f}" if v in cell["ppl"] else "-"
                 for v in VARIANTS]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["\n### PIQA accuracy\n", "| condition | " + " | ".join(PIQA_VARIANTS) + " |",
              "|---|" + "---|" * len(PIQA_VARIANTS)]  # fmt: skip
    for label, cell in res["conditions"].items():
        if cell["piqa"]:
            lines.append(
                f"| {label} | "
                + " | ".join(
                    f"{cell['piqa'][v]['mean']:.3f} ± {cell['piqa'][v]['std']:.3f}" for v in PIQA_VARIANTS
                )
                + " |"
            )
    lines += _why_tables(res["why"])
    return lines


def _why_tables(why: dict[str, Any]) -> list[str]:
    spec = why["spectrum"]
    lines = [
        "\n### Why: spectrum, dynamic range, activation outliers\n",
        f"Singular spectrum of W: s_max {spec['s_max']:.3f}, s_min {spec['s_min']:.4f}, condition "
        f"{spec['condition']:.1f}, top-10% energy {spec['energy_top10pct']:.2f}, effective rank "
        f"{spec['effective_rank']:.1f} of {spec['rank']}.\n",
        "| analog matrix | row max/rms (mean) | row max/rms (max) | tensor max/rms |",
        "|---|---|---|---|",
    ]
    for name, dr in why["dynamic_range"].items():
        lines.append(f"| {name} | {dr['row_max_over_rms_mean']:.2f} | {dr['row_max_over_rms_max']:.2f} | "
                     f"{dr['tensor_max_over_rms']:.2f} |")  # fmt: skip
    lines += ["\n| activations | kurtosis | channel max/rms | token max/rms |", "|---|---|---|---|"]
    for name, st in why["activations"].items():
        lines.append(f"| {name} | {st['kurtosis']:.2f} | {st['channel_max_over_rms']:.2f} | "
                     f"{st['token_max_over_rms']:.2f} |")  # fmt: skip
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    """Per model: PPL vs Gaussian σ (all / layer scope) per variant, and the singular spectrum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(len(models), 3, figsize=(14, 3.8 * len(models)), squeeze=False)
    for row, res in zip(axes, models, strict=True):
        for ax, scope in zip(row[:2], ("all", "layer"), strict=True):
            cells = [(float(c["profile"].split("=")[-1]), c) for c in res["conditions"].values()
                     if c["scope"] == scope and c["profile"].startswith("gaussian")]  # fmt: skip
            for variant in VARIANTS:
                pts = [(s, c["ppl"][variant]) for s, c in cells if variant in c["ppl"]]
                if pts:
                    xs, ys = [p[0] for p in pts], [p[1]["mean"] for p in pts]
                    errs = [p[1]["std"] for p in pts]
                    ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=2, label=variant)
            ax.axhline(res["clean_ppl"]["baseline"], color="k", ls=":", lw=1, label="clean")
            ax.set_yscale("log")
            ax.set_xlabel("relative Gaussian σ (per-channel abs-max)")
            ax.set_ylabel("held-out PPL")
            ax.set_title(f"{Path(res['model']).name}: noise in {scope}", fontsize=9)
            ax.legend(fontsize=7)
        s = res["why"]["singular_values"]
        row[2].semilogy(range(1, len(s) + 1), s, marker=".")
        row[2].set_title(f"singular values of {res['layer'].split('backbone.')[-1]}", fontsize=9)
        row[2].set_xlabel("index")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Parse arguments, evaluate every available demo model, write json/md/png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-mamba", "tiny-mamba2"])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=3072)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--piqa", type=int, default=200, help="PIQA items (first N of the validation split)")
    parser.add_argument("--out", type=Path, default=RESULTS / "hpd_eval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    folders = [REPO / "examples" / "models" / m for m in args.models]
    results: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/hpd_eval.py",
        "seeds": args.seeds,
        "models": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if (folder / "config.json").is_file():
            results["models"].append(evaluate_model(folder, args))
            results["seconds"] = time.perf_counter() - start
            write_results(results, args.out)  # after each model, so a later failure loses nothing
    print(f"wrote {args.out}.json/.md/.png in {results.get('seconds', 0):.0f} s")


def write_results(results: dict[str, Any], out: Path) -> None:
    """Write ``out``.json/.md/.png."""
    out.with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    plot(results, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
