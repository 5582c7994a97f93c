"""ROMER benchmark: held-out perplexity of clean / noisy / replacement-only / calibration-only / full ROMER.

For each demo MoE model and each noise regime (a profile spec plus placement overrides), it measures
the clean perplexity on held-out text and, over ``--seeds`` evaluation draws (seeds 1000, 1001, ...):

* the noisy baseline;
* cross-instance ROMER variants, fitted on ``--calib-seeds`` draws with other seeds (100000, ...);
* in-situ ROMER variants, each fitted on the very instance it is evaluated on.

Calibration text is ``calib`` (calib.txt), evaluation text ``heldout`` (heldout.txt): disjoint slices.
Writes ``<out>.json``, ``<out>.md`` and PNG plots beside them (expert-load histograms per layer and PPL
vs noise level). ``--sweep`` adds a sensitivity scan of the ROMER options on the first model.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/romer_eval.py            # all demo MoE models present
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/romer_eval.py --models tiny-olmoe --sweep
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter
from cimconvert.checkpoint import resolve_model
from cimconvert.datasets import load_text, tokenize
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.methods.calibration import calibration_batches
from cimconvert.methods.romer import (
    METHOD,
    RomerConfig,
    build_plan,
    calibration_stats,
    collect,
    install,
    moe_routers,
)
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "examples" / "models"
DEMO_MODELS = ("tiny-olmoe", "tiny-qwen2-moe", "tiny-deepseek")
ROUTER = r"re:.*\.mlp\.gate\.weight"
EVAL_SEED = 1000


@dataclass(frozen=True)
class Regime:
    """A noise regime: profile spec, placement overrides and a label."""

    name: str
    profile: str
    analog: tuple[str, ...] = ()
    note: str = ""


REGIMES = {
    "chipA": Regime("chipA", "chipA", note="PCM, drift + global compensation, router digital"),
    "chipA-router": Regime("chipA-router", "chipA", (ROUTER,), "chipA with the router analog"),
    "chipB": Regime("chipB", "chipB", note="RRAM NeuRRAM, router digital"),
    "chipB-router": Regime("chipB-router", "chipB", (ROUTER,), "chipB with the router analog"),
    "drift-nocomp": Regime(
        "drift-nocomp", "chipA:drift.compensation=none", (ROUTER,),
        "chipA drift without compensation (1 h), router analog",
    ),
    "drift-nocomp-1d": Regime(
        "drift-nocomp-1d", "chipA:drift.compensation=none,t_inference=86400", (ROUTER,),
        "chipA drift without compensation (1 day), router analog",
    ),
    "drift-nocomp-1w": Regime(
        "drift-nocomp-1w", "chipA:drift.compensation=none,t_inference=604800", (ROUTER,),
        "chipA drift without compensation (1 week), router analog",
    ),
    "drift-nocomp-1y": Regime(
        "drift-nocomp-1y", "chipA:drift.compensation=none,t_inference=31536000", (ROUTER,),
        "chipA drift without compensation (1 year), router analog",
    ),
    "drift-nocomp-digital": Regime(
        "drift-nocomp-digital", "chipA:drift.compensation=none", (),
        "chipA drift without compensation (1 h), router digital",
    ),
    "tile-map": Regime(
        "tile-map", "chipA:mapping.scale=tile", (ROUTER,), "chipA with per-tile g_max mapping, router analog"
    ),
    "adc6": Regime(
        "adc6", "chipA:mvm.adc_bits=6,mvm.out_bound=4", (ROUTER,), "6-bit ADC, range ±4, router analog"
    ),
    **{
        f"gauss{s}": Regime(f"gauss{s}", f"gaussian:sigma={s}", note=f"Gaussian sigma={s}, router digital")
        for s in ("0.1", "0.2", "0.3", "0.4", "0.5")
    },
    **{
        f"gauss{s}-router": Regime(
            f"gauss{s}-router", f"gaussian:sigma={s}", (ROUTER,), f"rel. Gaussian sigma={s}, router analog"
        )
        for s in ("0.3", "0.5")
    },
}  # fmt: skip
DEFAULT_REGIMES = (
    "chipA", "chipA-router", "chipB", "drift-nocomp", "drift-nocomp-1y", "gauss0.1", "gauss0.3", "gauss0.5",
)  # fmt: skip
GAUSS_LEVELS = ("gauss0.1", "gauss0.2", "gauss0.3", "gauss0.4", "gauss0.5")


@dataclass
class Setup:
    """A loaded demo model with its tokens and MoE routing."""

    name: str
    model: torch.nn.Module
    adapter: Any
    eval_tokens: torch.Tensor
    calib_tokens: torch.Tensor
    moe: Any
    seq_len: int
    clean_ppl: float = 0.0
    clean_stats: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def load_setup(name: str, args: argparse.Namespace) -> Setup:
    """Load a demo model, tokenise held-out and calibration text."""
    from transformers import AutoTokenizer

    source = resolve_model(str(MODELS_DIR / name))
    model = source.load_model(dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(source.dir))
    adapter = get_adapter(source.model_type)
    eval_tokens = tokenize(tokenizer, load_text("heldout"), args.eval_tokens)
    calib = calibration_batches(
        load_text("calib"), tokenizer, args.calib_samples, args.calib_seq_len, "calib"
    )
    setup = Setup(name, model, adapter, eval_tokens, calib, moe_routers(model, adapter), args.seq_len)
    setup.clean_ppl = ppl(setup)
    setup.clean_stats = collect(model, setup.moe.routers, setup.moe.num_experts, calib)
    return setup


def ppl(setup: Setup) -> float:
    """Held-out perplexity of the model as it is (noise/hooks applied by the caller)."""
    return perplexity(setup.model, setup.eval_tokens, seq_len=setup.seq_len, batch_size=8)


def targets_for(setup: Setup, regime: Regime) -> tuple[list[Any], Any]:
    """Analog targets and profile of a regime."""
    profile = load_profile(regime.profile)
    return plan_model(setup.model, profile, analog=regime.analog).analog(), profile


def noisy_ppl(setup: Setup, targets: list[Any], profile: Any, seed: int) -> float:
    """Perplexity under one programmed instance."""
    with apply_chip_noise(setup.model, targets, profile, seed):
        return ppl(setup)


def summary(values: list[float]) -> dict[str, Any]:
    """mean, std and the values."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": [round(v, 3) for v in values],
    }


def variants(base: RomerConfig, insitu: bool = False) -> dict[str, RomerConfig]:
    """The ROMER variants compared in every regime (in-situ: the calibration variants only).

    ``romer`` is the full method (replicate-and-split + affine calibration) whatever the defaults are.
    """
    full = base.variant(replacement=FULL_REPLACEMENT, router_calibration="affine")
    out = {
        "replacement_only": full.variant(router_calibration="none"),
        "calibration_only": full.variant(replacement="none"),
        "token_norm_only": full.variant(replacement="none", router_calibration="token_norm"),
        "romer": full,
    }
    return {k: v for k, v in out.items() if k in ("calibration_only", "romer")} if insitu else out


#: the replacement used by the "replacement only" and full ROMER rows
FULL_REPLACEMENT = "replicate_split"


def eval_plan(setup: Setup, cfg: RomerConfig, stats: Any, noise: tuple[list[Any], Any], seed: int) -> float:
    """Install a plan built from ``stats``, evaluate under instance ``seed``, undo."""
    plan = build_plan(stats, setup.moe, cfg)
    done = install(setup.moe, plan, keep_undo=True)
    try:
        return noisy_ppl(setup, noise[0], noise[1], seed)
    finally:
        done.remove()


def metrics(clean: float, noisy: float, value: float) -> dict[str, float]:
    """The paper's reduction and the share of the noise gap closed (percent)."""
    gap = noisy - clean
    return {
        "reduction_pct": 100.0 * (noisy - value) / noisy,
        "gap_closed_pct": 100.0 * (noisy - value) / gap if abs(gap) > 1e-9 else float("nan"),
    }


def run_regime(
    setup: Setup, regime: Regime, base: RomerConfig, seeds: list[int], insitu: bool
) -> dict[str, Any]:
    """Baseline, cross-instance and in-situ variants of one regime."""
    start = time.perf_counter()
    noise = targets_for(setup, regime)
    base_vals = [noisy_ppl(setup, *noise, s) for s in seeds]
    out: dict[str, Any] = {
        "regime": regime.name, "profile": regime.profile, "analog": list(regime.analog), "note": regime.note,
        "noisy": summary(base_vals), "cross": {}, "insitu": {},
    }  # fmt: skip
    cross = calibration_stats(setup.model, setup.moe, setup.calib_tokens, noise[0], noise[1], base,
                              clean=setup.clean_stats)  # fmt: skip
    out["logit_spread_ratio"] = build_plan(cross, setup.moe, base).report["layers"]
    for label, cfg in variants(base).items():
        vals = [eval_plan(setup, cfg, cross, noise, s) for s in seeds]
        out["cross"][label] = {**summary(vals), **_paired(setup.clean_ppl, base_vals, vals)}
    if insitu:
        per_seed: dict[str, list[float]] = {label: [] for label in variants(base, insitu=True)}
        for s in seeds:
            cfg_s = base.variant(calib_mode="in-situ", insitu_seed=s)
            stats = calibration_stats(setup.model, setup.moe, setup.calib_tokens, noise[0], noise[1], cfg_s,
                                      clean=setup.clean_stats)  # fmt: skip
            for label, cfg in variants(cfg_s, insitu=True).items():
                per_seed[label].append(eval_plan(setup, cfg, stats, noise, s))
        for label, vals in per_seed.items():
            out["insitu"][label] = {**summary(vals), **_paired(setup.clean_ppl, base_vals, vals)}
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["layers"] = [
        {k: layer[k] for k in ("layer", "logit_spread_ratio", "pairs")}
        for layer in out.pop("logit_spread_ratio")
    ]
    return out


def _paired(clean: float, noisy: list[float], values: list[float]) -> dict[str, float]:
    """Metrics of the means."""
    return metrics(clean, statistics.fmean(noisy), statistics.fmean(values))


def load_histograms(setup: Setup, regime: Regime, base: RomerConfig) -> dict[str, Any]:
    """Expert load per layer on held-out text: clean, noisy (first eval seed), full ROMER (same seed)."""
    noise = targets_for(setup, regime)
    tokens = setup.eval_tokens[: (setup.eval_tokens.numel() // setup.seq_len) * setup.seq_len]
    tokens = tokens.view(-1, setup.seq_len)
    routers, num = setup.moe.routers, setup.moe.num_experts
    clean = collect(setup.model, routers, num, tokens, keep_logits=False)
    with apply_chip_noise(setup.model, *noise, EVAL_SEED):
        noisy = collect(setup.model, routers, num, tokens, keep_logits=False)
    stats = calibration_stats(setup.model, setup.moe, setup.calib_tokens, noise[0], noise[1], base,
                              clean=setup.clean_stats)  # fmt: skip
    full = variants(base)["romer"]
    done = install(setup.moe, build_plan(stats, setup.moe, full), keep_undo=True)
    try:
        with apply_chip_noise(setup.model, *noise, EVAL_SEED):
            after = collect(setup.model, routers, num, tokens, keep_logits=False)
    finally:
        done.remove()
    return {
        "regime": regime.name,
        "clean": {i: v.tolist() for i, v in clean.frequencies().items()},
        "noisy": {i: v.tolist() for i, v in noisy.frequencies().items()},
        "romer": {i: v.tolist() for i, v in after.frequencies().items()},
    }


def calibration_cost(setup: Setup, regime: Regime, base: RomerConfig) -> dict[str, Any]:
    """Wall time of ``RomerMethod.apply`` (defaults) vs one noisy forward pass over the calibration set."""
    noise = targets_for(setup, regime)
    model = resolve_model(str(MODELS_DIR / setup.name)).load_model(dtype=torch.float32).eval()
    options = {**{o.name: o.default for o in METHOD.options}, **base.__dict__}
    options.update(calib_tokens=setup.calib_tokens, analog=regime.analog)
    result = METHOD.apply(model, setup.adapter, noise[1], options, progress=False)
    start = time.perf_counter()
    routers = moe_routers(model, setup.adapter).routers
    with apply_chip_noise(model, noise[0], noise[1], 7):
        collect(model, routers, setup.moe.num_experts, setup.calib_tokens, keep_logits=False)
    one = time.perf_counter() - start
    total = result.report["seconds"]["total"]
    return {
        "regime": regime.name, "apply_seconds": total, "one_noisy_pass_seconds": round(one, 3),
        "ratio": round(total / one, 2), "method_report_ratio": result.report["cost_vs_one_noisy_pass"],
    }  # fmt: skip


SWEEP_REGIMES = ("drift-nocomp-1y", "gauss0.5")


def sweep(
    setup: Setup, base: RomerConfig, seeds: list[int], regimes: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Sensitivity of the ROMER options (cross-instance, same evaluation draws) on a few regimes."""
    rows = []
    grid: list[tuple[str, dict[str, Any]]] = [
        ("calibration none", {"replacement": "none", "router_calibration": "none"}),
        *[(f"affine p=({lo},{hi})", {"replacement": "none", "router_p_lo": lo, "router_p_hi": hi})
          for lo, hi in ((1.0, 99.0), (5.0, 95.0), (25.0, 75.0))],
        ("affine deadband 0", {"replacement": "none", "router_deadband": 0.0}),
        *[(f"token_norm q={q}", {"replacement": "none", "router_calibration": "token_norm", "router_q": q})
          for q in (0.75, 0.9)],
        *[(f"{mode} tau={tau}", {"replacement": mode, "replace_tau": tau, "router_calibration": "none"})
          for mode in ("substitute", "replicate_split") for tau in (0.1, 0.25, 0.5)],
        ("replicate_split tau=0.25 alternate",
         {"replacement": "replicate_split", "replace_tau": 0.25, "replace_split": "alternate",
          "router_calibration": "none"}),
    ]  # fmt: skip
    for name in regimes:
        noise = targets_for(setup, REGIMES[name])
        noisy = statistics.fmean(noisy_ppl(setup, *noise, s) for s in seeds)
        cache: dict[tuple[int, int], Any] = {}

        full = setup.calib_tokens.shape[0]
        cases = [(label, base.variant(**kw), full, base.calib_seeds) for label, kw in grid]
        cases += [(f"affine calib_seeds={d}", base.variant(replacement="none"), full, d) for d in (1, 4)]
        cases += [(f"affine calib_samples={n}", base.variant(replacement="none"), n, base.calib_seeds)
                  for n in (4, 8) if n < full]  # fmt: skip
        for label, cfg, samples, draws in cases:
            stats = _sweep_stats(setup, base, noise, cache, draws, samples)
            value = statistics.fmean(eval_plan(setup, cfg, stats, noise, s) for s in seeds)
            rows.append({
                "model": setup.name, "regime": name, "case": label, "ppl": value, "noisy": noisy,
                "clean": setup.clean_ppl, **metrics(setup.clean_ppl, noisy, value),
            })  # fmt: skip
            print(
                f"  sweep {name:16s} {label:36s} {value:8.2f} gap {rows[-1]['gap_closed_pct']:6.1f}%",
                flush=True,
            )
    return rows


def _sweep_stats(
    setup: Setup, base: RomerConfig, noise: tuple[list[Any], Any], cache: dict, draws: int, samples: int
) -> Any:
    """Calibration statistics for ``draws`` fitting draws on the first ``samples`` sequences (cached)."""
    if (draws, samples) not in cache:
        clean = setup.clean_stats if samples == setup.calib_tokens.shape[0] else None
        cache[(draws, samples)] = calibration_stats(
            setup.model, setup.moe, setup.calib_tokens[:samples], noise[0], noise[1],
            base.variant(calib_seeds=draws), clean=clean,
        )  # fmt: skip
    return cache[(draws, samples)]


# ------------------------------------------------------------------------------------------ output
def _fmt(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The report tables."""
    lines = [
        "# ROMER benchmark (held-out perplexity)",
        "",
        f"Command: `{results['command']}`  ",
        f"Eval: {results['eval_tokens']} held-out tokens, seq_len {results['seq_len']}, noise seeds "
        f"{results['seeds']} (never used for fitting); calibration: calib.txt, {results['calib_samples']} x "
        f"{results['calib_seq_len']} tokens, cross-instance fit on seeds {results['fit_seeds']}. "
        f"ROMER options: `{results['romer_options']}`.",
        "",
        "red = (PPL_noisy − PPL_x)/PPL_noisy (the paper's metric); "
        "gap = (PPL_noisy − PPL_x)/(PPL_noisy − PPL_clean).",
        "",
    ]
    for model in results["models"]:
        lines += [f"## {model['name']} (clean PPL {model['clean_ppl']:.2f})", ""]
        lines += [
            "| regime | noisy | mode | replacement only | calibration only | token_norm only | ROMER "
            "| ROMER red / gap |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in model["regimes"]:
            for mode in ("cross", "insitu"):
                v = r[mode]
                if not v:
                    continue
                cells = [
                    f"{_fmt(v[k])} ({v[k]['gap_closed_pct']:+.0f}%)" if k in v else "–"
                    for k in ("replacement_only", "calibration_only", "token_norm_only", "romer")
                ]
                red = f"{v['romer']['reduction_pct']:+.1f}% / {v['romer']['gap_closed_pct']:+.0f}%"
                label = "cross-instance" if mode == "cross" else "in-situ"
                lines.append(
                    f"| {r['regime']} | {_fmt(r['noisy'])} | {label} | {' | '.join(cells)} | {red} |"
                )
        lines += ["", "Regimes: " + "; ".join(f"`{r['regime']}` = {r['note']}" for r in model["regimes"]), ""]
        if model.get("cost"):
            c = model["cost"]
            lines += [
                f"Calibration cost ({c['regime']}): apply {c['apply_seconds']:.2f} s vs one noisy pass "
                f"{c['one_noisy_pass_seconds']:.2f} s over the calibration set = **{c['ratio']:.2f}x**.",
                "",
            ]
    if results.get("sweep"):
        lines += ["## Option sensitivity (cross-instance, mean over the evaluation seeds)", "",
                  "| model | regime | case | PPL | gap closed |", "|---|---|---|---|---|"]  # fmt: skip
        for row in results["sweep"]:
            lines.append(f"| {row['model']} | {row['regime']} | {row['case']} | {row['ppl']:.2f} | "
                         f"{row['gap_closed_pct']:+.1f}% |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot_histograms(model: dict[str, Any], path: Path) -> None:
    """Expert load per layer: clean, noisy, after ROMER."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = model["histograms"]
    layers = sorted(hist["clean"], key=int)
    fig, axes = plt.subplots(1, len(layers), figsize=(3.2 * len(layers), 2.8), squeeze=False)
    for ax, layer in zip(axes[0], layers, strict=True):
        n = len(hist["clean"][layer])
        x = torch.arange(n).numpy()
        for offset, key, color in (
            (-0.27, "clean", "tab:gray"),
            (0.0, "noisy", "tab:red"),
            (0.27, "romer", "tab:blue"),
        ):
            ax.bar(x + offset, hist[key][layer], width=0.27, color=color, label=key)
        ax.axhline(model["top_k"] / n, color="k", lw=0.8, ls="--")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
    axes[0][0].set_ylabel("share of tokens")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{model['name']}: expert load on held-out text ({hist['regime']}, seed {EVAL_SEED})", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_noise_levels(results: dict[str, Any], path: Path) -> None:
    """PPL vs relative-Gaussian sigma: clean, noisy baseline and ROMER (cross-instance, in-situ)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.3), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in model["regimes"] if r["regime"] in GAUSS_LEVELS]
        sig = [float(r["regime"].removeprefix("gauss")) for r in rows]
        ax.axhline(model["clean_ppl"], color="k", lw=0.8, ls="--", label="clean")
        ax.errorbar(
            sig,
            [r["noisy"]["mean"] for r in rows],
            [r["noisy"]["std"] for r in rows],
            label="noisy",
            marker="o",
        )
        for mode, style in (("cross", "s-"), ("insitu", "^-")):
            pts = [(s, r[mode]["romer"]) for s, r in zip(sig, rows, strict=True) if r[mode]]
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1]["mean"] for p in pts], [p[1]["std"] for p in pts],
                            fmt=style, label=f"ROMER {mode}")  # fmt: skip
        ax.set_yscale("log")
        ax.set_xlabel("relative Gaussian sigma")
        ax.set_ylabel("held-out PPL")
        ax.set_title(model["name"])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Run the benchmark and write json/md/png."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=None, help="demo model folders under examples/models")
    parser.add_argument("--regimes", nargs="*", default=list(DEFAULT_REGIMES), choices=sorted(REGIMES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--calib-samples", type=int, default=32)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--no-insitu", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="option sensitivity scan on the first model")
    parser.add_argument("--sweep-seeds", type=int, default=3)
    parser.add_argument("--hist-regime", default="drift-nocomp-1y", choices=sorted(REGIMES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "romer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.models or [m for m in DEMO_MODELS if (MODELS_DIR / m / "config.json").is_file()]
    base = RomerConfig()
    seeds = list(range(EVAL_SEED, EVAL_SEED + args.seeds))
    results: dict[str, Any] = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/romer_eval.py " + " ".join(sys.argv[1:]),
        "eval_tokens": args.eval_tokens, "seq_len": args.seq_len, "seeds": seeds,
        "calib_samples": args.calib_samples, "calib_seq_len": args.calib_seq_len,
        "fit_seeds": [base.calib_seed + i for i in range(base.calib_seeds)],
        "romer_options": {k: v for k, v in base.__dict__.items() if k != "calib_batch_size"},
        "models": [], "sweep": [],
    }  # fmt: skip
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in names:
        setup = load_setup(name, args)
        print(f"{name}: clean PPL {setup.clean_ppl:.2f}", flush=True)
        freq = {i: v.tolist() for i, v in setup.clean_stats.frequencies().items()}
        model: dict[str, Any] = {
            "name": name, "model_type": setup.adapter.model_type, "clean_ppl": setup.clean_ppl,
            "top_k": setup.moe.top_k, "num_experts": setup.moe.num_experts, "clean_calib_freq": freq,
            "regimes": [],
        }  # fmt: skip
        for regime in args.regimes:
            row = run_regime(setup, REGIMES[regime], base, seeds, insitu=not args.no_insitu)
            model["regimes"].append(row)
            c, r = row["cross"], row["insitu"]
            insitu = f"{_fmt(r['romer'])} ({r['romer']['gap_closed_pct']:+.0f}% gap)" if r else "-"
            print(f"  {regime:16s} noisy {_fmt(row['noisy'])} | cross ROMER {_fmt(c['romer'])} "
                  f"({c['romer']['gap_closed_pct']:+.0f}% gap) | in-situ {insitu} | {row['seconds']} s",
                  flush=True)  # fmt: skip
        model["histograms"] = load_histograms(setup, REGIMES[args.hist_regime], base)
        model["cost"] = calibration_cost(setup, REGIMES[args.hist_regime], base)
        results["models"].append(model)
        if args.sweep and name == names[0]:
            results["sweep"] = sweep(setup, base, seeds[: args.sweep_seeds], SWEEP_REGIMES)
        plot_histograms(model, args.out.parent / f"{args.out.name}_load_{name}.png")
    results["seconds"] = round(time.perf_counter() - start, 1)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=float), encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(results), encoding="utf-8")
    plot_noise_levels(results, args.out.parent / f"{args.out.name}_ppl_vs_noise.png")
    print(f"wrote {args.out.with_suffix('.md')} ({results['seconds']} s)")


if __name__ == "__main__":
    main()
