"""Per-draw cost of onnxruntime validation under chip noise vs clean onnxruntime vs torch eager.

One run, demo models, one thread (``OMP_NUM_THREADS=1``), batch 1 × ``--seq`` tokens, median of
``--repeats`` forwards. Columns (ms):

* ``torch``: eager clean forward; ``ort``: clean session (constant weights);
* ``ort_w``: forward with programmed weights bound through IO binding (no per-MVM effects);
* ``ort_mvm``: forward with bound weights + the per-MVM body (DAC/ADC/out_noise, chipA);
* ``torch_mvm``: torch forward with noise.py's per-MVM hooks;
* ``program``: programming all analog tensors once (the torch simulator; same cost for both paths).

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

from cimconvert.checkpoint import resolve_model
from cimconvert.noise import apply_chip_noise
from cimconvert.onnx.export import build_onnx
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.runtime import OrtNoiseRunner, analog_tensors, make_session

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["tiny-olmoe", "tiny-qwen2-moe", "tiny-mamba"]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


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
    program_ms = median_ms(lambda: weights.program(1000), max(2, repeats // 3))
    mvm.program(1000)
    row: dict[str, float | str] = {"model": name, "export_s": round(export_s, 2)}
    with torch.no_grad():
        row["torch"] = median_ms(lambda: model(input_ids=ids, use_cache=False), repeats)
        row["ort"] = median_ms(lambda: clean.run(["logits"], feed), repeats)
        row["ort_w"] = median_ms(lambda: weights.logits(feed["input_ids"]), repeats)
        row["ort_mvm"] = median_ms(lambda: mvm.logits(feed["input_ids"]), repeats)
        with apply_chip_noise(model, tensors, chip, 1000):
            row["torch_mvm"] = median_ms(lambda: model(input_ids=ids, use_cache=False), repeats)
    row["program"] = program_ms
    return row


def to_markdown(rows: list[dict], seq: int) -> str:
    """The results table (ms per forward, batch 1 × seq)."""
    keys = ["torch", "ort", "ort_w", "ort_mvm", "torch_mvm", "program"]
    lines = [
        f"Per-forward time in ms (batch 1 × {seq} tokens, 1 thread, median); chipA.",
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
