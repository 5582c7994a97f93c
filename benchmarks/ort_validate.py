"""Per-draw cost of onnxruntime validation under chip noise vs clean onnxruntime vs torch eager.

One run, demo models, one thread (``OMP_NUM_THREADS=1``), batch 1 × ``--seq`` tokens, median of
``--repeats`` forwards. The forward columns are measured interleaved (one forward of each per round),
so load from other processes on a shared machine hits them alike (``torch_mvm`` is timed right
after, the model being patched). Columns (ms):

* ``torch``: eager clean forward; ``ort``: clean session (constant weights);
* ``ort_w``: forward with programmed weights bound through IO binding (no per-MVM effects);
* ``ort_mvm``: forward with the per-MVM bodies (DAC/ADC/out_noise, chipA) on prepared weights bound
  through IO binding;
* ``torch_mvm``: torch forward with apply_chip_noise's per-MVM simulation;
* ``program``: programming all analog tensors once (the torch simulator; same for torch and ORT);
  ``program_mvm``: the same plus ``prepare_mvm`` and binding for the per-MVM bodies (once per draw).

Usage: ``OMP_NUM_THREADS=1 python benchmarks/ort_validate.py [--seq 256] [--repeats 10]``; writes
``benchmarks/results/ort_validate.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.checkpoint import resolve_model
from cimconvert.onnx.export import build_onnx
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.runtime import OrtNoiseRunner, analog_tensors, make_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["tiny-olmoe", "tiny-qwen2-moe", "tiny-deepseek", "tiny-mamba"]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call."""
    return interleaved_ms({"fn": fn}, repeats)["fn"]


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall time (ms) of each function, one call of each per round, after one warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(repeats + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(values) for name, values in times.items()}


def bench_model(name: str, seq: int, repeats: int) -> dict[str, float | str]:
    """All columns for one demo model."""
    chip = load_profile("chipA")
    model = resolve_model(str(ROOT / "examples" / "models" / name)).load_model(dtype=torch.float32).eval()
    start = time.perf_counter()
    proto, _, _ = build_onnx(model, plan_model(model, chip).analog(), chip)
    export_s = time.perf_counter() - start
    tensors = analog_tensors(proto)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, seq), dtype=np.int64)}
    clean = make_session(proto)
    weights = OrtNoiseRunner(proto, chip, tensors, mvm=False)
    mvm = OrtNoiseRunner(proto, chip, tensors, mvm=True)
    draws = max(2, repeats // 3)
    program_ms = median_ms(lambda: weights.program(1000), draws)
    program_mvm_ms = median_ms(lambda: mvm.program(1000), draws)
    row: dict[str, float | str] = {"model": name, "export_s": round(export_s, 2)}
    with torch.no_grad():
        row.update(
            interleaved_ms(
                {
                    "torch": lambda: model(input_ids=ids, use_cache=False),
                    "ort": lambda: clean.run(["logits"], feed),
                    "ort_w": lambda: weights.logits(feed["input_ids"]),
                    "ort_mvm": lambda: mvm.logits(feed["input_ids"]),
                },
                repeats,
            )
        )
        with apply_chip_noise(model, tensors, chip, 1000):
            row["torch_mvm"] = median_ms(lambda: model(input_ids=ids, use_cache=False), repeats)
    row["program"] = program_ms
    row["program_mvm"] = program_mvm_ms
    return row


def to_markdown(rows: list[dict], seq: int) -> str:
    """The results table (ms per forward, batch 1 × seq)."""
    keys = ["torch", "ort", "ort_w", "ort_mvm", "torch_mvm", "program", "program_mvm"]
    lines = [
        f"Per-forward time in ms (batch 1 × {seq} tokens, 1 thread, median; forwards interleaved); chipA.",
        "",
        "| model | " + " | ".join(keys) + " | ort_w/ort | ort_mvm/ort | torch/ort | export s |",
        "|---" * (len(keys) + 5) + "|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[k]:.1f}" for k in keys)
        lines.append(
            f"| {r['model']} | {cells} | {r['ort_w'] / r['ort']:.2f} | {r['ort_mvm'] / r['ort']:.2f} | "
            f"{r['torch'] / r['ort']:.2f} | {r['export_s']} |"
        )
    lines += [
        "",
        "ort_w: programmed weights through IO binding (target ≤ 1.3× ort). ort_mvm adds the per-MVM bodies",
        "(DAC → matmul → out_noise → ADC on weights prepared once per draw); its extra time is mostly",
        "onnxruntime's RandomNormalLike (one normal per output per MVM).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the benchmark and write benchmarks/results/ort_validate.{json,md}."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--models", nargs="*", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [
        bench_model(m, args.seq, args.repeats) for m in args.models if (ROOT / "examples/models" / m).is_dir()
    ]
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "ort_validate.json").write_text(json.dumps({"seq": args.seq, "rows": rows}, indent=2) + "\n")
    table = to_markdown(rows, args.seq)
    (out / "ort_validate.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
