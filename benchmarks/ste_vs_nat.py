#!/usr/bin/env python
"""Extended STE vs. standard noise-aware training (NAT), side by side on the same model, data and steps.

One run trains every method from the same checkpoint with the same batches (same data seed), the same
learning-rate schedule and the same number of steps; the steps of the methods are *interleaved*
(step k of every method before step k+1 of any), so background load on the machine hits all of them
alike. Methods:

* ``ste``      full chipA simulator forward (programming noise, drift, 1/f read noise, compensation,
               DAC/ADC, out_noise), straight-through (identity) backward;
* ``nat``      W + σ·max|W_row|·ε inside autograd, σ matched to chipA's effective relative weight noise;
* ``nat-chip`` chipA's weight-level chain written differentiably, inside autograd;
* ``none``     clean fine-tuning (control: what the extra training alone does).

Measured:

* wall time per step (median over the steps after 3 warm-up steps, explicit ``torch.set_num_threads``);
* peak memory, per method in a fresh subprocess that loads the same model and pre-tokenised data and
  runs ``--mem-steps`` warm-up steps (so AdamW's state exists), then: (a) the peak of one training
  step's tensor memory above what was live before it (parameters, AdamW state, last gradients), from
  the CPU allocator events of ``torch.profiler`` (``profile_memory=True``) — every tensor the step
  allocates: the noise draws, programmed weights, activations, saved tensors, gradients; (b) the
  bytes autograd saves for backward in one step (``torch.autograd.graph.saved_tensors_hooks``, unique
  storages). The process's peak RSS (``resource.getrusage``) is recorded too but is dominated by
  importing and loading (it does not move with the method on a model this small);
* held-out perplexity (``heldout``, never trained on), clean and under ``--eval-seeds`` chipA noise
  draws with seeds 1000, 1001, ... — draws no method saw in training (training draws come from
  sha256-derived per-step seeds) — for the untrained model and for every fine-tuned one.

Example (about 10 minutes on one thread)::

    OMP_NUM_THREADS=1 python benchmarks/ste_vs_nat.py --steps 150 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "ste_vs_nat"
#: benchmark name → (trainer method, NAT noise model)
METHODS: dict[str, tuple[str, str]] = {
    "ste": ("ste", "gaussian"),
    "nat": ("nat", "gaussian"),
    "nat-chip": ("nat", "chip"),
    "none": ("none", "gaussian"),
}
WARMUP_STEPS = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO / "examples" / "models" / "tiny-olmoe"))
    p.add_argument("--profile", default="chipA")
    p.add_argument("--methods", default="ste,nat,nat-chip,none")
    p.add_argument("--data", default="gutenberg-train")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-seeds", type=int, default=5)
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--mem-steps", type=int, default=2, help="warm-up steps before the memory probes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(DEFAULT_OUT), help="results path without extension (.json, .md)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokens-file", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------ setup
def load(model_path: str) -> tuple[torch.nn.Module, Any]:
    """The model (fp32) and its tokenizer."""
    from transformers import AutoTokenizer

    from cimconvert.checkpoint import resolve_model

    source = resolve_model(model_path)
    return source.load_model(), AutoTokenizer.from_pretrained(str(source.dir))


def make_trainer(model: torch.nn.Module, name: str, args: argparse.Namespace, tokens: torch.Tensor) -> Any:
    """A Trainer for benchmark method ``name``."""
    from cimconvert.finetune import FinetuneConfig, Trainer, analog_targets
    from cimconvert.placement import plan_model
    from cimconvert.profiles import load_profile

    chip = load_profile(args.profile)
    method, nat_noise = METHODS[name]
    cfg = FinetuneConfig(
        method=method,
        nat_noise=nat_noise,
        steps=args.steps,
        lr=args.lr,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        seed=args.seed,
    )
    return Trainer(model, chip, cfg, tokens, analog_targets(model, plan_model(model, chip)))


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ----------------------------------------------------------------------------------------- memory
class SavedBytes:
    """Bytes of the unique storages autograd saves for backward while the context is open."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def allocator_peak_mb(step: Any) -> float:
    """Peak of the CPU tensor allocator's running total during ``step()``, MiB above its start level.

    From the ``[memory]`` events of ``torch.profiler`` (``profile_memory=True``): every tensor allocation
    and free, in order; tensors freed during the step that were allocated before it count negative.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    memory = sorted(
        (e for e in events if e.get("name") == "[memory]"), key=lambda e: (e["ts"], e["args"]["Ev Idx"])
    )
    running, peak = 0, 0
    for event in memory:
        running += int(event["args"]["Bytes"])
        peak = max(peak, running)
    return peak / 2**20


def memory_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In this (fresh) process: warm-up steps, then one profiled and one hooked step of one method."""
    torch.set_num_threads(args.threads)
    model, _ = load(args.model)
    tokens = torch.load(args.tokens_file, weights_only=True)
    trainer = make_trainer(model, args.memory_worker, args, tokens)
    for _ in range(args.mem_steps):  # AdamW state exists from the first step on
        trainer.train_step()
    peak = allocator_peak_mb(trainer.train_step)
    saved = SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        trainer.train_step()
    return {
        "step_peak_mb": peak,
        "autograd_saved_mb": saved.total / 2**20,
        "process_peak_rss_mb": rss_mb(),
        "warmup_steps": args.mem_steps,
    }


def measure_memory(args: argparse.Namespace, names: list[str], tokens_file: str) -> dict[str, dict[str, Any]]:
    """One fresh subprocess per method (sequentially, so they never compete for memory)."""
    out = {}
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--memory-worker",
            name,
            "--tokens-file",
            tokens_file,
            "--model",
            args.model,
            "--profile",
            args.profile,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--lr",
            str(args.lr),
            "--seed",
            str(args.seed),
            "--mem-steps",
            str(args.mem_steps),
            "--threads",
            str(args.threads),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        out[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"memory {name}: {out[name]}", flush=True)
    return out


# ------------------------------------------------------------------------------------ train, eval
def train_interleaved(trainers: dict[str, Any], steps: int) -> dict[str, list[float]]:
    """Step k of every method, then step k+1; returns seconds per step per method."""
    times: dict[str, list[float]] = {name: [] for name in trainers}
    for step in range(steps):
        for name, trainer in trainers.items():
            times[name].append(trainer.train_step().seconds)
        if step % 10 == 0 or step == steps - 1:
            losses = "  ".join(f"{n} {t.history[-1].loss:.3f}" for n, t in trainers.items())
            print(f"step {step + 1}/{steps}: {losses}", flush=True)
    return times


def evaluate(model: torch.nn.Module, tokens: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Clean and noisy held-out perplexity (seeds 1000.., never used in training)."""
    from cimconvert.evaluation.monte_carlo import evaluate_model
    from cimconvert.placement import plan_model
    from cimconvert.profiles import load_profile

    chip = load_profile(args.profile)
    model.eval()
    seeds = list(range(1000, 1000 + args.eval_seeds))
    res = evaluate_model(
        model, tokens, plan_model(model, chip).analog(), chip, seeds, seq_len=args.eval_seq_len, batch_size=8
    )
    return {
        "clean_ppl": res.clean_ppl,
        "noisy_ppl_mean": res.noisy_mean,
        "noisy_ppl_std": res.noisy_std,
        "noisy_per_seed": res.per_seed,
        "seeds": seeds,
    }


def step_stats(times: list[float]) -> dict[str, float]:
    """Median / mean / min seconds per step after the warm-up steps."""
    body = times[WARMUP_STEPS:] or times
    return {"median_s": statistics.median(body), "mean_s": statistics.fmean(body), "min_s": min(body)}


# ---------------------------------------------------------------------------------------- report
def markdown(result: dict[str, Any]) -> str:
    """The results table (and settings) as Markdown."""
    s = result["settings"]
    ref = result["methods"].get("nat", {})
    lines = [
        "# Extended STE vs. noise-aware training (NAT)",
        "",
        f"Model `{Path(s['model']).name}`, profile `{s['profile']}`, data `{s['data']}`, {s['steps']} steps "
        f"of batch {s['batch_size']} x seq {s['seq_len']}, AdamW lr {s['lr']} (warm-up + cosine), seed "
        f"{s['seed']}, {s['threads']} thread(s); held-out PPL over {s['eval_seeds']} unseen chip draws "
        f"(seeds 1000..{999 + s['eval_seeds']}), seq {s['eval_seq_len']}, {s['eval_tokens']} tokens.",
        "",
        f"Command: `{result['command']}`",
        "",
        "| method | s/step (median) | speed-up vs nat | step peak memory (MiB) | reduction vs nat "
        "| autograd saved (MiB) "
        "| clean PPL | noisy PPL (mean ± std) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = result["untrained"]
    lines.append(
        f"| untrained | – | – | – | – | – | {base['clean_ppl']:.2f} | "
        f"{base['noisy_ppl_mean']:.2f} ± {base['noisy_ppl_std']:.2f} |"
    )
    for name, m in result["methods"].items():
        speed = ref["step"]["median_s"] / m["step"]["median_s"] if ref else float("nan")
        mem, ref_mem = m["memory"]["step_peak_mb"], ref.get("memory", {}).get("step_peak_mb")
        mem_rel = f"{100 * (1 - mem / ref_mem):+.0f}%" if ref_mem else "–"
        lines.append(
            f"| {name} | {m['step']['median_s']:.3f} | {speed:.2f}x | {mem:.1f} | {mem_rel} | "
            f"{m['memory']['autograd_saved_mb']:.1f} | {m['eval']['clean_ppl']:.2f} | "
            f"{m['eval']['noisy_ppl_mean']:.2f} ± {m['eval']['noisy_ppl_std']:.2f} |"
        )
    lines += [
        "",
        "Targets (issue 7): STE >= 2.2x faster per step and >= 38% lower peak memory than NAT, and "
        "lower noisy PPL after the same steps.",
        "",
    ]
    lines += [f"- {line}" for line in result["verdict"]]
    return "\n".join(lines) + "\n"


def verdict(result: dict[str, Any]) -> list[str]:
    """Target-by-target comparison of ste against nat and nat-chip (as measured)."""
    methods = result["methods"]
    if "ste" not in methods:
        return []
    ste, out = methods["ste"], []
    for ref in ("nat", "nat-chip"):
        if ref not in methods:
            continue
        other = methods[ref]
        speed = other["step"]["median_s"] / ste["step"]["median_s"]
        mem = 1 - ste["memory"]["step_peak_mb"] / other["memory"]["step_peak_mb"]
        dppl = ste["eval"]["noisy_ppl_mean"] - other["eval"]["noisy_ppl_mean"]
        out.append(
            f"ste vs {ref}: {speed:.2f}x per-step speed "
            f"(target 2.2x: {'met' if speed >= 2.2 else 'missed'}), "
            f"{100 * mem:+.1f}% peak-memory reduction (target 38%: {'met' if mem >= 0.38 else 'missed'}), "
            f"noisy PPL {dppl:+.2f} (target < 0: {'met' if dppl < 0 else 'missed'})"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write ``<out>.json`` and ``<out>.md``."""
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args)))
        return
    torch.set_num_threads(args.threads)
    from cimconvert.datasets import load_text, token_ids
    from cimconvert.finetune.training_data import training_text

    began = time.perf_counter()
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    model, tokenizer = load(args.model)
    train_tokens = token_ids(tokenizer, training_text(args.data))
    eval_tokens = token_ids(tokenizer, load_text("heldout"))
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = str(Path(tmp) / "tokens.pt")
        torch.save(train_tokens, tokens_file)
        memory = measure_memory(args, names, tokens_file)
    untrained = evaluate(model, eval_tokens, args)
    print(f"untrained: {untrained}", flush=True)
    trainers = {name: make_trainer(copy.deepcopy(model), name, args, train_tokens) for name in names}
    times = train_interleaved(trainers, args.steps)
    methods = {}
    for name, trainer in trainers.items():
        methods[name] = {
            "describe": trainer.method.describe(),
            "step": step_stats(times[name]),
            "memory": memory[name],
            "loss_first": trainer.history[0].loss,
            "loss_last10_mean": statistics.fmean(s.loss for s in trainer.history[-10:]),
            "eval": evaluate(trainer.model, eval_tokens, args),
        }
        print(f"{name}: {methods[name]['step']} {methods[name]['eval']}", flush=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("memory_worker", "tokens_file", "out")}
    settings.update(train_tokens=int(train_tokens.numel()), eval_tokens=int(eval_tokens.numel()))
    result = {
        "command": "python benchmarks/ste_vs_nat.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": settings,
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
        },
        "untrained": untrained,
        "methods": methods,
        "seconds_total": time.perf_counter() - began,
    }
    result["verdict"] = verdict(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))


if __name__ == "__main__":
    main()
