"""Monte-Carlo over a ``torchrun`` launch (2 CPU processes, gloo): the same numbers and JSON as one
process, disagreeing ranks stop with one line (exit 2) and write nothing, writers refuse a launch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import DEMO_OLMOE, REPO, run_cli_subprocess, subprocess_env

from cimconvert import api
from cimconvert.distributed import _raise_failures, fingerprint, spread
from cimconvert.errors import CimError
from cimconvert.finetune import finetune

EVAL = ["-p", "chipA", "--seeds", "3", "--max-tokens", "256", "--seq-len", "64", "--threads", "1", "--json"]
ANALYZE = ["-p", "chipA", "--seeds", "2", "--max-tokens", "128", "--seq-len", "64", "--granularity", "block",
           "--threads", "1", "--json"]  # fmt: skip


def torchrun(*args: str, nproc: int = 2) -> tuple[int, str, str]:
    """``torchrun --standalone --nproc_per_node N -m cimconvert ARGS``; (exit code, stdout, stderr)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "cimconvert", *args]  # fmt: skip
    proc = subprocess.run(command, env=subprocess_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    return proc.returncode, proc.stdout, proc.stderr


def ranks_by_hand(args_of_rank: list[list[str]], port: int) -> list[tuple[int, str, str]]:
    """Start one ``python -m cimconvert`` per rank with the environment torchrun would set, each with its
    own arguments (what torchrun cannot do: ranks that disagree)."""
    procs = []
    for rank, args in enumerate(args_of_rank):
        env = subprocess_env({"RANK": str(rank), "LOCAL_RANK": str(rank),
                              "WORLD_SIZE": str(len(args_of_rank)), "MASTER_ADDR": "127.0.0.1",
                              "MASTER_PORT": str(port)})  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-m", "cimconvert", *args], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        results.append((proc.returncode, out, err))
    return results


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_spread_without_a_launch_is_a_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    calls: list[int] = []

    def run(task: int) -> int:
        calls.append(task)
        return task * task

    def agree() -> str:
        raise AssertionError("no digest is computed without a launch")

    assert spread([3, 1, 2], run, device=None, agree=agree) == [9, 1, 4]  # type: ignore[arg-type]
    assert calls == [3, 1, 2]


def test_a_failed_rank_stops_every_rank() -> None:
    parts = [({0: 1.0}, None), ({}, "noisy perplexity is nan for seed 3")]
    with pytest.raises(CimError, match="torchrun rank 1 failed: noisy perplexity is nan for seed 3"):
        _raise_failures(parts, None)
    with pytest.raises(ValueError, match="own"):
        _raise_failures(parts, ValueError("own"))
    _raise_failures([({0: 1.0}, None), ({1: 2.0}, None)], None)


def test_fingerprint_sees_every_part() -> None:
    assert fingerprint("m", [1, 2]) == fingerprint("m", [1, 2])
    assert fingerprint("m", [1, 2]) != fingerprint("m", [1, 3])


def test_finetune_refuses_a_launch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CimError, match="finetune runs in one process: launch it without torchrun"):
        finetune(str(DEMO_OLMOE), "chipA", out=tmp_path / "f", steps=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_convert_writes_only_on_rank_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    res = api.convert(str(DEMO_OLMOE), "chipA", out=tmp_path / "b", method="none", progress=False)
    assert res["written"] is False
    assert list(tmp_path.iterdir()) == []


def _tensors_and_transforms(bundle: Path) -> tuple[dict[str, str], list[dict]]:
    """The sha256 of every safetensors file and the recorded transforms (ROMER's fitted routing)."""
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    digests = {f["name"]: f["sha256"] for f in manifest["files"] if f["name"].endswith(".safetensors")}
    return digests, manifest["transforms"]


@pytest.mark.slow
def test_torchrun_eval_matches_one_process() -> None:
    code, single, err = run_cli_subprocess("eval", str(DEMO_OLMOE), *EVAL)
    assert code == 0, err
    code, launched, err = torchrun("eval", str(DEMO_OLMOE), *EVAL)
    assert code == 0, err
    assert launched == single  # the same JSON, printed once (rank 0)
    assert len(json.loads(launched)["per_seed"]) == 3


@pytest.mark.slow
def test_torchrun_analyze_matches_one_process(tmp_path: Path) -> None:
    code, single, err = run_cli_subprocess("analyze", str(DEMO_OLMOE), *ANALYZE, "-o", str(tmp_path / "one"))
    assert code == 0, err
    code, launched, err = torchrun("analyze", str(DEMO_OLMOE), *ANALYZE, "-o", str(tmp_path / "two"))
    assert code == 0, err
    one, two = json.loads(single), json.loads(launched)
    for scan in (one, two):
        scan.pop("seconds"), scan.pop("files")
    assert one == two
    written = json.loads((tmp_path / "two" / "sensitivity.json").read_text(encoding="utf-8"))
    assert written["rows"] == one["rows"] and written["all"] == one["all"]


@pytest.mark.slow
def test_torchrun_validate_matches_one_process(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    api.convert(str(DEMO_OLMOE), "chipA", out=bundle, method="none", progress=False)
    args = ["validate", str(bundle), "--seeds", "3", "--max-tokens", "256", "--seq-len", "64", "--json"]
    code, single, err = run_cli_subprocess(*args)
    assert code == 0, err
    code, launched, err = torchrun(*args)
    assert code == 0, err
    one, two = json.loads(single), json.loads(launched)
    for res in (one, two):  # timings differ from run to run; every figure of the comparison must not
        res["onnxruntime"].pop("seconds"), res["torch"].pop("seconds")
    assert one == two and two["summary"]["passed"]


@pytest.mark.slow
def test_torchrun_romer_calibration_matches_one_process(tmp_path: Path) -> None:
    """ROMER's cross-instance draws shared over 2 ranks: the same tensors and routing as one process."""
    args = ["-p", "chipA", "--method", "romer", "--calib-seeds", "2", "--calib-samples", "4",
            "--replace-bottom", "2", "--router-deadband", "0", "--no-onnx", "--json"]  # fmt: skip
    code, _, err = run_cli_subprocess(str(DEMO_OLMOE), *args, "-o", str(tmp_path / "one"))
    assert code == 0, err
    code, out, err = torchrun(str(DEMO_OLMOE), *args, "-o", str(tmp_path / "two"))
    assert code == 0, err
    assert json.loads(out)["transforms"]  # the calibration moved something (draws-dependent)
    one, two = _tensors_and_transforms(tmp_path / "one"), _tensors_and_transforms(tmp_path / "two")
    assert one[0] and one == two


@pytest.mark.slow
def test_ranks_that_disagree_exit_2_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "scan"
    args = [["analyze", str(DEMO_OLMOE), *ANALYZE, "-o", str(out), "--seed", str(1000 + r)] for r in range(2)]
    results = ranks_by_hand(args, _free_port())
    for code, stdout, stderr in results:
        assert code == 2 and stdout == ""
        lines = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert lines == ["error: torchrun ranks disagree on the model or seeds (rank 1 differs from rank 0): "
                         "launch every rank with the same model, arguments and data"]  # fmt: skip
    assert not out.exists()
