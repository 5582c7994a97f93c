"""Layer by layer on real weights: SmolLM2-135M-Instruct (and its MoE build) converted with the default
recipe (``--method auto``: outlier_channels then output_correction) once layer by layer and once whole,
then compared tensor by tensor (manifest sha256), transform by transform and report by report.

Each conversion runs in its own process under ``/usr/bin/time -v`` (peak RSS) with ``OMP_NUM_THREADS=1``;
the two modes of a model run one after the other. Results: benchmarks/results/layerwise_real.json and .md.

    CIMCONVERT_SHARED_DATA=... python benchmarks/layerwise_real.py [--models smollm2-135m-instruct ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from scale_layers import elapsed, peak_rss_gb  # the /usr/bin/time -v figures, parsed once

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODES = ("--layer-by-layer", "--whole-model")


def _convert(model: Path, out: Path, mode: str) -> dict[str, Any]:
    """One conversion: its JSON result, peak RSS (GB) and wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "cimconvert", "convert", str(model), "-p", "chipA",
           "--method", "auto", "--no-onnx", "--json", mode, "-o", str(out)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{model.name} {mode} failed: {done.stderr.strip().splitlines()[-3:]}")
    return {"result": json.loads(done.stdout), "peak_rss_gb": peak_rss_gb(done.stderr),
            "seconds": elapsed(done.stderr)}  # fmt: skip


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def compare(model: Path) -> dict[str, Any]:
    """Convert ``model`` both ways in a temporary folder and compare the bundles."""
    with tempfile.TemporaryDirectory(dir=ROOT / "models") as tmp:
        runs = {mode: _convert(model, Path(tmp) / mode.strip("-"), mode) for mode in MODES}
        manifests = {mode: _manifest(Path(tmp) / mode.strip("-")) for mode in MODES}
    lw, whole = (manifests[m] for m in MODES)
    digests = [{t["name"]: t["sha256"] for t in m["tensors"]} for m in (lw, whole)]
    same = sum(digests[0].get(name) == sha for name, sha in digests[1].items())
    reports = [runs[m]["result"]["method_report"] for m in MODES]
    return {
        "model": model.name,
        "method": runs[MODES[0]]["result"]["method"],
        "tensors": len(digests[1]),
        "tensors_bit_identical": same,
        "transforms_equal": lw["transforms"] == whole["transforms"],
        "reports_equal": reports[0] == reports[1],
        "layer_by_layer": {k: runs[MODES[0]][k] for k in ("peak_rss_gb", "seconds")},
        "whole_model": {k: runs[MODES[1]][k] for k in ("peak_rss_gb", "seconds")},
        "correction": {k: reports[0].get("2:output_correction", {}).get(k)
                       for k in ("calibration_ppl_clean", "calibration_ppl_noisy_before",
                                 "calibration_ppl_noisy_after")},
    }  # fmt: skip


def write(rows: list[dict[str, Any]]) -> None:
    """benchmarks/results/layerwise_real.json and .md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "layerwise_real.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    lines = ["# Layer by layer on real weights (convert --method auto, chipA)", "",
             "| model | recipe | tensors bit-identical | transforms / reports equal | layer by layer: RSS, "
             "time | whole model: RSS, time |", "|---|---|---:|---|---:|---:|"]  # fmt: skip
    for r in rows:
        lw, whole = r["layer_by_layer"], r["whole_model"]
        lines.append(f"| {r['model']} | {r['method']} | {r['tensors_bit_identical']} / {r['tensors']} | "
                     f"{r['transforms_equal']} / {r['reports_equal']} | {lw['peak_rss_gb']:.2f} GB, "
                     f"{lw['seconds']:.0f} s | {whole['peak_rss_gb']:.2f} GB, {whole['seconds']:.0f} s |")
    (RESULTS / "layerwise_real.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    """Command line: ``--models`` (folders under models/, from scripts/get_models.sh)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["smollm2-135m-instruct", "smollm2-135m-moe"])
    args = parser.parse_args()
    rows = []
    for name in args.models:
        model = ROOT / "models" / name
        if not model.is_dir():
            sys.exit(f"{model} not found: run scripts/get_models.sh first")
        rows.append(compare(model))
        write(rows)
        print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()
