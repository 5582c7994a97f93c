"""``--device`` / ``--dtype``: resolution, one-line errors for devices that are not there, and the
half-precision paths on the CPU (the GPU run is ``benchmarks/gpu_check.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reliability_helpers import DEMO_OLMOE, RunCli, save_micro_llama

from cimconvert import api
from cimconvert.devices import model_device, place_model, resolve_device, resolve_dtype, to_model_device
from cimconvert.errors import CimError
from cimconvert.finetune import finetune
from cimconvert.simulator.rng import PROGRAMMING_DEVICE, counter_normal, tensor_generator
from cimconvert.validate import validate

SMALL = {"seeds": 2, "max_tokens": 256, "seq_len": 64, "progress": False}


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine without a visible GPU (also on a GPU machine)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A machine that reports two GPUs (only their count and presence are asked)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_cpu_and_default_resolve_to_the_cpu() -> None:
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


def test_auto_is_the_cpu_without_a_gpu(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")


def test_auto_and_cuda_take_this_ranks_gpu(two_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_cuda_without_a_gpu_is_one_line(no_gpu: None) -> None:
    with pytest.raises(CimError, match=r"--device cuda: .*use --device cpu or auto") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)


def test_a_gpu_index_that_does_not_exist(two_gpus: None) -> None:
    expected = r"--device cuda:7: no such GPU \(this machine has 2: cuda:0\.\.cuda:1\)"
    with pytest.raises(CimError, match=expected):
        resolve_device("cuda:7")


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cuda:-1", "gpu"])
def test_unknown_devices_are_refused(spec: str) -> None:
    with pytest.raises(CimError, match=f"--device {spec}: expected one of cpu, cuda, cuda:N, auto"):
        resolve_device(spec)


def test_dtypes_resolve_and_unknown_ones_are_refused() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype(None, cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(CimError, match="--dtype float64: expected one of float32, bfloat16, float16"):
        resolve_dtype("float64", cpu)


def test_bfloat16_on_a_gpu_without_it_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Old GPU")
    with pytest.raises(CimError, match=r"--dtype bfloat16: Old GPU \(cuda:0\) has no bfloat16 support"):
        resolve_dtype("bfloat16", torch.device("cuda", 0))


def test_place_model_moves_and_casts_only_what_is_asked() -> None:
    net = torch.nn.Linear(3, 2)
    assert place_model(net, None, None).weight.dtype == torch.float32
    place_model(net, torch.device("cpu"), torch.bfloat16)
    assert net.weight.dtype == torch.bfloat16
    assert model_device(net) == torch.device("cpu")
    assert model_device(object()) == torch.device("cpu")  # e.g. the onnxruntime adapter: no parameters
    assert to_model_device(torch.ones(2), net).device == torch.device("cpu")


def test_programming_draws_are_made_on_the_cpu() -> None:
    """Same seed, same draws on every device: the generator is the CPU's, whatever the weights' device."""
    assert PROGRAMMING_DEVICE.type == "cpu"
    assert tensor_generator(3, "w").device == torch.device("cpu")
    a = torch.randn(5, generator=tensor_generator(3, "w"))
    assert torch.equal(a, torch.randn(5, generator=tensor_generator(3, "w", "cpu")))
    key = (1, 2, 3)
    assert torch.equal(counter_normal((4, 3), key), counter_normal((4, 3), key, torch.device("cpu")))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_eval_in_half_precision_on_the_cpu(dtype: str) -> None:
    ref = api.evaluate(str(DEMO_OLMOE), "chipA", **SMALL)
    res = api.evaluate(str(DEMO_OLMOE), "chipA", dtype=dtype, device="cpu", **SMALL)
    assert (ref["device"], ref["dtype"]) == ("cpu", "float32")
    assert (res["device"], res["dtype"]) == ("cpu", dtype)
    assert res["clean_ppl"] == pytest.approx(ref["clean_ppl"], rel=0.05)
    assert res["clean_ppl"] != ref["clean_ppl"]  # it did run in the other dtype
    assert res["noisy_ppl_mean"] == pytest.approx(ref["noisy_ppl_mean"], rel=0.05)


@pytest.mark.parametrize("device", ["cuda", "cuda:7"])
def test_cli_eval_on_a_missing_gpu_exits_2(device: str, no_gpu: None, run_cli: RunCli) -> None:
    code, out, err = run_cli("eval", str(DEMO_OLMOE), "-p", "chipA", "--device", device, "--json")
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and err.startswith(f"error: --device {device}: ")


def test_cli_convert_on_a_missing_gpu_writes_nothing(no_gpu: None, run_cli: RunCli, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    code, _, err = run_cli(str(DEMO_OLMOE), "-p", "chipA", "-o", str(out), "--device", "cuda", "--no-onnx")
    assert code == 2 and err.startswith("error: --device cuda: ")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_analyze_and_finetune_take_device_options(no_gpu: None, run_cli: RunCli, tmp_path: Path) -> None:
    code, _, err = run_cli("analyze", str(DEMO_OLMOE), "-p", "chipA", "-o", str(tmp_path / "a"),
                           "--device", "cuda:1")  # fmt: skip
    assert code == 2 and err.startswith("error: --device cuda:1: ")
    code, _, err = run_cli("finetune", str(DEMO_OLMOE), "-p", "chipA", "-o", str(tmp_path / "f"),
                           "--device", "cuda", "--steps", "1")  # fmt: skip
    assert code == 2 and err.startswith("error: --device cuda: ")
    assert list(tmp_path.iterdir()) == []


def test_validate_refuses_a_dtype_other_than_float32(tmp_path: Path) -> None:
    with pytest.raises(CimError, match=r"--dtype bfloat16: validate compares .* only --dtype float32"):
        validate(tmp_path / "missing", dtype="bfloat16")


def test_finetune_in_bfloat16_writes_a_bfloat16_checkpoint(tmp_path: Path) -> None:
    model = save_micro_llama(tmp_path / "micro")
    tokens = torch.randint(3, 16, (400,), generator=torch.Generator().manual_seed(0))
    res = finetune(str(model), "chipA", out=tmp_path / "out", data=tokens, steps=2, batch_size=2, seq_len=8,
                   device="cpu", dtype="bfloat16", progress=False)  # fmt: skip
    assert res["steps"] == 2
    config = json.loads((tmp_path / "out" / "config.json").read_text(encoding="utf-8"))
    assert config["dtype"] == "bfloat16"
