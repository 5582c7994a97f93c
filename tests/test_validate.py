"""``cimconvert validate``: onnxruntime under chip noise vs the torch simulator, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cimconvert import api
from cimconvert.bundle.integrity import write_manifest_and_lock
from cimconvert.checkpoint import resolve_model
from cimconvert.errors import CimError
from cimconvert.validate import validate
from tests.test_cli import run_cli

DEMO = Path(__file__).resolve().parent.parent / "examples" / "models"
FAST = {"seeds": 2, "max_tokens": 384, "seq_len": 64}


#: Small method settings (one calibration draw, few sequences): the bundles only need to exist.
METHOD_OPTIONS = {"calib_seeds": 1, "calib_samples": 4}


def _bundle(tmp_path_factory: pytest.TempPathFactory, model: str, method: str) -> Path:
    """Convert a demo model (conversion writes onnx/model.onnx itself)."""
    out = tmp_path_factory.mktemp("bundles") / f"{model}-{method}"
    options = METHOD_OPTIONS if method != "none" else None
    api.convert(str(DEMO / model), "chipA", out=out, method=method, progress=False, method_options=options)
    assert (out / "onnx" / "model.onnx").is_file()
    return out


@pytest.fixture(scope="module")
def olmoe_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle(tmp_path_factory, "tiny-olmoe", "none")


def _assert_agreement(res: dict) -> None:
    summary = res["summary"]
    assert summary["clean_logits_max_abs_diff"] <= 1e-4
    assert summary["programmed_weights_bit_identical"]
    assert summary["noisy_ppl_rel_diff"] <= 0.005
    assert summary["passed"]
    assert res["onnxruntime"]["clean_ppl"] == pytest.approx(res["torch"]["clean_ppl"], rel=1e-5)


def test_validate_moe_bundle_agrees_with_torch(olmoe_bundle: Path) -> None:
    res = validate(olmoe_bundle, "chipA", **FAST)
    _assert_agreement(res)
    assert res["per_mvm"] and res["seeds"] == [1000, 1001]
    assert res["onnxruntime"]["noisy_ppl"]["mean"] > res["onnxruntime"]["clean_ppl"]


def test_manifest_records_onnx_files(olmoe_bundle: Path) -> None:
    manifest = api.inspect(olmoe_bundle)
    assert manifest["verified"], manifest["problems"]
    data = json.loads((olmoe_bundle / "manifest.json").read_text())
    assert "onnx/model.onnx" in {f["name"] for f in data["files"]}
    assert data["extra"]["onnx"]["analog_nodes"] > 0


DEMO_MODELS = ["tiny-olmoe", "tiny-qwen2-moe", "tiny-deepseek", "tiny-mamba", "tiny-mamba2"]
#: Drift without per-array compensation and an analog router: a regime in which ROMER does recalibrate
#: the routers (under plain chipA its maps stay within the deadband and nothing is applied).
ROMER_PROFILE = "chipA:drift.compensation=none"


@pytest.mark.parametrize("method", ["none", "auto"])
@pytest.mark.parametrize("model", DEMO_MODELS)
def test_every_demo_model_exports_and_validates(
    tmp_path_factory: pytest.TempPathFactory, model: str, method: str
) -> None:
    """Every demo model, with and without its method (ROMER for MoE, HPD for SSM), validates in ORT."""
    out = tmp_path_factory.mktemp("bundles") / f"{model}-{method}"
    options = METHOD_OPTIONS if method != "none" else None
    moe = "mamba" not in model
    profile = ROMER_PROFILE if moe and method == "auto" else "chipA"
    analog = [r"re:.*mlp\.gate\.weight"] if moe and method == "auto" else []
    res = api.convert(str(DEMO / model), profile, out=out, method=method, analog=analog, progress=False,
                      method_options=options)  # fmt: skip
    expected = {"none": [], "auto": ["romer_routing"] if moe else ["hpd_split"]}[method]
    assert [t for t in res["transforms"] if t != "romer_replacement"] == expected
    # The bundle keeps the source's storage dtype (bf16 demos stay bf16), whatever the method did.
    source = {n: m.dtype for n, m in resolve_model(str(DEMO / model)).tensor_shapes().items()}
    stored = {t["name"]: t["dtype"] for t in json.loads((out / "manifest.json").read_text())["tensors"]}
    assert {n: stored[n] for n in source if n in stored} == {n: source[n] for n in source if n in stored}
    summary = validate(out, **{**FAST, "seeds": 1})["summary"]
    assert summary["clean_logits_max_abs_diff"] <= 1e-4
    assert summary["programmed_weights_bit_identical"]
    # One draw on few tokens: per-MVM output noise comes from different RNG streams in ORT and torch, so
    # single-draw perplexities agree only statistically (the 0.5% tolerance is for the mean over draws,
    # checked in test_validate_moe_bundle_agrees_with_torch).
    assert summary["noisy_ppl_rel_diff"] <= 0.02


def test_cli_validate_json(olmoe_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "validate", str(olmoe_bundle), "--profile", "chipA", "--seeds", "1",
                        "--max-tokens", "256", "--seq-len", "64", "--json")  # fmt: skip
    assert code == 0
    assert json.loads(out)["summary"]["outputs_match"] is True


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


@pytest.mark.parametrize("damage", ["altered", "missing", "no-onnx"])
def test_damaged_onnx_is_one_line_exit_2(
    olmoe_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    bundle = _copy(olmoe_bundle, tmp_path)
    graph = bundle / "onnx" / "model.onnx"
    if damage == "altered":
        graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    elif damage == "missing":
        graph.unlink()
    else:
        data = json.loads((bundle / "manifest.json").read_text())
        data["files"] = [f for f in data["files"] if not f["name"].startswith("onnx/")]
        write_manifest_and_lock(bundle, json.dumps(data))  # a consistent bundle that lacks the graph
    code, out, err = run_cli(capsys, "validate", str(bundle))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "model.onnx" in err


def test_profile_mismatch_refused_unless_allowed(
    olmoe_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(capsys, "validate", str(olmoe_bundle), "--profile", "chipB")
    assert code == 2 and "--profile-mismatch-ok" in err and err.count("\n") == 1
    res = validate(olmoe_bundle, "chipB", profile_mismatch_ok=True, **{**FAST, "seeds": 1})
    assert res["profile"] == "chipB" and res["summary"]["outputs_match"]
    assert res["summary"]["programmed_weights_bit_identical"]


def test_missing_dataset_is_one_line(olmoe_bundle: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "validate", str(olmoe_bundle), "--dataset", "/nonexistent/text.txt")
    assert code == 2 and err.count("\n") == 1 and "dataset" in err
    with pytest.raises(CimError):
        validate(olmoe_bundle, dataset="/nonexistent/text.txt")
