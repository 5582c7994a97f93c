#!/usr/bin/env python
"""What fixes a real model under chip noise: robustness recipes measured on SmolLM2-135M and its MoE build.

Every row applies a recipe (an ordered list of registered methods with options, exactly what
``cimconvert convert --recipe`` runs) to a fresh copy of the real model in memory, places it, and
measures clean perplexity and perplexity under ``--seeds`` unseen chip draws (from seed 5000) on the
held-out text and on WikiText-2 test. Calibration (outlier maxima, the sensitivity scan the digital
budget reads, ROMER's statistics) uses the shipped ``calib`` text and seeds from 1000: never the
evaluation text or draws.

Figures per row and dataset: clean, noisy mean ± std, the paper metric (noisy_none − noisy)/noisy_none
and the gap closed (noisy_none − noisy)/(noisy_none − clean), and the share of the baseline's analog
MACs per token that the recipe runs digitally.

Phases (every row goes to ``benchmarks/results/robust_rows.json`` as it finishes, with the command that
measured it; a rerun skips rows already measured with the same settings, so a long run can be resumed):

* ``scan``: the layer sensitivity scan (``cimconvert analyze --granularity layer``) the budget reads;
* ``budget``: PPL vs digital budget (0, 1, 2, 5, 10, 20 % of analog MACs) for the knapsack placement,
  the outlier channels and both together;
* ``methods``: the methods side by side at small budgets (HPD and rotation on the most sensitive
  projections vs keeping them digital, outlier channels, ROMER on the MoE build, the default recipes);
* ``render``: ``robust_budget.md``, ``robust_methods.md`` and ``robust_budget.png`` from the rows.

    CIMCONVERT_SHARED_DATA=... .venv/bin/python benchmarks/robust.py budget --seeds 5 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from real_models import MODELS, fmt, load_model
from torch import nn

from cimconvert.analog.experts import DIGITAL_INPUTS_ATTR
from cimconvert.arch import get_adapter
from cimconvert.datasets import load_text, tokenize
from cimconvert.evaluation.monte_carlo import noisy_perplexities
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.methods import auto_steps, defaults
from cimconvert.methods.defaults import CORRECTION_SAMPLES
from cimconvert.placement import Placement, plan_model
from cimconvert.profiles import load_profile
from cimconvert.recipe import Recipe, resolve_recipe, run_recipe

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
FIRST_SEED = 5000
BUDGETS = (0, 1, 2, 5, 10, 20)
SCAN_SEEDS = 2
SCAN_TOKENS = 512


# ------------------------------------------------------------------------------------------ recipes
def scan_path(model: str, profile: str) -> Path:
    """Where the ``scan`` phase writes the layer sensitivity scan of ``model`` under ``profile``, relative
    to the repository (the benchmark runs from there, so recorded recipes name no machine path)."""
    safe = profile.replace(":", "_").replace("=", "-")
    return RESULTS.relative_to(REPO) / f"robust_scan_{model}_{safe}" / "sensitivity.json"


def step(name: str, **options: Any) -> dict[str, Any]:
    """One recipe step (the format of ``--recipe`` files)."""
    return {"step": name, "options": options}


def budget_steps(model: str, profile: str, strategy: str, budget: float) -> list[dict[str, Any]]:
    """The recipe of one point of the budget curve.

    ``knapsack``: the digital budget alone; ``outliers``: outlier channels alone; ``outliers+corr``:
    outlier channels, then the output correction (free: folded into the weights); ``all``: half the
    budget to the knapsack, half to outlier channels, then the output correction.
    """
    if budget == 0:
        return []
    scan = str(scan_path(model, profile))
    correction = step("output_correction", calib_samples=CORRECTION_SAMPLES)
    if strategy == "knapsack":
        return [step("digital_budget", digital_budget=budget, budget_scan=scan)]
    outliers = step("outlier_channels", outlier_percent=budget, calib_samples=CORRECTION_SAMPLES)
    if strategy == "outliers":
        return [outliers]
    if strategy == "outliers+corr":
        return [outliers, correction]
    half = budget / 2
    return [step("digital_budget", digital_budget=half, budget_scan=scan),
            step("outlier_channels", outlier_percent=half, calib_samples=CORRECTION_SAMPLES), correction]


def apply_recipe(model: nn.Module, profile: str, steps: Sequence[dict[str, Any]]) -> tuple[Placement, list]:
    """Run ``steps`` on ``model`` in place with the conversion pipeline's recipe runner (what
    ``cimconvert convert --recipe`` runs, seed 0); (final placement, scalar report per step)."""
    chip = load_profile(profile)
    adapter = get_adapter(model.config)
    recipe = resolve_recipe(Recipe.model_validate({"steps": list(steps)}), model.config.model_type,
                            adapter.family, seed=0)  # fmt: skip
    result, placement = run_recipe(model, adapter, chip, recipe, plan_model(model, chip), progress=False)
    reports = [{"step": key, **{k: v for k, v in report.items() if isinstance(v, int | float | str)}}
               for key, report in result.report.items()]  # fmt: skip
    return placement, reports


def matmul_macs(shape: Sequence[int], top_k: int) -> int:
    """MACs per token of a weight: out·in for a matrix, per-expert out·in × top_k for fused experts."""
    if len(shape) == 3:
        return int(shape[1] * shape[2] * top_k)
    return int(shape[0] * shape[1]) if len(shape) == 2 else 0


def experts_digital_macs(model: nn.Module, top_k: int) -> int:
    """MACs per token of the fused experts' digital input channels (``outlier_channels`` on experts)."""
    total = 0
    for module in model.modules():
        for pname, index in getattr(module, DIGITAL_INPUTS_ATTR, {}).items():
            out_features = getattr(module, pname).shape[1]  # fused [experts, out, in]
            total += int(index.shape[1]) * out_features * top_k
    return total


def digital_share(baseline: Placement, after: Placement, top_k: int, model: nn.Module) -> float:
    """% of the baseline's analog MACs per token that ``after`` runs digitally (split parts and the
    experts' digital input channels included)."""
    base_digital = {info.name for info in baseline.digital()}
    analog_macs = sum(matmul_macs(info.shape, top_k) for info in baseline.analog())
    moved = sum(matmul_macs(info.shape, top_k) for info in after.digital()
                if info.name not in base_digital and info.kind != "embedding")  # fmt: skip
    moved += experts_digital_macs(model, top_k)
    return 100.0 * moved / analog_macs if analog_macs else 0.0


# --------------------------------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, placement: Placement, profile: str, tokens: dict[str, torch.Tensor],
             seeds: Sequence[int]) -> dict[str, Any]:  # fmt: skip
    """Clean and noisy perplexity per dataset, noise in ``placement``'s analog tensors."""
    chip = load_profile(profile)
    targets = placement.analog()

    def ppl(m: nn.Module, t: torch.Tensor) -> float:
        return perplexity(m, t, seq_len=256, batch_size=8)

    out = {}
    for name, toks in tokens.items():
        clean = ppl(model, toks)
        values = noisy_perplexities(model, toks, targets, chip, seeds, ppl)
        finite = [v for v in values if math.isfinite(v)]
        out[name] = {"clean_ppl": clean, "per_seed": values,
                     "noisy_ppl_mean": statistics.fmean(finite) if finite else None,
                     "noisy_ppl_std": statistics.stdev(finite) if len(finite) > 1 else 0.0}  # fmt: skip
    return out


def add_metrics(row: dict[str, Any], none: dict[str, Any] | None) -> None:
    """Paper metric and gap closed per dataset, against the same model's ``none`` row."""
    if none is None:
        return
    for name, res in row["datasets"].items():
        base = none["datasets"].get(name)
        if not base or res["noisy_ppl_mean"] is None or base["noisy_ppl_mean"] is None:
            continue
        noisy, method, clean = base["noisy_ppl_mean"], res["noisy_ppl_mean"], base["clean_ppl"]
        res["paper_metric_pct"] = 100.0 * (noisy - method) / noisy
        res["gap_closed_pct"] = 100.0 * (noisy - method) / (noisy - clean) if noisy > clean else None


# ------------------------------------------------------------------------------------------ storage
ROWS_FILE = RESULTS / "robust_rows.json"


def load_rows() -> list[dict[str, Any]]:
    """Rows measured so far (every phase)."""
    return json.loads(ROWS_FILE.read_text(encoding="utf-8"))["rows"] if ROWS_FILE.is_file() else []


def save_rows(rows: list[dict[str, Any]]) -> None:
    """Write every row (each records its phase's command and settings), keeping rows another run saved
    meanwhile (runs may go in parallel)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    known = {row_key(row) for row in rows}
    rows = [*rows, *(row for row in load_rows() if row_key(row) not in known)]
    payload = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "rows": rows}  # fmt: skip
    ROWS_FILE.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def command(phase: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a phase."""
    lists = {"models": args.models, "profiles": args.profiles}
    if phase == "budget":
        lists |= {"strategies": args.strategies, "budgets": [f"{b:g}" for b in args.budgets]}
    if phase == "methods":
        lists["only"] = [f"'{key}'" for key in args.only or []]
    extra = "".join(f" --{name} {' '.join(values)}" for name, values in lists.items() if values)
    return (f"CIMCONVERT_SHARED_DATA=<shared>/data .venv/bin/python benchmarks/robust.py {phase} "
            f"--seeds {args.seeds} --max-tokens {args.max_tokens} --threads {args.threads}{extra}")


#: How outlier_channels rounds a layer's channel count (``floor`` since the default was fixed at <= 5 %; rows
#: recording ``ceil`` and rows without the field were measured rounding up).
OUTLIER_ROUNDING = "floor"


def row_key(row: dict[str, Any]) -> tuple:
    """Rows with equal keys measure the same thing (same model, profile, recipe, tokens and draws)."""
    return key_of(row["model"], row["profile"], row["steps"], row["max_tokens"], row["seeds"],
                  row.get("outlier_rounding"))  # fmt: skip


def key_of(model: str, profile: str, steps: list[dict[str, Any]], max_tokens: int, seeds: int,
           rounding: str | None) -> tuple:  # fmt: skip
    """The identity of a row; the outlier rounding counts only for recipes with outlier channels."""
    recipe = json.dumps(steps, sort_keys=True)
    rounding = rounding or "ceil"  # rows without the field were measured rounding up
    return (model, profile, recipe, max_tokens, seeds, rounding if "outlier_channels" in recipe else None)


class Runner:
    """Measures rows (every phase's go to one file, ``robust_rows.json``), skipping rows already there."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rows = load_rows()
        self.seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
        self._tokens: dict[str, dict[str, torch.Tensor]] = {}
        self._models: dict[str, tuple[nn.Module, Any]] = {}

    def tokens(self, model_name: str, tokenizer: Any) -> dict[str, torch.Tensor]:
        """The evaluation tokens of each dataset (same for every row of a model)."""
        if model_name not in self._tokens:
            self._tokens[model_name] = {d: tokenize(tokenizer, load_text(d), self.args.max_tokens)
                                        for d in self.args.datasets}  # fmt: skip
        return self._tokens[model_name]

    def none_row(self, model: str, profile: str) -> dict[str, Any] | None:
        """The same model's no-method row under ``profile``."""
        return next((r for r in self.rows if r["model"] == model and r["profile"] == profile
                     and not r["steps"] and r["max_tokens"] == self.args.max_tokens), None)  # fmt: skip

    def measure(self, model_name: str, profile: str, label: str, steps: list[dict[str, Any]],
                extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        """One row: apply ``steps`` to a fresh copy of the model, place, evaluate, save."""
        key = key_of(model_name, profile, steps, self.args.max_tokens, self.args.seeds, OUTLIER_ROUNDING)
        if any(row_key(r) == key for r in self.rows):
            return
        base, tokenizer = self.base(model_name)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        placement, reports = apply_recipe(model, profile, steps)
        baseline = plan_model(base, load_profile(profile))
        top_k = int(getattr(model.config, "num_experts_per_tok", 1) or 1)
        row = {"model": model_name, "profile": profile, "label": label, "steps": steps,
               "command": command(self.args.phase, self.args), "eval_seeds": self.seeds,
               "outlier_rounding": OUTLIER_ROUNDING,
               "max_tokens": self.args.max_tokens, "seeds": self.args.seeds, **(extra or {}),
               "digital_macs_pct": digital_share(baseline, placement, top_k, model), "reports": reports,
               "analog_tensors": len(placement.analog())}  # fmt: skip
        row["datasets"] = evaluate(model, placement, profile, self.tokens(model_name, tokenizer), self.seeds)
        row["seconds"] = round(time.perf_counter() - start, 1)
        add_metrics(row, self.none_row(model_name, profile) if steps else row)
        self.rows.append(row)
        save_rows(self.rows)
        figures = "  ".join(f"{d}: {fmt(r['clean_ppl'])} → {fmt(r['noisy_ppl_mean'])} "
                            f"({r.get('paper_metric_pct', 0):.0f} %)"
                            for d, r in row["datasets"].items())  # fmt: skip
        print(f"{model_name} {profile} {label:34s} digital {row['digital_macs_pct']:5.2f} %  {figures}",
              flush=True)

    def base(self, model_name: str) -> tuple[nn.Module, Any]:
        """The clean real model (loaded once)."""
        if model_name not in self._models:
            self._models[model_name] = load_model(model_name)
        return self._models[model_name]


# ------------------------------------------------------------------------------------------- phases
def scan_phase(args: argparse.Namespace) -> None:
    """``cimconvert analyze --granularity layer`` on the calibration text, seeds from 1000."""
    for model in args.models or ["smollm2-135m"]:
        for profile in args.profiles or ["chipA"]:
            out = scan_path(model, profile).parent
            if (out / "sensitivity.json").is_file():
                continue
            source = str(MODELS[model].relative_to(REPO))  # the scan records it: no machine path
            cmd = [sys.executable, "-m", "cimconvert", "analyze", source, "--profile", profile,
                   "--granularity", "layer", "--seeds", str(SCAN_SEEDS), "--seed", "1000", "--dataset",
                   "calib", "--max-tokens", str(SCAN_TOKENS), "--threads", str(args.threads), "-o", str(out)]
            subprocess.run(cmd, check=True)


def budget_phase(args: argparse.Namespace) -> None:
    """PPL vs digital budget for each strategy."""
    run = Runner(args)
    for model in args.models or ["smollm2-135m"]:
        for profile in args.profiles or ["chipA"]:
            run.measure(model, profile, "none", [])
            for strategy in args.strategies:
                for budget in args.budgets:
                    run.measure(model, profile, f"{strategy} {budget:g} %",
                                budget_steps(model, profile, strategy, budget),
                                {"strategy": strategy, "budget_pct": budget})  # fmt: skip


def methods_phase(args: argparse.Namespace) -> None:
    """The methods side by side (see the module docstring); ``--only`` measures the named rows only."""
    run = Runner(args)
    for model in args.models or ["smollm2-135m"]:
        for profile in args.profiles or ["chipA"]:
            run.measure(model, profile, "none", [])
            for label, steps in method_rows(model, profile).items():
                if not args.only or any(key in label for key in args.only):
                    run.measure(model, profile, label, steps)


def top_layers(model: str, profile: str, count: int) -> list[str]:
    """The ``count`` most sensitive tensors of the scan (module paths)."""
    rows = json.loads(scan_path(model, profile).read_text(encoding="utf-8"))["rows"]
    rows = sorted(rows, key=lambda r: -r["delta_pct_mean"])
    return [r["name"] for r in rows[:count]]


def method_rows(model: str, profile: str) -> dict[str, list[dict[str, Any]]]:
    """Label → recipe of the ``methods`` phase for one model and profile."""
    rows: dict[str, list[dict[str, Any]]] = {}
    if scan_path(model, profile).is_file():
        top = top_layers(model, profile, 3)
        rows["top-3 scan layers digital"] = [step("keep_digital", patterns=[f"{t}.weight" for t in top])]
        rows["HPD U·Σ analog, Vᵀ digital (top-3)"] = [step("hpd", hpd_layers=top, hpd_factor="us_v")]
        rows["Hadamard rotation (top-3)"] = [step("hpd", hpd_layers=top, hpd_factor="hadamard")]
    outliers, correction = defaults.DENSE
    family = "moe" if "moe" in model else "dense"
    rows["default recipe (--method auto)"] = auto_steps(family)
    rows["output correction"] = [correction]
    percent = outliers["options"]["outlier_percent"]
    rows[f"outlier channels {percent:g} %"] = [outliers]
    if family == "moe":
        if [outliers, correction] != defaults.MOE:  # else it is the default row (the same key, measured once)
            rows[f"outlier channels {percent:g} % + output correction"] = [outliers, correction]
        rows["ROMER"] = [step("romer")]
    return rows


# ------------------------------------------------------------------------------------------- render
def _cell(res: dict[str, Any] | None) -> str:
    """``noisy ± std (paper metric / gap closed)`` of one dataset."""
    if not res:
        return "n/a"
    metric = res.get("paper_metric_pct")
    gap = res.get("gap_closed_pct")
    extra = f" ({metric:.0f} % / {gap:.0f} %)" if metric is not None and gap is not None else ""
    return f"{fmt(res['noisy_ppl_mean'])} ± {fmt(res['noisy_ppl_std'])}{extra}"


def table_lines(rows: list[dict[str, Any]], datasets: Sequence[str]) -> list[str]:
    """Markdown table: recipe, digital MACs, clean and noisy (paper metric / gap closed) per dataset."""
    head = "| recipe | digital MACs | " + " | ".join(f"{d} clean | {d} noisy (paper / gap closed)"
                                                    for d in datasets) + " |"  # fmt: skip
    lines = [head, "|---|---|" + "---|---|" * len(datasets)]
    for row in rows:
        cells = " | ".join(f"{fmt(row['datasets'][d]['clean_ppl'])} | {_cell(row['datasets'].get(d))}"
                           if d in row["datasets"] else "n/a | n/a" for d in datasets)  # fmt: skip
        lines.append(f"| {row['label']} | {row['digital_macs_pct']:.2f} % | {cells} |")
    return lines


def curve_point(row: dict[str, Any]) -> tuple[str, float] | None:
    """(strategy, budget) when a row's recipe is a point of a budget curve (e.g. the default recipe)."""
    for strategy in ("knapsack", "outliers", "outliers+corr", "all"):
        for budget in BUDGETS[1:]:
            if row["steps"] == budget_steps(row["model"], row["profile"], strategy, budget):
                return strategy, budget
    return None


def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Rows by (model, profile), in measurement order."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault((row["model"], row["profile"]), []).append(row)
    return out


def render_phase(args: argparse.Namespace) -> None:
    """``robust_budget.md`` (+ PNG) and ``robust_methods.md`` from ``robust_rows.json``."""
    rows = [r for r in load_rows() if r["max_tokens"] == args.max_tokens and r["seeds"] == args.seeds]
    datasets = args.datasets
    intro = ["Rows from `benchmarks/results/robust_rows.json` (each row records the command that measured "
             f"it). {args.max_tokens} tokens per dataset, windows of 256. Noisy: mean ± std over "
             f"{args.seeds} unseen chip draws (from seed {FIRST_SEED}); in brackets the paper "
             f"metric (noisy_none − noisy)/noisy_none and the gap closed (noisy_none − noisy)/(noisy_none − "
             "clean_none). Digital MACs: share of the baseline's analog MACs per token the recipe runs "
             "digitally. Calibration used the shipped `calib` text and other seeds.", ""]  # fmt: skip
    budget, methods = ["# Digital budget: PPL vs budget on the real models", "", *intro], [
        "# Robustness methods on the real models", "", *intro]
    for (model, profile), group in groups(rows).items():
        none = [r for r in group if not r["steps"]]
        curve = none + [r for r in group if "strategy" in r or curve_point(r)]
        others = none + [r for r in group if r["steps"] and "strategy" not in r]
        if len(curve) > 1:
            budget += [f"## {model} · `{profile}`", "", *table_lines(curve, datasets), ""]
        if len(others) > 1:
            methods += [f"## {model} · `{profile}`", "", *table_lines(others, datasets), ""]
    (RESULTS / "robust_budget.md").write_text("\n".join(budget) + "\n", encoding="utf-8")
    (RESULTS / "robust_methods.md").write_text("\n".join(methods) + "\n", encoding="utf-8")
    plot_budget(rows, datasets)
    print("wrote benchmarks/results/robust_budget.md, robust_methods.md, robust_budget.png")


def plot_budget(rows: list[dict[str, Any]], datasets: Sequence[str]) -> None:
    """Noisy PPL vs digital budget per strategy under chipA: one row of panels (one per dataset) per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if any(r["model"] == m and r["profile"] == "chipA" and not r["steps"]
                                       for r in rows)]  # fmt: skip
    if not models:
        return
    fig, axes = plt.subplots(len(models), len(datasets), figsize=(5 * len(datasets), 4 * len(models)),
                             squeeze=False)  # fmt: skip
    for row_axes, model in zip(axes, models, strict=True):
        curve = [r for r in rows if r["model"] == model and r["profile"] == "chipA"]
        none = next(r for r in curve if not r["steps"])
        for ax, dataset in zip(row_axes, datasets, strict=True):
            _plot_curve(ax, curve, none, dataset, model)
    fig.tight_layout()
    fig.savefig(RESULTS / "robust_budget.png", dpi=110)
    plt.close(fig)


def _plot_curve(ax: Any, curve: list[dict[str, Any]], none: dict[str, Any], dataset: str, model: str) -> None:
    """One panel: each strategy's points from the none row on, and the clean line."""
    points_of: dict[str, list[tuple[float, float]]] = {}
    for r in curve:
        point = (r["strategy"], r["budget_pct"]) if "strategy" in r else curve_point(r)
        if point:
            points_of.setdefault(point[0], []).append((point[1], r["datasets"][dataset]["noisy_ppl_mean"]))
    for strategy, points in sorted(points_of.items()):
        points = sorted(points)
        xs = [0, *(p[0] for p in points)]
        ys = [none["datasets"][dataset]["noisy_ppl_mean"], *(p[1] for p in points)]
        ax.plot(xs, ys, marker="o", label=strategy)
    ax.axhline(none["datasets"][dataset]["clean_ppl"], color="k", ls="--", label="clean")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlabel("digital budget (% of analog MACs)")
    ax.set_ylabel("noisy PPL (mean of 5 draws)")
    ax.set_title(f"{model} · chipA · {dataset}")
    ax.legend()


def main() -> None:
    """Parse the phase and its options, run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["scan", "budget", "methods", "render"])
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS))
    parser.add_argument("--profiles", nargs="*")
    parser.add_argument("--datasets", nargs="*", default=["heldout", "wikitext2"])
    parser.add_argument("--strategies", nargs="*", default=["knapsack", "outliers+corr"])
    parser.add_argument("--budgets", nargs="*", type=float, default=list(BUDGETS[1:]))
    parser.add_argument("--only", nargs="*", help="methods phase: rows whose label contains one of these")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.chdir(REPO)  # recipes record repo-relative paths (the layer scan)
    torch.set_num_threads(args.threads)
    phases = {"scan": scan_phase, "budget": budget_phase, "methods": methods_phase, "render": render_phase}
    phases[args.phase](args)


if __name__ == "__main__":
    main()
