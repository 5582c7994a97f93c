#!/usr/bin/env python
"""GPU check, prepared to run as one script when a GPU machine is lent: SmolLM2 noisy eval on the GPU vs
the CPU, within the tolerances docs/SIMULATOR.md ("Devices") documents, and the per-draw speed-up.

Checks (model and tokens identical on both devices; float32 unless said otherwise):

1. programmed weights: every analog tensor programmed with the same seed on the GPU and on the CPU (the
   programming draws come from the CPU generator on both): max |ΔW| / max|W| <= ``WEIGHT_RTOL``;
2. clean perplexity: |PPL_gpu / PPL_cpu - 1| <= ``CLEAN_RTOL``;
3. noisy perplexity per seed with counter per-MVM noise (the same draws on both devices):
   |PPL_gpu / PPL_cpu - 1| <= ``NOISY_RTOL`` each (ADC steps flipped by float32 summation order cascade,
   as between torch and onnxruntime in ``validate``);
4. the default ``native`` per-MVM noise (each device's own generator: other draws, same distribution):
   the mean over seeds is reported on both devices (not asserted);
5. speed: seconds per noise draw (programming + one perplexity pass) on the CPU (all its cores) and on
   the GPU, and the speed-up; clean perplexity in bfloat16 on the GPU, for reference.

    python benchmarks/gpu_check.py --model models/smollm2-135m-instruct

On a lent GPU machine (python3 with a CUDA torch; only 64 MiB of files travel, so not SmolLM2's 514 MB of
weights): carry a folder holding the model's ``config.json`` and tokenizer files and pass
``--random-weights`` (a checkpoint with SmolLM2's exact shapes and seeded random weights is built there:
the device comparison and the speed-up hold for any weights), and carry the wheels of the packages that
machine lacks (pydantic, pydantic-core, annotated-types, typing-inspection).

Results: ``benchmarks/results/scale_gpu.{json,md}``; exit 1 when a check fails, 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch.loading import build_model
from cimconvert.datasets import load_text, tokenize
from cimconvert.devices import resolve_device
from cimconvert.errors import CimError
from cimconvert.evaluation.loading import load_for_eval
from cimconvert.evaluation.perplexity import perplexity

ROOT = Path(__file__).resolve().parents[1]
#: Tolerances (docs/SIMULATOR.md, "Devices").
WEIGHT_RTOL = 1e-5
CLEAN_RTOL = 1e-3
NOISY_RTOL = 0.05


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "smollm2-135m-instruct")
    parser.add_argument("--profile", default="chipA")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--random-weights", action="store_true",
                        help="build the model from --model's config.json with seeded random weights")
    parser.add_argument("--device", default="cuda", help="device under test (cpu: a dry run of the script)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return parser.parse_args()


def synced(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time, the GPU synchronised before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    value = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return value, time.perf_counter() - start


class Side:
    """The model on one device, its analog targets and the shared tokens."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype = torch.float32):
        self.device = device
        loaded = load_for_eval(str(args.model), args.profile, device, dtype)
        self.net, tokenizer, self.targets, self.chip = loaded
        self.tokens = tokenize(tokenizer, load_text("heldout"), args.max_tokens)
        self.args = args

    def ppl(self) -> float:
        """Perplexity of the model as it is now."""
        return perplexity(self.net, self.tokens, seq_len=self.args.seq_len, batch_size=self.args.batch_size)

    def noisy(self, seed: int, mvm_noise: str) -> tuple[float, float]:
        """(perplexity under ``seed``'s chip, seconds for programming + the pass)."""

        def draw() -> float:
            with apply_chip_noise(self.net, self.targets, self.chip, seed, mvm_noise=mvm_noise):
                return self.ppl()

        return synced(self.device, draw)

    def programmed(self, seed: int) -> dict[str, torch.Tensor]:
        """The programmed analog weights of ``seed`` (CPU copies)."""
        params = dict(self.net.named_parameters())
        with apply_chip_noise(self.net, self.targets, self.chip, seed):
            return {t.name: params[t.name].detach().float().cpu() for t in self.targets}


def weight_check(cpu: Side, gpu: Side, seed: int) -> dict[str, Any]:
    """Worst max|ΔW| / max|W| over the analog tensors, CPU vs GPU programming of ``seed``."""
    a, b = cpu.programmed(seed), gpu.programmed(seed)
    worst, name, identical = 0.0, "", 0
    for key, value in a.items():
        diff = float((value - b[key]).abs().max()) / max(float(value.abs().max()), 1e-30)
        identical += int(torch.equal(value, b[key]))
        if diff >= worst:
            worst, name = diff, key
    return {"max_rel_diff": worst, "worst_tensor": name, "bit_identical_tensors": identical,
            "tensors": len(a), "tolerance": WEIGHT_RTOL, "passed": worst <= WEIGHT_RTOL}  # fmt: skip


def rel(a: float, b: float) -> float:
    """|a / b - 1|."""
    return abs(a / b - 1.0)


def run_checks(args: argparse.Namespace) -> dict[str, Any]:
    """Every check of the module docstring."""
    gpu_device = resolve_device(args.device)
    cpu, gpu = Side(args, torch.device("cpu")), Side(args, gpu_device)
    seeds = [1000 + i for i in range(args.seeds)]
    weights = weight_check(cpu, gpu, seeds[0])
    clean_cpu, clean_cpu_s = synced(cpu.device, cpu.ppl)
    clean_gpu, clean_gpu_s = synced(gpu.device, gpu.ppl)
    sides = (("cpu", cpu), ("gpu", gpu))
    counter = {name: [side.noisy(s, "counter") for s in seeds] for name, side in sides}
    native = {name: [side.noisy(s, "native") for s in seeds] for name, side in sides}
    per_seed = [rel(g[0], c[0]) for g, c in zip(counter["gpu"], counter["cpu"], strict=True)]
    draw_s = {name: statistics.median([t for _, t in counter[name] + native[name]]) for name, _ in sides}
    del gpu
    bf16 = Side(args, gpu_device, torch.bfloat16)
    clean_bf16 = bf16.ppl()
    checks = {
        "programmed_weights": weights,
        "clean": {"cpu": clean_cpu, "gpu": clean_gpu, "rel_diff": rel(clean_gpu, clean_cpu),
                  "tolerance": CLEAN_RTOL, "passed": rel(clean_gpu, clean_cpu) <= CLEAN_RTOL},
        "noisy_counter": {"cpu": [v for v, _ in counter["cpu"]], "gpu": [v for v, _ in counter["gpu"]],
                          "per_seed_rel_diff": per_seed, "tolerance": NOISY_RTOL,
                          "passed": max(per_seed) <= NOISY_RTOL},
    }  # fmt: skip
    return {
        "benchmark": "scale_gpu",
        "model": args.model.name,
        "profile": args.profile,
        "tokens": int(cpu.tokens.numel()),
        "seq_len": args.seq_len,
        "seeds": seeds,
        "gpu": torch.cuda.get_device_name(gpu_device) if gpu_device.type == "cuda" else str(gpu_device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "machine": platform.platform(),
        "checks": checks,
        "noisy_native_mean": {name: statistics.fmean(v for v, _ in native[name]) for name in ("cpu", "gpu")},
        "clean_bfloat16_gpu": clean_bf16,
        "seconds": {"clean_cpu": clean_cpu_s, "clean_gpu": clean_gpu_s, "per_draw_cpu": draw_s["cpu"],
                    "per_draw_gpu": draw_s["gpu"]},
        "per_draw_speedup": draw_s["cpu"] / draw_s["gpu"],
        "passed": all(c["passed"] for c in checks.values()),
    }


def _verdict(check: dict[str, Any]) -> str:
    return "pass" if check["passed"] else "FAIL"


def markdown(res: dict[str, Any]) -> str:
    """The results table."""
    c, s = res["checks"], res["seconds"]
    w, clean, noisy = c["programmed_weights"], c["clean"], c["noisy_counter"]
    identical = f"{w['bit_identical_tensors']}/{w['tensors']} bit-identical"
    cpu_mean, gpu_mean = statistics.fmean(noisy["cpu"]), statistics.fmean(noisy["gpu"])
    worst = max(noisy["per_seed_rel_diff"])
    lines = [
        f"# GPU vs CPU: {res['model']} ({res['weights']} weights) noisy eval ({res['gpu']}, "
        f"{res['cpu_threads']} CPU threads)",
        "",
        f"`python benchmarks/gpu_check.py` — profile {res['profile']}, {res['tokens']} tokens, seq_len "
        f"{res['seq_len']}, seeds {res['seeds']}; torch {res['torch']}, CUDA {res['cuda']}.",
        "",
        "| check | CPU | GPU | difference | tolerance | result |",
        "|---|---|---|---|---|---|",
        f"| programmed weights (seed {res['seeds'][0]}) | | | max|ΔW|/max|W| {w['max_rel_diff']:.2e} "
        f"({identical}) | {w['tolerance']:.0e} | {_verdict(w)} |",
        f"| clean PPL | {clean['cpu']:.4f} | {clean['gpu']:.4f} | {clean['rel_diff']:.2e} | "
        f"{clean['tolerance']:.0e} | {_verdict(clean)} |",
        f"| noisy PPL, counter draws (mean; worst seed) | {cpu_mean:.4f} | {gpu_mean:.4f} | {worst:.2e} | "
        f"{noisy['tolerance']} | {_verdict(noisy)} |",
        f"| noisy PPL, native draws (mean; other draws) | {res['noisy_native_mean']['cpu']:.4f} | "
        f"{res['noisy_native_mean']['gpu']:.4f} | | reported | |",
        "",
        f"Seconds per noise draw (programming + one pass): CPU {s['per_draw_cpu']:.2f}, GPU "
        f"{s['per_draw_gpu']:.2f}: speed-up **{res['per_draw_speedup']:.1f}×**. Clean pass: CPU "
        f"{s['clean_cpu']:.2f} s, GPU {s['clean_gpu']:.2f} s. Clean PPL in bfloat16 on the GPU: "
        f"{res['clean_bfloat16_gpu']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the checks and write the results (exit 2 without a GPU, 1 when a check fails)."""
    args = parse_args()
    name = args.model.name
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if args.random_weights:
            args.model = random_checkpoint(args.model, Path(tmp))
        res = checked_run(args)
    res["model"], res["weights"] = name, "random (seed 0)" if args.random_weights else "pretrained"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_gpu.json").write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    (args.out / "scale_gpu.md").write_text(markdown(res), encoding="utf-8")
    print(markdown(res))
    sys.exit(0 if res["passed"] else 1)


def random_checkpoint(source: Path, folder: Path) -> Path:
    """A checkpoint with ``source``'s config and tokenizer, seeded random weights, in ``folder``."""
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    build_model(config, seed=0).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    return folder


def checked_run(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`run_checks`, exit 2 when the device is not there (other errors keep their own message)."""
    try:
        resolve_device(args.device)
    except CimError as exc:  # --device cuda without a GPU
        print(f"gpu_check: {exc}", file=sys.stderr)
        sys.exit(2)
    return run_checks(args)


if __name__ == "__main__":
    main()
