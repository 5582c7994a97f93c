#!/usr/bin/env python
"""Real pretrained models under chip noise: where it hurts, what hurts, and what a draw costs.

Models (fetched by ``scripts/get_models.sh`` into the git-ignored ``models/``): SmolLM2-135M-Instruct
(dense, dequantised from its Q4_1 GGUF) and its training-free MoE build (``examples/moefy.py``). Every
noisy figure is the mean ± std over ``--seeds`` unseen chip draws starting at seed 5000 (calibration and
method choices use other seeds and the ``calib`` text, never these draws or the evaluation text).

Phases (each writes ``benchmarks/results/real_<phase>.{json,md}``, plus PNGs where noted):

* ``sensitivity``: clean vs chipA, chipA with aihwkit's PCM_READ w_noise (Rasch et al. 2023), hermes,
  chipB and a relative-Gaussian sweep, on the held-out text and on WikiText-2 test;
* ``attribution``: chipA's noise components alone and all-but-one; noise in one tensor kind or one third
  of the blocks only; per-tensor vs per-channel mapping; weight and input statistics per tensor kind;
* ``analyze``: ``cimconvert analyze`` per block (PNG), to see whether the last block is the most sensitive;
* ``speed``: programming all weights for one draw vs one clean pass, and a noisy pass vs a clean one.

    CIMCONVERT_SHARED_DATA=... .venv/bin/python benchmarks/real_models.py sensitivity --seeds 5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter, load_pretrained
from cimconvert.datasets import load_text, tokenize
from cimconvert.evaluation.monte_carlo import noisy_perplexities
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.placement import plan_model
from cimconvert.profiles import ChipProfile, load_profile

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
MODELS = {"smollm2-135m": REPO / "models" / "smollm2-135m-instruct",
          "smollm2-135m-moe": REPO / "models" / "smollm2-135m-moe"}
FIRST_SEED = 5000
SENSITIVITY_PROFILES = [
    "chipA", "chipA:mvm.w_noise=0.0175", "hermes", "chipB",
    "gaussian:sigma=0.02", "gaussian:sigma=0.05", "gaussian:sigma=0.1",
]
#: chipA's noise components as profile overrides that switch each one off.
COMPONENTS_OFF = {
    "programming": "programming.kind=none",
    "drift": "drift.kind=none",
    "read_1f": "read_noise.kind=none",
    "dac": "mvm.dac_bits=null",
    "adc": "mvm.adc_bits=null",
    "out_noise": "mvm.out_noise=0",
}


# ------------------------------------------------------------------------------------------- setup
def load_model(name: str) -> tuple[nn.Module, Any]:
    """(model in eval mode, tokenizer) of one real model; a clear message when it was not fetched."""
    from transformers import AutoTokenizer

    folder = MODELS[name]
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{folder} missing: run scripts/get_models.sh first")
    return load_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(str(folder))


def available_models(names: Sequence[str] | None) -> list[str]:
    """The requested (default: every fetched) real models."""
    chosen = list(names or MODELS)
    return [n for n in chosen if (MODELS[n] / "config.json").is_file() or names]


class Evaluator:
    """One model, one token set: clean perplexity once, noisy perplexities per profile and target set."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, seeds: Sequence[int], seq_len: int = 256):
        self.model, self.tokens, self.seeds, self.seq_len = model, tokens, list(seeds), seq_len
        self.clean = self.ppl(model, tokens)

    def ppl(self, model: nn.Module, tokens: torch.Tensor) -> float:
        """Perplexity over non-overlapping windows of ``seq_len``."""
        return perplexity(model, tokens, seq_len=self.seq_len, batch_size=8)

    def analog_targets(self, chip: ChipProfile, keep: Callable[[str], bool] | None = None) -> list[Any]:
        """The profile's analog tensors (default placement), optionally filtered by name."""
        targets = plan_model(self.model, chip).analog()
        return [t for t in targets if keep is None or keep(t.name)]

    def row(self, label: str, profile: str, keep: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """Noisy perplexity over the seeds with noise in the (filtered) analog tensors."""
        chip = load_profile(profile)
        targets = self.analog_targets(chip, keep)
        start = time.perf_counter()
        values = noisy_perplexities(self.model, self.tokens, targets, chip, self.seeds, self.ppl)
        finite = [v for v in values if math.isfinite(v)]
        row = {
            "label": label, "profile": profile, "analog_tensors": len(targets), "clean_ppl": self.clean,
            "per_seed": values, "seeds": self.seeds,
            "noisy_ppl_mean": statistics.fmean(finite) if finite else None,
            "noisy_ppl_std": statistics.stdev(finite) if len(finite) > 1 else 0.0,
            "seconds": round(time.perf_counter() - start, 1),
        }
        row["ratio"] = row["noisy_ppl_mean"] / self.clean if row["noisy_ppl_mean"] else None
        print(f"  {label:42s} {profile:40s} {row['noisy_ppl_mean'] or float('nan'):10.2f} "
              f"± {row['noisy_ppl_std']:.2f}  ({row['ratio'] or float('nan'):.2f}x clean "
              f"{self.clean:.2f})", flush=True)
        return row


def fmt(value: float | None) -> str:
    """A perplexity for a table (scientific above 1e4)."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3g}" if value >= 1e4 else f"{value:.2f}"


def command(phase: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a phase."""
    lists = [("models", args.models)]
    if phase == "sensitivity":  # the other phases evaluate the held-out text only
        lists += [("datasets", args.datasets), ("profiles", args.profiles)]
    extra = "".join(f" --{k} {' '.join(v)}" for k, v in lists if v)
    extra += " --detail" if getattr(args, "detail", False) else ""
    if phase == "attribution" and args.sections != ["components", "where"]:
        extra += " --sections " + " ".join(args.sections)
    return (f"CIMCONVERT_SHARED_DATA=<shared>/data .venv/bin/python benchmarks/real_models.py {phase} "
            f"--seeds {args.seeds} --max-tokens {args.max_tokens} --threads {args.threads}{extra}")


def write(phase: str, payload: dict[str, Any], markdown: str) -> None:
    """``real_<phase>.json`` and ``real_<phase>.md`` in benchmarks/results/."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"real_{phase}.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    (RESULTS / f"real_{phase}.md").write_text(markdown + "\n", encoding="utf-8")
    print(f"wrote benchmarks/results/real_{phase}.json and .md")


def previous(phase: str) -> dict[str, Any]:
    """The phase's earlier result file (so models measured in separate runs end up in one table)."""
    path = RESULTS / f"real_{phase}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def meta(args: argparse.Namespace, phase: str) -> dict[str, Any]:
    """Run metadata recorded with every result file."""
    return {"command": command(phase, args), "seeds": list(range(FIRST_SEED, FIRST_SEED + args.seeds)),
            "max_tokens": args.max_tokens, "seq_len": 256, "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__}


def table(rows: list[dict[str, Any]], first: str,
          label: Callable[[dict[str, Any]], str] = lambda r: r["label"]) -> list[str]:
    """Markdown rows: first column (``label`` of the row), profile, analog tensors, clean, noisy, ratio."""
    lines = [f"| {first} | profile | analog tensors | clean PPL | noisy PPL (mean ± std) | noisy/clean |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {label(r)} | `{r['profile']}` | {r['analog_tensors']} | {fmt(r['clean_ppl'])} | "
                     f"{fmt(r['noisy_ppl_mean'])} ± {fmt(r['noisy_ppl_std'])} | "
                     f"{(r['ratio'] or float('nan')):.2f}× |")
    return lines


# ------------------------------------------------------------------------------------ sensitivity
def sensitivity(args: argparse.Namespace) -> None:
    """Clean vs every profile, per model and dataset (the result files are rewritten after every row)."""
    seeds = range(FIRST_SEED, FIRST_SEED + args.seeds)
    for name in available_models(args.models):
        model, tokenizer = load_model(name)
        for dataset in args.datasets:
            print(f"{name} / {dataset}", flush=True)
            ev = Evaluator(model, tokenize(tokenizer, load_text(dataset), args.max_tokens), seeds)
            for profile in args.profiles or SENSITIVITY_PROFILES:
                row = {**ev.row(f"{name} · {dataset}", profile), "model": name, "dataset": dataset,
                       "tokens": int(ev.tokens.numel()), "command": command("sensitivity", args)}
                _save_sensitivity_row(row, args)


def _save_sensitivity_row(row: dict[str, Any], args: argparse.Namespace) -> None:
    key = (row["model"], row["dataset"], row["profile"])
    kept = [r for r in previous("sensitivity").get("rows", [])
            if (r["model"], r["dataset"], r["profile"]) != key]
    rows = sorted([*kept, row], key=lambda r: (r["model"], r["dataset"]))
    md = ["# Real models under chip noise", "", "Each row was measured by the command in its `command` field "
          "(results JSON); windows of 256 tokens, unseen draws from seed 5000 on.", "",
          *table(rows, "model · dataset (tokens, draws)",
                 lambda r: f"{r['label']} ({r['tokens']}, {len(r['seeds'])})")]
    write("sensitivity", {**meta(args, "sensitivity"), "rows": rows}, "\n".join(md))


# ------------------------------------------------------------------------------------ attribution
def components_on(profile: str) -> list[str]:
    """chipA's noise components a ``chipA:...`` override string leaves switched on."""
    overrides = set(profile.partition(":")[2].split(",")) if ":" in profile else set()
    return [comp for comp, off in COMPONENTS_OFF.items() if off not in overrides]


def component_label(name: str, profile: str) -> str:
    """``<model>: <components on>`` (or ``all chipA effects`` / ``all but <component>``)."""
    on = components_on(profile)
    if len(on) == len(COMPONENTS_OFF):
        return f"{name}: all chipA effects"
    if len(on) == len(COMPONENTS_OFF) - 1:
        return f"{name}: all but {next(c for c in COMPONENTS_OFF if c not in on)}"
    return f"{name}: {' + '.join(on) or 'none'} only"


def _component_rows(ev: Evaluator, name: str, on_row: Callable[[dict[str, Any]], None]) -> None:
    """chipA, then each component alone and all but that component; ``on_row`` gets every row."""
    on_row(ev.row(component_label(name, "chipA"), "chipA"))
    for comp, off in COMPONENTS_OFF.items():
        alone = "chipA:" + ",".join(v for k, v in COMPONENTS_OFF.items() if k != comp)
        on_row({**ev.row(component_label(name, alone), alone), "component": comp, "mode": "alone"})
        but = f"chipA:{off}"
        on_row({**ev.row(component_label(name, but), but), "component": comp, "mode": "all_but"})


def _where_rows(ev: Evaluator, name: str, blocks: int, detail: bool,
                on_row: Callable[[dict[str, Any]], None]) -> None:
    """chipA noise in one part of the model only, and other mapping granularities."""
    adapter = get_adapter(ev.model.config)
    third = max(1, blocks // 3)

    def in_blocks(lo: int, hi: int) -> Callable[[str], bool]:
        return lambda t: (b := adapter.layer_index(t)) is not None and lo <= b < hi

    groups: list[tuple[str, Callable[[str], bool]]] = [
        ("attention only", lambda t: ".self_attn." in t),
        ("MLP / experts only", lambda t: ".mlp." in t),
        (f"blocks 0-{third - 1} only", in_blocks(0, third)),
        (f"blocks {third}-{blocks - third - 1} only", in_blocks(third, blocks - third)),
        (f"blocks {blocks - third}-{blocks - 1} only", in_blocks(blocks - third, blocks)),
    ]
    if detail:
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "gate", "up", "down"):
            groups.append((f"{proj} only", lambda t, p=proj: f".{p}" in t and ".mlp.gate.weight" not in t))
    for label, keep in groups:
        on_row({**ev.row(f"{name}: {label}", "chipA", keep), "group": label})
    on_row({**ev.row(f"{name}: per-tensor mapping", "chipA:mapping.scale=tensor"), "group": "mapping"})
    if detail:
        on_row({**ev.row(f"{name}: per-tile mapping", "chipA:mapping.scale=tile"), "group": "mapping"})


@torch.no_grad()
def tensor_statistics(model: nn.Module, tokens: torch.Tensor) -> list[dict[str, Any]]:
    """Per analog linear layer: weight row crest factor and input outlier ratio on one batch.

    ``row_crest``: mean over output rows of max|w| / rms(w) (how much of a per-row abs-max mapping's
    range the typical weight uses); ``tensor_over_channel``: max|W| / mean row max|w| (what a per-tensor
    mapping loses against per-channel); ``input_crest``: mean over tokens of max|x| / rms(x) (what an
    abs-max DAC scaling does to the typical input); ``input_max_channel_ratio``: the largest channel's
    abs-max / median channel abs-max (channel outliers).
    """
    chip = load_profile("chipA")
    targets = {t.name.removesuffix(".weight") for t in plan_model(model, chip).analog()}
    stats: dict[str, dict[str, Any]] = {}
    hooks = []
    for name, module in model.named_modules():
        if name in targets and isinstance(module, nn.Linear):
            w = module.weight.detach().float()
            rms = w.pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
            row_max = w.abs().amax(dim=1)
            stats[name] = {"name": name, "row_crest": float((row_max / rms).mean()),
                           "tensor_over_channel": float(row_max.max() / row_max.mean())}

            def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], _out: Any, key: str = name) -> None:
                x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
                crest = x.abs().amax(dim=1) / x.pow(2).mean(dim=1).sqrt().clamp_min(1e-12)
                channel = x.abs().amax(dim=0)
                stats[key]["input_crest"] = float(crest.mean())
                outlier = channel.max() / channel.median().clamp_min(1e-12)
                stats[key]["input_max_channel_ratio"] = float(outlier)

            hooks.append(module.register_forward_hook(hook))
    model(input_ids=tokens[: 4 * 256].view(4, 256), use_cache=False)
    for h in hooks:
        h.remove()
    return list(stats.values())


def _stats_by_kind(stats: list[dict[str, Any]]) -> list[str]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for s in stats:
        kinds.setdefault(s["name"].rsplit(".", 1)[-1], []).append(s)
    lines = ["| tensor kind | layers | weight row crest (mean) | per-tensor / per-channel range | "
             "input crest (mean) | input channel outlier ratio (mean / max) |", "|---|---|---|---|---|---|"]
    for kind, rows in kinds.items():
        def avg(key: str, rs: list[dict[str, Any]] = rows) -> float:
            return statistics.fmean(r[key] for r in rs)

        lines.append(f"| {kind} | {len(rows)} | {avg('row_crest'):.1f} | {avg('tensor_over_channel'):.2f} | "
                     f"{avg('input_crest'):.1f} | {avg('input_max_channel_ratio'):.1f} / "
                     f"{max(r['input_max_channel_ratio'] for r in rows):.1f} |")
    return lines


def attribution(args: argparse.Namespace) -> None:
    """Which chipA component and which part of the model hurts a real model."""
    seeds = range(FIRST_SEED, FIRST_SEED + args.seeds)
    payload: dict[str, Any] = {**meta(args, "attribution"), "models": {}}
    md = ["# What hurts a real model under chipA", "", f"`{command('attribution', args)}`", "",
          f"Held-out text, {args.max_tokens} tokens, {args.seeds} unseen draws (seeds {FIRST_SEED}…)."]
    for name in available_models(args.models):
        model, tokenizer = load_model(name)
        tokens = tokenize(tokenizer, load_text("heldout"), args.max_tokens)
        print(name, flush=True)
        ev = Evaluator(model, tokens, seeds)
        stats = tensor_statistics(model, tokenize(tokenizer, load_text("calib"), 1024))
        prior = previous("attribution").get("models", {}).get(name, {})
        result: dict[str, Any] = {section: [] if section in args.sections else prior.get(section, [])
                                  for section in ("components", "where")}
        result["tensor_stats"] = stats
        _save_attribution(payload, md, name, result)

        def saver(section: str, res: dict[str, Any] = result, model_name: str = name) -> Callable:
            def on_row(row: dict[str, Any]) -> None:
                res[section].append(row)
                _save_attribution(payload, md, model_name, res)
            return on_row

        if "components" in args.sections:
            _component_rows(ev, name, saver("components"))
        if "where" in args.sections:
            _where_rows(ev, name, model.config.num_hidden_layers, args.detail, saver("where"))


def _save_attribution(payload: dict[str, Any], header: list[str], name: str, result: dict[str, Any]) -> None:
    payload["models"] = {**previous("attribution").get("models", {}), **payload["models"], name: result}
    md = list(header)
    for model, res in payload["models"].items():
        md += ["", f"## {model}", "", "### Noise components", "", *table(res["components"], "variant"),
               "", "### Where", "", *table(res["where"], "noise only in / mapping"),
               "", "### Weight and input statistics (calibration text, 1024 tokens)", "",
               *_stats_by_kind(res["tensor_stats"])]
    write("attribution", payload, "\n".join(md))


# ---------------------------------------------------------------------------------------- analyze
def analyze_phase(args: argparse.Namespace) -> None:
    """``cimconvert analyze`` per block on each real model, plot and table."""
    from cimconvert.analysis import analyze

    payload: dict[str, Any] = {**meta(args, "analyze"), "models": {}}
    md = ["# Per-block sensitivity of the real models (`cimconvert analyze --granularity block`)", "",
          f"`{command('analyze', args)}`", ""]
    for name in available_models(args.models):
        out = RESULTS / f"real_analyze_{name}"
        scan = analyze(os.path.relpath(MODELS[name]), "chipA", seeds=args.seeds, seed=FIRST_SEED,
                       granularity="block", out=out, max_tokens=args.max_tokens, progress=False)
        payload["models"][name] = {k: v for k, v in scan.items() if k != "files"}
    payload["models"] = {**previous("analyze").get("models", {}), **payload["models"]}
    for name in payload["models"]:
        table_md = (RESULTS / f"real_analyze_{name}" / "sensitivity.md").read_text(encoding="utf-8")
        md += [f"## {name}", "", f"![per-block sensitivity](real_analyze_{name}/sensitivity.png)", "",
               table_md, ""]
    write("analyze", payload, "\n".join(md))


# ------------------------------------------------------------------------------------------ speed
def speed(args: argparse.Namespace) -> None:
    """Programming time vs a clean pass, noisy pass vs clean pass (interleaved repetitions)."""
    model, tokenizer = load_model("smollm2-135m")
    tokens = tokenize(tokenizer, load_text("heldout"), 4096)
    chip = load_profile("chipA")
    targets = plan_model(model, chip).analog()
    weights_only = load_profile("chipA:mvm.dac_bits=null,mvm.adc_bits=null,mvm.out_noise=0")
    times: dict[str, list[float]] = {"clean_pass": [], "program_all": [], "noisy_pass": [], "restore": []}
    for rep in range(args.repeats):
        start = time.perf_counter()
        perplexity(model, tokens)
        times["clean_pass"].append(time.perf_counter() - start)
        start = time.perf_counter()
        handle = apply_chip_noise(model, targets, weights_only, FIRST_SEED + rep)
        times["program_all"].append(time.perf_counter() - start)
        start = time.perf_counter()
        handle.restore()
        times["restore"].append(time.perf_counter() - start)
        start = time.perf_counter()
        with apply_chip_noise(model, targets, chip, FIRST_SEED + rep):
            perplexity(model, tokens)
        times["noisy_pass"].append(time.perf_counter() - start)
        print({k: round(v[-1], 2) for k, v in times.items()}, flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {"program_over_clean": med["program_all"] / med["clean_pass"],
              "noisy_over_clean": med["noisy_pass"] / med["clean_pass"]}
    payload = {**meta(args, "speed"), "tokens": 4096, "repeats": args.repeats, "seconds": times,
               "median_seconds": med, "ratios": ratios, "targets": {"program_over_clean": 0.3,
                                                                   "noisy_over_clean": 1.5}}
    md = ["# Cost of a chip draw on SmolLM2-135M (4096 tokens, chipA)", "",
          f"`.venv/bin/python benchmarks/real_models.py speed --repeats {args.repeats} "
          f"--threads {args.threads}`",
          "", "| quantity | median s | ratio to a clean pass | target |", "|---|---|---|---|",
          f"| clean pass | {med['clean_pass']:.2f} | 1.00 | |",
          f"| program all 210 analog tensors (one draw) | {med['program_all']:.2f} | "
          f"{ratios['program_over_clean']:.3f} | ≤ 0.3 |",
          f"| restore clean weights | {med['restore']:.2f} | {med['restore'] / med['clean_pass']:.3f} | |",
          "| noisy pass incl. programming (full chipA, per-MVM DAC/ADC/out_noise) | "
          f"{med['noisy_pass']:.2f} | "
          f"{ratios['noisy_over_clean']:.2f} | ≤ 1.5 |"]
    write("speed", payload, "\n".join(md))


def render(args: argparse.Namespace) -> None:
    """Rewrite real_attribution.md from its JSON (no measurement): component rows labelled by the
    components their profile leaves on, repeated profiles listed once."""
    payload = previous("attribution")
    seeds, tokens = len(payload.get("seeds", [])), payload.get("max_tokens")
    header = ["# What hurts a real model under chipA", "",
              f"`.venv/bin/python benchmarks/real_models.py attribution --sections components|where "
              f"--seeds {seeds} --max-tokens {tokens} --threads 2 [--models M]`", "",
              f"Held-out text, {tokens} tokens, {seeds} unseen draws (seeds {FIRST_SEED}…)."]
    for name, res in payload.get("models", {}).items():
        seen: set[str] = set()
        rows = []
        for row in res["components"]:
            if row["profile"] not in seen:
                seen.add(row["profile"])
                rows.append({**row, "label": component_label(name, row["profile"])})
        res["components"] = rows
        _save_attribution(payload, header, name, res)


PHASES = {"render": render, "sensitivity": sensitivity, "attribution": attribution, "analyze": analyze_phase,
          "speed": speed}


def main() -> None:
    """Run one phase."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=sorted(PHASES))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="speed phase: interleaved repetitions")
    parser.add_argument("--models", nargs="*", choices=sorted(MODELS), help="default: every fetched model")
    parser.add_argument("--datasets", nargs="*", default=["heldout", "wikitext2"])
    parser.add_argument("--profiles", nargs="*", help="sensitivity phase: profiles [the standard set]")
    parser.add_argument("--sections", nargs="*", default=["components", "where"],
                        help="attribution phase: which parts to measure")
    parser.add_argument("--detail", action="store_true",
                        help="attribution phase: also one row per projection type and per-tile mapping")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    PHASES[args.phase](args)


if __name__ == "__main__":
    main()
