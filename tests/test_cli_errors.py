"""Bad input through the real CLI entry point: one line on stderr, exit code 2, no output folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from reliability_helpers import RunCli
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def olmoe_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OLMoE checkpoint saved once for the module."""
    _, folder = save_tiny("olmoe", tmp_path_factory.mktemp("src") / "olmoe")
    return folder


def _weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def _corrupt_header(folder: Path) -> None:
    path = _weights(folder)
    data = bytearray(path.read_bytes())
    data[8:20] = b"not json!!!!"
    path.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    path = _weights(folder)
    path.write_bytes(path.read_bytes()[:-1000])


def _nan_weight(folder: Path) -> None:
    path = _weights(folder)
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, path)


def _unknown_type(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "not_a_model"
    (folder / "config.json").write_text(json.dumps(cfg))


def _remote_code_type(folder: Path) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "internlm2"
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    (folder / "config.json").write_text(json.dumps(cfg))


def _no_config(folder: Path) -> None:
    (folder / "config.json").unlink()


@pytest.mark.parametrize(
    ("damage", "needle"),
    [
        (_corrupt_header, "header"),
        (_truncate, "truncated"),
        (_nan_weight, "NaN"),
        (_unknown_type, "not_a_model"),
        (_remote_code_type, "own Python code (auto_map), which cimconvert never runs"),
        (_no_config, "config.json"),
    ],
)
def test_bad_checkpoints(run_cli: RunCli, tmp_path: Path, olmoe_src: Path,
                         damage: Callable[[Path], None], needle: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(olmoe_src, folder)
    damage(folder)
    out = tmp_path / "out"
    code, _, err = run_cli(str(folder), "--profile", "chipA", "-o", str(out), "--no-onnx",
                           "--method", "none")
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle.lower() in errors[0].lower()
    assert "Traceback" not in err
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_remote_code_is_not_an_option(run_cli: RunCli, tmp_path: Path,
                                      olmoe_src: Path) -> None:
    code, _, err = run_cli(str(olmoe_src), "--profile", "chipA", "-o", str(tmp_path / "o"),
                           "--trust-remote-code")
    assert code == 2 and "No such option '--trust-remote-code'" in err
    assert not (tmp_path / "o").exists()


def test_unknown_profile_and_nonempty_out(run_cli: RunCli, tmp_path: Path,
                                          olmoe_src: Path) -> None:
    code, _, err = run_cli(str(olmoe_src), "--profile", "chipZ", "-o", str(tmp_path / "o"))
    assert code == 2 and "unknown profile 'chipZ'" in err
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, _, err = run_cli(str(olmoe_src), "--profile", "chipA", "-o", str(out), "--no-onnx")
    assert code == 2 and "--force" in err
    assert (out / "keep.txt").read_text() == "user data"


def test_dry_run_writes_nothing(run_cli: RunCli, tmp_path: Path, olmoe_src: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(str(olmoe_src), "--profile", "chipA", "--dry-run", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["dry_run"] is True
    assert res["totals"]["analog_tensors"] > 0
    assert {t["unit"] for t in res["tensors"]} == {"analog", "digital"}
    assert list(tmp_path.iterdir()) == []
