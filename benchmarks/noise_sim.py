#!/usr/bin/env python
"""Cost of the chip-noise simulation: clean vs programmed (weights only) vs per-MVM simulation.

Variants, timed side by side with interleaved repetitions (one copy of the model per variant):

* ``clean``: the model as loaded;
* ``programmed``: chipA programming noise + drift + 1/f read noise written into the weights (no hooks);
* ``mvm``: full chipA (as ``programmed`` plus per-MVM out_noise and 8-bit DAC/ADC through hooks).

Workloads: (a) one 1024×1024 ``nn.Linear`` at batch 64; (b) the demo models
``examples/models/tiny-olmoe`` and ``examples/models/tiny-mamba`` at batch 4 × seq 256 (skipped with
a note when a folder does not exist). Results: ``benchmarks/results/noise_sim.{json,md}``.

    python benchmarks/noise_sim.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from cimconvert.analog.chip_noise import NoiseHandle, apply_chip_noise
from cimconvert.profiles import load_profile
from cimconvert.profiles.schema import ChipProfile

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("clean", "programmed", "mvm")
WEIGHTS_ONLY = {"mvm.dac_bits": "null", "mvm.adc_bits": "null", "mvm.out_noise": "0", "mvm.w_noise": "0"}
DIGITAL_PARTS = ("embed", "wte", "wpe", "lm_head", "mlp.gate.weight", "conv1d", "norm", "A_log")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--profile", default="chipA", help="chip profile for the noisy variants")
    parser.add_argument("--linear-reps", type=int, default=60)
    parser.add_argument("--model-reps", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=["tiny-olmoe", "tiny-mamba"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args()


def analog_targets(model: nn.Module, profile: ChipProfile) -> list[Any]:
    """Analog tensors: placement.plan_model when available, else every matmul weight but LM head/router."""
    try:
        from cimconvert.placement import plan_model  # written in parallel; optional here

        return list(plan_model(model, profile).analog())
    except Exception:  # placement not importable or model not supported: simple name rule
        return [
            SimpleNamespace(
                name=name, layout="in_out" if type(model).__name__.startswith("GPT2") else "out_in"
            )
            for name, param in model.named_parameters()
            if param.dim() in (2, 3) and not any(part in name for part in DIGITAL_PARTS)
        ]


def make_variants(
    model: nn.Module, targets: list[Any], profile: ChipProfile
) -> tuple[dict[str, nn.Module], list[NoiseHandle], dict[str, float]]:
    """One model copy per variant, noise applied; also returns the one-off programming time (s)."""
    models = {"clean": model}
    handles, setup = [], {}
    for variant, prof in (("programmed", load_profile(profile, WEIGHTS_ONLY)), ("mvm", profile)):
        copy_ = copy.deepcopy(model)
        start = time.perf_counter()
        handles.append(apply_chip_noise(copy_, targets, prof, seed=0))
        setup[variant] = time.perf_counter() - start
        models[variant] = copy_
    return models, handles, setup


def time_interleaved(calls: dict[str, Callable[[], Any]], reps: int) -> dict[str, list[float]]:
    """Per-variant wall times (ms), variants interleaved within each repetition after one warm-up."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for rep in range(reps):
        order = list(calls) if rep % 2 == 0 else list(reversed(calls))
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def summarise(
    name: str, times: dict[str, list[float]], setup: dict[str, float], detail: str
) -> dict[str, Any]:
    medians = {v: statistics.median(t) for v, t in times.items()}
    return {
        "workload": name,
        "detail": detail,
        "median_ms": medians,
        "ratio_to_clean": {v: medians[v] / medians["clean"] for v in medians},
        "programming_s": setup,
        "reps": len(times["clean"]),
    }


@torch.no_grad()
def bench_linear(profile: ChipProfile, reps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    layer = nn.Linear(1024, 1024).eval()
    x = torch.randn(64, 1024)
    targets = [SimpleNamespace(name="weight", layout="out_in")]
    models, handles, setup = make_variants(layer, targets, profile)
    times = time_interleaved({v: (lambda m=m: m(x)) for v, m in models.items()}, reps)
    for handle in handles:
        handle.restore()
    return summarise("linear 1024x1024", times, setup, "nn.Linear, batch 64")


def load_demo(name: str) -> tuple[nn.Module, str] | None:
    """(model, label) for a demo folder in examples/models, or None (skipped with a note)."""
    from transformers import AutoModelForCausalLM

    path = ROOT / "examples" / "models" / name
    if not (path / "config.json").is_file():
        print(f"note: examples/models/{name} does not exist; skipped")
        return None
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), name


@torch.no_grad()
def bench_model(model: nn.Module, label: str, profile: ChipProfile, reps: int) -> dict[str, Any]:
    targets = analog_targets(model, profile)
    ids = torch.randint(0, model.config.vocab_size, (4, 256), generator=torch.Generator().manual_seed(0))
    models, handles, setup = make_variants(model, targets, profile)
    times = time_interleaved({v: (lambda m=m: m(ids)) for v, m in models.items()}, reps)
    for handle in handles:
        handle.restore()
    n_params = sum(p.numel() for p in model.parameters())
    detail = f"{model.config.model_type}, {n_params / 1e6:.2f} M params, {len(targets)} analog, batch 4 x 256"
    return summarise(label, times, setup, detail)


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"# Noise simulation cost ({meta['profile']}, {meta['threads']} thread(s), torch {meta['torch']})",
        "",
        "| workload | clean ms | programmed ms | mvm ms | programmed / clean | mvm / clean | programming s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, q = r["median_ms"], r["ratio_to_clean"]
        lines.append(
            f"| {r['workload']} ({r['detail']}) | {m['clean']:.2f} | {m['programmed']:.2f} | {m['mvm']:.2f} "
            f"| {q['programmed']:.2f}x | {q['mvm']:.2f}x | {r['programming_s']['mvm']:.2f} |"
        )
    lines += ["", "Medians over interleaved repetitions; targets: programmed <= 1.1x, mvm <= 1.5x clean."]
    lines += [f"- {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    profile = load_profile(args.profile)
    results = [bench_linear(profile, args.linear_reps)]
    notes = []
    for name in args.models:
        loaded = load_demo(name)
        if loaded is None:
            notes.append(f"examples/models/{name} not present when run: skipped")
            continue
        results.append(bench_model(*loaded, profile, args.model_reps))
    meta = {
        "profile": profile.name,
        "profile_hash": profile.content_hash(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "notes": notes,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "noise_sim.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = markdown(results, meta)
    (args.out / "noise_sim.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
