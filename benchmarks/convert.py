"""Data-free conversion benchmark: speed vs a plain ``cp`` and peak memory vs model size.

One run measures
(a) conversion time (resolve + placement + ``write_bundle``, in-process, imports excluded — about 2.5 s
    of one-time transformers imports on this machine) of a synthetic
    bf16 Llama-style checkpoint of a few hundred MB in several shards, against ``cp -r`` of the same
    folder on the same disk — median of 3, interleaved (cp, convert, cp, convert, ...). Target <= 1.5x.
(b) peak RSS of the conversion (in a fresh subprocess, ``VmHWM``) for synthetic checkpoints of N and 8N
    layers with the same shard size. Target: 8N peak <= 1.3x the N peak. The RSS right after the
    imports is reported too, so the part that the conversion itself adds is visible.

Results go to benchmarks/results/convert.json and .md.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert.py            # full run
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/convert.py --quick    # smaller, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"

CHILD = r"""
import json, sys, time
from pathlib import Path

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

from cimconvert.arch import get_adapter
from cimconvert.bundle import write_bundle
from cimconvert.checkpoint import resolve_model
from cimconvert.placement import plan_tensors
from cimconvert.profiles import load_profile

# warm the lazy imports (model class, conversion mapping) so the timing covers the conversion itself
from cimconvert.arch import load_config, load_model_class
from transformers.core_model_loading import revert_weight_conversion
load_model_class(load_config(sys.argv[1]))
base = rss("VmRSS")
start = time.perf_counter()
chip = load_profile("chipA")
source = resolve_model(sys.argv[1])
placement = plan_tensors(source.tensor_shapes(), get_adapter(source.model_type), chip)
write_bundle(source, sys.argv[2], chip, placement, force=True, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "base_rss": base, "peak_rss": rss("VmHWM")}))
"""


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, Any]:
    """A Llama config dict (bf16) of the given size."""
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64), "num_key_value_heads": max(1, hidden // 64),
        "max_position_embeddings": 2048, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip


def write_synthetic(folder: Path, config: dict[str, Any], shard_bytes: int, seed: int = 0) -> int:
    """Write a random bf16 checkpoint for ``config`` in shards of about ``shard_bytes`` (+ index).

    Shapes come from the model built on the meta device; tensors are generated one shard at a time.
    Returns the total tensor bytes.
    """
    from safetensors.torch import save_file

    from cimconvert.arch import build_model, load_config

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in build_model(load_config(config)).state_dict().items()}
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    gen = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for k, names in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=gen) * 0.02).to(torch.bfloat16) for n in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        total += sum(t.numel() * 2 for t in tensors.values())
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def run_child(src: Path, out: Path) -> dict[str, Any]:
    """Convert ``src`` into ``out`` in a fresh interpreter; its timing and RSS figures."""
    proc = subprocess.run([sys.executable, "-c", CHILD, str(src), str(out)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def time_cp(src: Path, dst: Path) -> float:
    """Wall time of ``cp -r src dst``."""
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return time.perf_counter() - start


def time_verified_cp(src: Path, dst: Path) -> float:
    """Wall time of ``cp -r`` plus ``sha256sum`` of the input and the output files (a checked copy)."""
    shutil.rmtree(dst, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    files = [str(p) for folder in (src, dst) for p in sorted(folder.iterdir())]
    subprocess.run(["sha256sum", *files], check=True, capture_output=True)
    return time.perf_counter() - start


def bench_speed(work: Path, config: dict[str, Any], shard_bytes: int, repeats: int) -> dict[str, Any]:
    """(a): conversion vs cp, interleaved, median of ``repeats``."""
    src = work / "speed-src"
    total = write_synthetic(src, config, shard_bytes)
    time_cp(src, work / "warm")  # warm the page cache for both contenders
    cps, checked, converts = [], [], []
    for _ in range(repeats):
        cps.append(time_cp(src, work / "cp-out"))
        shutil.rmtree(work / "cp-out")
        checked.append(time_verified_cp(src, work / "cp-out"))
        shutil.rmtree(work / "cp-out")
        shutil.rmtree(work / "bundle", ignore_errors=True)
        converts.append(run_child(src, work / "bundle")["seconds"])
    shards = len(list(src.glob("*.safetensors")))
    cp_med, conv_med = statistics.median(cps), statistics.median(converts)
    return {
        "checkpoint_bytes": total, "shards": shards, "layers": config["num_hidden_layers"],
        "cp_s": cps, "convert_s": converts, "cp_median_s": cp_med, "convert_median_s": conv_med,
        "checked_cp_s": checked, "checked_cp_median_s": statistics.median(checked),
        "ratio": conv_med / cp_med, "ratio_vs_checked_cp": conv_med / statistics.median(checked),
        "target_ratio": 1.5, "pass": conv_med / cp_med <= 1.5,
    }  # fmt: skip


def bench_memory(work: Path, n: int, factor: int, hidden: int, shard_bytes: int) -> dict[str, Any]:
    """(b): peak RSS converting N and factor·N layers with the same shard size."""
    rows = {}
    for layers in (n, factor * n):
        src = work / f"mem-{layers}"
        total = write_synthetic(src, llama_config(layers, hidden, hidden * 11 // 4, 8000), shard_bytes)
        res = run_child(src, work / f"mem-out-{layers}")
        rows[str(layers)] = {
            "checkpoint_bytes": total, "shards": len(list(src.glob("*.safetensors"))),
            "peak_rss": res["peak_rss"], "base_rss": res["base_rss"],
            "added_rss": res["peak_rss"] - res["base_rss"], "seconds": res["seconds"],
        }  # fmt: skip
        shutil.rmtree(work / f"mem-out-{layers}")
        shutil.rmtree(src)
    small, big = rows[str(n)], rows[str(factor * n)]
    ratio = big["peak_rss"] / small["peak_rss"]
    return {
        "runs": rows, "ratio": ratio, "target_ratio": 1.3, "pass": ratio <= 1.3, "shard_bytes": shard_bytes,
    }  # fmt: skip


def write_results(result: dict[str, Any]) -> None:
    """benchmarks/results/convert.json and .md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convert.json").write_text(json.dumps(result, indent=2) + "\n")
    s, m = result["speed"], result["memory"]
    mb = 1e6
    lines = [
        "# Conversion benchmark (`benchmarks/convert.py`)",
        "",
        f"Machine: {result['machine']}. Synthetic bf16 Llama-style checkpoints, profile chipA.",
        "",
        "## (a) Data-free conversion vs `cp -r` (same disk, page cache warm, median of "
        f"{len(s['cp_s'])}, interleaved)",
        "",
        "| checkpoint | shards | cp | cp + sha256sum in/out | convert | convert/cp | convert/checked cp |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| {s['checkpoint_bytes'] / mb:.0f} MB, {s['layers']} layers | {s['shards']} | "
        f"{s['cp_median_s']:.2f} s | {s['checked_cp_median_s']:.2f} s | {s['convert_median_s']:.2f} s | "
        f"{s['ratio']:.2f}x | {s['ratio_vs_checked_cp']:.2f}x |",
        "",
        f"Target convert / cp <= 1.5x: {'pass' if s['pass'] else 'FAIL'}. Load average during the run: "
        f"{result['load_avg']}.",
        "",
        "Convert = resolve (headers, meta-model shape check) + placement + write_bundle (read once, NaN/Inf",
        "check, abs-max scales, sha256 of every input file, tensor and output file), excluding imports.",
        "",
        f"## (b) Peak RSS, N vs {m['factor']}N layers (shards of {m['shard_bytes'] / mb:.0f} MB)",
        "",
        "| layers | checkpoint | shards | RSS after imports | peak RSS | added by conversion |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for layers, r in m["runs"].items():
        lines.append(
            f"| {layers} | {r['checkpoint_bytes'] / mb:.0f} MB | {r['shards']} | "
            f"{r['base_rss'] / mb:.0f} MB | {r['peak_rss'] / mb:.0f} MB | {r['added_rss'] / mb:.0f} MB |"
        )
    lines += ["", f"Peak ratio {m['ratio']:.2f}x (target <= 1.3x: {'pass' if m['pass'] else 'FAIL'}).", ""]
    (RESULTS / "convert.md").write_text("\n".join(lines))


def main() -> None:
    """Run both benchmarks and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    hidden, layers = (256, 4) if args.quick else (1024, 10)
    shard = (8 if args.quick else 100) * 1000**2
    work = Path(tempfile.mkdtemp(prefix="cimconvert-bench-", dir=args.workdir))
    try:
        speed = bench_speed(work, llama_config(layers, hidden, hidden * 11 // 4, 32000), shard, args.repeats)
        memory = bench_memory(work, 2, 8, 256 if args.quick else 512, (4 if args.quick else 20) * 1000**2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import os
    import platform

    memory["factor"] = 8
    result = {
        "load_avg": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "speed": speed,
        "memory": memory,
    }
    write_results(result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
