"""Helpers shared by several test files: the repository path, a micro llama, manifest edits, snapshots,
CLI runs in a child process (and the type of the in-process ``run_cli`` fixture of conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cimconvert.arch.loading import build_model
from cimconvert.bundle.integrity import write_manifest_and_lock

REPO = Path(__file__).resolve().parent.parent
DEMO_MODELS = REPO / "examples" / "models"
DEMO_OLMOE = DEMO_MODELS / "tiny-olmoe"

#: The ``run_cli`` fixture: ``run_cli(*args)`` → (exit code, stdout, stderr) of the CLI run in-process.
RunCli = Callable[..., tuple[int, str, str]]

#: The smallest llama the placement still splits into analog and digital tensors (a few kB of weights).
MICRO_LLAMA: dict[str, Any] = {
    "model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
    "max_position_embeddings": 16, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False,
}  # fmt: skip


def save_micro_llama(folder: Path, seed: int = 0) -> Path:
    """Write the micro llama checkpoint (safetensors + config) into ``folder``."""
    build_model(dict(MICRO_LLAMA), seed=seed).save_pretrained(folder)
    return folder


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], None], relock: bool = True) -> None:
    """Apply ``change`` to manifest.json's data; with ``relock`` also rewrite bundle.lock to match (an
    editor who knows the format but not a signing key)."""
    data = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    change(data)
    text = json.dumps(data, indent=2) + "\n"
    if relock:
        write_manifest_and_lock(bundle, text, key=os.environ.get("CIMCONVERT_TEST_RELOCK_KEY"))
    else:
        (bundle / "manifest.json").write_text(text, encoding="utf-8")


def snapshot(root: Path) -> set[str]:
    """Every path under ``root`` (relative, hidden ones included)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a child cimconvert: the repository on the path, one torch thread, offline."""
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1", **(extra or {})}  # fmt: skip


def run_cli_subprocess(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> tuple[int, str, str]:
    """Run ``python -m cimconvert ARGS`` to completion; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "cimconvert", *args], env=subprocess_env(env), cwd=REPO,
                          capture_output=True, text=True, timeout=300, **kwargs)
    return proc.returncode, proc.stdout, proc.stderr
