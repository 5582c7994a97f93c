"""Layer-by-layer scale benchmark: peak RSS and time of ``convert --method romer`` and ``eval`` of
random-weight checkpoints with OLMoE-1B-7B's shapes (benchmarks/make_olmoe_shapes.py) at several depths.

Targets (issue #13): the 16-layer checkpoint (about 13.8 GB in bfloat16, 27.6 GB in float32) converts
with ROMER and evaluates with 2 noise draws under 6 GB of peak RSS each; RSS(16 layers)/RSS(2 layers)
<= 1.3 for both commands. Each command runs in a child process under ``/usr/bin/time -v`` (its maximum
resident set size) with ``OMP_NUM_THREADS=1``; with ``--parallel`` the convert and the eval of one depth
run side by side (two children: each RSS is its own, wall times overlap). Run the driver under
``nice -n 10``. Profiles: ``--profile full`` (benchmarks/olmoe_bench.yaml: every layer tensor analog)
or ``attn`` (the default, benchmarks/olmoe_bench_attn.yaml: experts digital, so a deep sweep fits in the
session's CPU time). ``--method auto`` converts with the default MoE recipe (outlier_channels then
output_correction) instead of ROMER; ``--commands`` picks convert and/or eval. Checkpoints and bundles are
written under ``models/`` (git-ignored) and deleted after each depth. Results go to
benchmarks/results/scale_layers.json and .md after every command (earlier rows of other depths,
profiles or methods kept).

    CIMCONVERT_SHARED_DATA=... python benchmarks/scale_layers.py [--layers 2 16 4 8] [--parallel]
        [--profile full|attn] [--method romer|auto] [--commands convert eval]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
#: Everything analog (attention and the 64 experts of each layer) / experts digital (attention analog).
PROFILES = {"full": "benchmarks/olmoe_bench.yaml", "attn": "benchmarks/olmoe_bench_attn.yaml"}
TARGET_GB, TARGET_RATIO = 6.0, 1.3
#: ``--method``: romer (the issue's target: ROMER's calibration) or auto (outlier_channels then
#: output_correction, the default MoE recipe; it changes weights, so the transformed layers are written
#: beside OUT first).
METHODS = {"romer": ["--method", "romer", "--calib-seeds", "1"], "auto": ["--method", "auto"]}
SETTINGS = {
    "profiles": PROFILES,
    "methods": METHODS,
    "convert": ["--calib-samples", "2", "--calib-seq-len", "128", "--no-onnx", "--layer-by-layer"],
    "eval": ["--seeds", "2", "--max-tokens", "256", "--seq-len", "128", "--layer-by-layer"],
}  # fmt: skip


def _command(kind: str, model: Path, out: Path, profile: str, method: str) -> list[str]:
    """The cimconvert command line of one measured run."""
    base = [sys.executable, "-m", "cimconvert", kind, str(model), "-p", PROFILES[profile], "--json"]
    if kind == "convert":
        return base + METHODS[method] + SETTINGS[kind] + ["-o", str(out), "--force"]
    return base + SETTINGS[kind]


def _start(kind: str, model: Path, out: Path, profile: str, log: Path,
           method: str = "romer") -> tuple[subprocess.Popen, float]:  # fmt: skip
    """Start one run under ``/usr/bin/time -v`` (output in ``log``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    handle = log.open("w")
    proc = subprocess.Popen(["/usr/bin/time", "-v", *_command(kind, model, out, profile, method)],
                            cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)  # fmt: skip
    return proc, time.perf_counter()


def peak_rss_gb(text: str) -> float | None:
    """The maximum resident set size ``/usr/bin/time -v`` reported, in GiB, if any."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return int(rss.group(1)) / 2**20 if rss else None


def elapsed(text: str) -> float | None:
    """The wall-clock seconds ``/usr/bin/time -v`` reported (``h:mm:ss`` or ``m:ss.ss``), if any."""
    match = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if match is None:
        return None
    seconds = 0.0
    for part in match.group(1).split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def _finish(kind: str, proc: subprocess.Popen, started: float, log: Path) -> dict[str, Any]:
    """Wait for a run; its peak RSS, wall time, exit code and the JSON it printed (key figures only)."""
    code = proc.wait()
    text = log.read_text(errors="replace")
    seconds = elapsed(text) or time.perf_counter() - started
    rss = peak_rss_gb(text)
    row: dict[str, Any] = {"command": kind, "exit_code": code, "seconds": round(seconds, 1),
                           "peak_rss_gb": round(rss, 3) if rss is not None else None}  # fmt: skip
    start, end = text.find("{"), text.rfind("}")
    try:
        result = json.loads(text[start : end + 1])
    except ValueError:
        row["error"] = text.strip().splitlines()[-1][:300] if text.strip() else "no output"
        return row
    row["layer_by_layer"] = result.get("layer_by_layer")
    if kind == "eval":
        row.update(clean_ppl=result["clean_ppl"], noisy_ppl=result["per_seed"], tokens=result["tokens"])
    else:
        report = next(iter(result["method_report"].values()), {})
        row.update(transforms=result["transforms"], romer_seconds=report.get("seconds"),
                   method=result["method"])  # fmt: skip
    return row


def measure_depth(layers: int, profile: str, parallel: bool, keep: bool, method: str = "romer",
                  commands: tuple[str, ...] = ("convert", "eval")) -> list[dict[str, Any]]:  # fmt: skip
    """Generate the checkpoint with ``layers`` layers, run ``commands``, delete what was written."""
    model = ROOT / "models" / f"olmoe-shapes-L{layers}"
    out = ROOT / "models" / f"olmoe-shapes-L{layers}-bundle"
    generated = subprocess.run(
        [sys.executable, "benchmarks/make_olmoe_shapes.py", "--out", str(model), "--layers", str(layers)],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    made = json.loads(generated.stdout.strip().splitlines()[-1])
    logs = {kind: ROOT / "models" / f"scale-{profile}-L{layers}-{kind}.log" for kind in commands}
    rows = []
    try:
        if parallel:
            running = {kind: _start(kind, model, out, profile, logs[kind], method) for kind in commands}
            rows = [_finish(kind, *running[kind], logs[kind]) for kind in commands]
        else:
            for kind in commands:
                rows.append(_finish(kind, *_start(kind, model, out, profile, logs[kind], method), logs[kind]))
    finally:
        if not keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    for row in rows:
        row.update(layers=layers, profile=profile, checkpoint_gb=round(made["bytes"] / 1e9, 2),
                   parallel=parallel)  # fmt: skip
    return rows


def _method(row: dict[str, Any]) -> str:
    """The convert method of a row (``romer`` for rows written before the option existed; ``-`` for eval)."""
    return "-" if row["command"] == "eval" else row.get("method", "romer")


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per profile and command: peak RSS by depth, the 6 GB target at the deepest run, RSS(deepest)/RSS(2)."""
    out: dict[str, Any] = {}
    for profile in PROFILES:
        for kind in ("convert", "eval"):
            done = [r for r in rows if (r["profile"], r["command"]) == (profile, kind)]
            done = [r for r in done if r.get("peak_rss_gb") and _method(r) in ("romer", "-")]
            if not done:
                continue
            done.sort(key=lambda r: r["layers"])
            deep, shallow = done[-1], done[0]
            out[f"{profile}/{kind}"] = {
                "layers": [r["layers"] for r in done],
                "peak_rss_gb": [r["peak_rss_gb"] for r in done],
                "seconds": [r["seconds"] for r in done],
                "deepest_meets_6gb": deep["peak_rss_gb"] <= TARGET_GB and deep["exit_code"] == 0,
                "rss_ratio_deepest_to_shallowest": round(deep["peak_rss_gb"] / shallow["peak_rss_gb"], 3),
            }
    return out


def merged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus the runs of earlier invocations in the results file that ``rows`` does not repeat."""
    path = RESULTS / "scale_layers.json"
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    key = lambda r: (r.get("profile"), r["layers"], r["command"], _method(r))  # noqa: E731
    new = {key(r) for r in rows}
    return [r for r in old if key(r) not in new] + rows


def write_results(rows: list[dict[str, Any]]) -> None:
    """benchmarks/results/scale_layers.json and .md (earlier runs of other depths/profiles kept)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows = merged(rows)
    data = {"settings": SETTINGS, "runs": rows, "summary": summarise(rows),
            "machine": "2 CPU cores (other jobs on the second core), 24 GB RAM; OMP_NUM_THREADS=1"}
    (RESULTS / "scale_layers.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Layer-by-layer scale benchmark (OLMoE-1B-7B shapes, random weights)", "",
             f"Profiles {PROFILES}; convert `{' '.join(SETTINGS['convert'])}`;",
             f"eval `{' '.join(SETTINGS['eval'])}`.",
             "", "| profile | layers | checkpoint GB | command | method | peak RSS GB | seconds | exit | "
             "parallel |", "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['profile']} | {r['layers']} | {r['checkpoint_gb']} | {r['command']} | "
                     f"{_method(r)} | {r['peak_rss_gb']} | {r['seconds']} | {r['exit_code']} | "
                     f"{r['parallel']} |")  # fmt: skip
    lines += ["", "```json", json.dumps(data["summary"], indent=2), "```", ""]
    (RESULTS / "scale_layers.md").write_text("\n".join(lines))


def main() -> None:
    """Command line: ``--layers`` (order of the depths measured), ``--parallel``, ``--keep``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 16, 4, 8])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="attn")
    parser.add_argument("--parallel", action="store_true", help="convert and eval of a depth side by side")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and bundles")
    parser.add_argument("--method", choices=sorted(METHODS), default="romer", help="convert's method")
    parser.add_argument("--commands", nargs="+", choices=["convert", "eval"], default=["convert", "eval"])
    args = parser.parse_args()
    if not os.environ.get("CIMCONVERT_SHARED_DATA"):
        sys.exit("set CIMCONVERT_SHARED_DATA (the OLMoE tokenizer)")
    rows: list[dict[str, Any]] = []
    for layers in args.layers:
        rows += measure_depth(layers, args.profile, args.parallel, args.keep, args.method,
                              tuple(args.commands))  # fmt: skip
        write_results(rows)
        print(json.dumps(rows[-2:]), flush=True)


if __name__ == "__main__":
    main()
