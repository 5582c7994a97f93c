"""Fingerprint the bundles of every demo model, to prove a refactor changes no byte.

Converts each model under ``examples/models`` with ``--method auto`` and ``--method none`` for
chipA, and writes one sha256 per bundle file. What may differ between two runs of the same code is
neutralised first:

* ISO timestamps (the conversion time, in the manifest, REPORT.md and the ONNX metadata) are blanked;
* safetensors headers are hashed with sorted keys (the writer sorts them since bundles became
  reproducible; older bundles had safetensors' arbitrary metadata order);
* ``bundle.lock`` (a digest of the manifest's exact bytes) is skipped;
* durations (``seconds``, ROMER's ``cost_vs_one_noisy_pass``) and the manifest's digests and byte
  counts (of files hashed here on their own) are blanked;
* the ONNX file is hashed re-serialised with its metadata's path and time blanked;
* the checkout's own path (the manifest and the ONNX metadata record the source model's path) becomes
  ``<repo>``, so two worktrees compare; conversions run on one thread.

    .venv/bin/python scripts/bundle_digests.py -o before.json
    ... refactor ...
    .venv/bin/python scripts/bundle_digests.py -o after.json --compare before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

from cimconvert.bundle.writer import canonical_safetensors_header

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "examples" / "models"
METHODS = ("auto", "none")
PROFILE = "chipA"
#: Lines carrying the conversion time, blanked in text files before hashing.
TIME_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")
TIME_BYTES = re.compile(TIME_PATTERN.pattern.encode())
#: REPORT.md's line with ROMER's measured cost (a ratio of wall-clock times).
COST_LINE = re.compile(rb"cost_vs_one_noisy_pass: [0-9.]+")
#: JSON keys whose values are wall-clock measurements, or digests of files hashed on their own
#: (the ONNX file and the scales file differ only by their timestamp and header order).
VOLATILE_KEYS = {"created", "seconds", "cost_vs_one_noisy_pass", "sha256", "bytes"}
SKIPPED = {"bundle.lock"}


def blank_volatile(value: object) -> object:
    """JSON value with wall-clock fields (and digests of files hashed on their own) blanked."""
    if isinstance(value, dict):
        return {k: "<volatile>" if k in VOLATILE_KEYS else blank_volatile(v) for k, v in value.items()}
    if isinstance(value, list):
        return [blank_volatile(v) for v in value]
    return value


def canonical_onnx(data: bytes) -> bytes:
    """The ONNX model re-serialised with the checkout path and times blanked in its metadata."""
    model = onnx.load_from_string(data)
    for prop in model.metadata_props:
        prop.value = TIME_PATTERN.sub("<time>", prop.value.replace(str(REPO), "<repo>"))
    return model.SerializeToString(deterministic=True)


def file_digest(path: Path) -> str:
    """sha256 of ``path``: ISO timestamps and timings blanked, safetensors headers in canonical order."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        data = canonical_safetensors_header(data)  # bundles written before it was canonical
    if path.suffix == ".onnx":
        data = canonical_onnx(data)
    if path.suffix == ".json":
        data = json.dumps(blank_volatile(json.loads(data)), sort_keys=True).encode()
    data = data.replace(str(REPO).encode(), b"<repo>")
    data = COST_LINE.sub(b"<cost>", TIME_BYTES.sub(b"<time>", data))
    return hashlib.sha256(data).hexdigest()


def bundle_digests(bundle: Path) -> dict[str, str]:
    """Relative path → digest for every file of ``bundle`` (sorted)."""
    return {
        str(p.relative_to(bundle)): file_digest(p)
        for p in sorted(bundle.rglob("*"))
        if p.is_file() and p.name not in SKIPPED
    }


def convert(model: Path, method: str, out: Path) -> None:
    """Run the CLI converter (exits on failure with its stderr)."""
    cmd = [sys.executable, "-m", "cimconvert", str(model), "--profile", PROFILE]
    cmd += ["--method", method, "-o", str(out)]
    # One thread: measured figures recorded by the methods (HPD's scan) depend on reduction order.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"{model.name} {method}: {done.stderr.strip().splitlines()[-1]}")


def main() -> None:
    """Convert every demo model, write the digests, optionally compare with an earlier file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, required=True)
    parser.add_argument("--compare", type=Path)
    parser.add_argument("--models", nargs="*", help="only these demo models (folder names)")
    parser.add_argument("--keep", type=Path, help="write the bundles here instead of a temp folder")
    args = parser.parse_args()
    result: dict[str, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = args.keep or Path(tmp_dir)
        for model in sorted(p for p in MODELS.iterdir() if (p / "config.json").exists()):
            if args.models and model.name not in args.models:
                continue
            for method in METHODS:
                out = Path(tmp) / f"{model.name}-{method}"
                convert(model, method, out)
                result[f"{model.name}/{method}"] = bundle_digests(out)
                print(f"{model.name} {method}: {len(result[f'{model.name}/{method}'])} files", flush=True)
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    if args.compare:
        before = json.loads(args.compare.read_text())
        before = {k: v for k, v in before.items() if k in result}
        diffs = [
            f"{bundle}/{name}"
            for bundle in sorted(set(before) | set(result))
            for name in sorted(set(before.get(bundle, {})) | set(result.get(bundle, {})))
            if before.get(bundle, {}).get(name) != result.get(bundle, {}).get(name)
        ]
        print("identical" if not diffs else "differ:\n  " + "\n  ".join(diffs))
        sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    main()
