#!/usr/bin/env python
"""Monte-Carlo over torchrun: ``eval`` of N noise draws, one process vs ``torchrun --nproc_per_node 2``.

Both variants run the real command line in fresh processes with one torch thread per process
(``OMP_NUM_THREADS=1 --threads 1``), interleaved (single, launched, single, launched, ...), and the wall
time of each whole command is measured (start-up, model load and the rendezvous included: what a user
waits for). Every launched run's JSON must equal the single-process JSON byte for byte. The machine's load
average before and after each run is recorded, since a shared machine makes the ratio noisy.

    OMP_NUM_THREADS=1 python benchmarks/scale_distributed.py --model models/smollm2-135m-instruct

Results: ``benchmarks/results/scale_distributed.{json,md}``. Target: launched / single <= 0.6.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.6


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct",
                        help="model folder (or bundle) to evaluate")  # fmt: skip
    parser.add_argument("--profile", default="chipA")
    parser.add_argument("--seeds", type=int, default=8, help="noise draws")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--nproc", type=int, default=2, help="ranks of the torchrun launch")
    parser.add_argument("--reps", type=int, default=2, help="interleaved repetitions of each variant")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args()


def eval_args(args: argparse.Namespace) -> list[str]:
    """The ``eval`` arguments both variants share."""
    return ["eval", str(args.model), "-p", args.profile, "--seeds", str(args.seeds), "--max-tokens",
            str(args.max_tokens), "--seq-len", str(args.seq_len), "--threads", "1", "--json"]  # fmt: skip


def commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The two command lines: one process, and a standalone torchrun launch of ``nproc`` ranks."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={args.nproc}"]  # fmt: skip
    return {
        "single": [sys.executable, "-m", "cimconvert", *eval_args(args)],
        "torchrun": [*launcher, "-m", "cimconvert", *eval_args(args)],
    }


def run_once(command: list[str]) -> dict[str, Any]:
    """Wall time, stdout and the load average around one run of ``command``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return {"seconds": seconds, "stdout": proc.stdout, "load_before": load_before,
            "load_after": os.getloadavg()[0]}  # fmt: skip


def measure(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Interleaved runs of both variants."""
    runs: dict[str, list[dict[str, Any]]] = {"single": [], "torchrun": []}
    for rep in range(args.reps):
        for name, command in commands(args).items():
            result = run_once(command)
            runs[name].append(result)
            print(f"rep {rep} {name:<8} {result['seconds']:.1f} s (load {result['load_before']:.1f} -> "
                  f"{result['load_after']:.1f})", flush=True)  # fmt: skip
    return runs


def summarise(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The result record: times, ratio, identical JSON, the machine's load."""
    reference = runs["single"][0]["stdout"]
    identical = all(r["stdout"] == reference for rs in runs.values() for r in rs)
    times = {name: [r["seconds"] for r in rs] for name, rs in runs.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["torchrun"] / medians["single"]
    result = json.loads(reference)
    return {
        "benchmark": "scale_distributed",
        "model": args.model.name,
        "profile": args.profile,
        "seeds": args.seeds,
        "max_tokens": args.max_tokens,
        "seq_len": args.seq_len,
        "nproc": args.nproc,
        "threads_per_process": 1,
        "reps": args.reps,
        "seconds": times,
        "median_seconds": medians,
        "ratio_torchrun_over_single": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "identical_json": identical,
        "clean_ppl": result["clean_ppl"],
        "per_seed": result["per_seed"],
        "load_average": {name: [[r["load_before"], r["load_after"]] for r in rs]
                         for name, rs in runs.items()},
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
    }


def ideal_passes(res: dict[str, Any]) -> int:
    """Model passes of the busiest rank: the clean pass and the draws shared out over ``nproc`` ranks."""
    return math.ceil((res["seeds"] + 1) / res["nproc"])


def markdown(res: dict[str, Any]) -> str:
    """The results table."""
    loads = [v for pairs in res["load_average"].values() for pair in pairs for v in pair]
    lines = [
        "# Monte-Carlo over torchrun: eval of noise draws, 1 process vs 2 ranks",
        "",
        f"`python benchmarks/scale_distributed.py` — model {res['model']}, profile {res['profile']}, "
        f"{res['seeds']} draws, {res['max_tokens']} tokens, seq_len {res['seq_len']}, 1 thread per process, "
        f"{res['reps']} interleaved repetitions; wall time of the whole command (start-up and load "
        "included).",
        "",
        "| variant | wall time per run (s) | median (s) |",
        "|---|---|---|",
        *(f"| {name} | {', '.join(f'{s:.1f}' for s in res['seconds'][name])} | "
          f"{res['median_seconds'][name]:.1f} |" for name in ("single", "torchrun")),
        "",
        f"Ratio torchrun / single: **{res['ratio_torchrun_over_single']:.2f}** (target <= "
        f"{res['target_ratio']}: {'met' if res['meets_target'] else 'not met'}). "
        "Identical JSON (same numbers): "
        f"**{'yes' if res['identical_json'] else 'NO'}**.",
        "",
        f"Machine: {res['cpus']} CPUs, 1-minute load average during the runs {min(loads):.1f} to "
        f"{max(loads):.1f} (a shared machine: other jobs ran at the same time, so the ratio is noisy).",
        "",
        f"The passes (the clean one and {res['seeds']} draws) are shared out task by task, so the busiest "
        f"rank runs {ideal_passes(res)} of {res['seeds'] + 1}: on an idle machine the ratio cannot go below "
        f"{ideal_passes(res) / (res['seeds'] + 1):.2f} plus the launcher's start-up. A ratio below that "
        "means "
        "the other jobs left the two ranks together more CPU time than the single process got (the kernel "
        "shares the cores per process), not a faster program.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run, write JSON and Markdown."""
    args = parse_args()
    res = summarise(args, measure(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_distributed.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (args.out / "scale_distributed.md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))


if __name__ == "__main__":
    main()
