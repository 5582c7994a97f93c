"""``cimconvert validate``: onnxruntime under chip noise vs the torch simulator, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest
from reliability_helpers import RunCli
from tiny_models import TINY_CONFIGS

from cimconvert import api
from cimconvert.arch import get_adapter
from cimconvert.arch.loading import build_model, load_config
from cimconvert.bundle.integrity import write_manifest_and_lock
from cimconvert.checkpoint import resolve_model, sha256_file
from cimconvert.errors import CimError
from cimconvert.onnx import analog_op
from cimconvert.profiles import ChipProfile
from cimconvert.validate import NODE_MISMATCH, PPL_RTOL, validate

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


@pytest.mark.slow
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
#: Architectures without a demo model: random tiny models (tests/tiny_models.py) with the demo tokenizer.
BUILT_MODELS = ["granitemoe"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
#: Drift without per-array compensation and an analog router: a regime in which ROMER does recalibrate
#: the routers (under plain chipA its maps stay within the deadband and nothing is applied).
ROMER_PROFILE = "chipA:drift.compensation=none"


def _model_folder(tmp_path_factory: pytest.TempPathFactory, model: str) -> Path:
    """A demo model's folder, or a random tiny model of a built architecture with the demo tokenizer."""
    if model not in BUILT_MODELS:
        return DEMO / model
    folder = tmp_path_factory.mktemp("sources") / model
    vocab = json.loads((DEMO / "tiny-olmoe" / "config.json").read_text())["vocab_size"]
    config = {**TINY_CONFIGS[model], "vocab_size": vocab, "max_position_embeddings": 256}
    build_model(load_config(config), seed=0).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO / "tiny-olmoe" / name, folder / name)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("method", ["none", "auto"])
@pytest.mark.parametrize("model", DEMO_MODELS + BUILT_MODELS)
def test_every_demo_model_exports_and_validates(
    tmp_path_factory: pytest.TempPathFactory, model: str, method: str
) -> None:
    """Every demo model (and every architecture without one), with and without its default recipe (outlier
    channels, output correction and ROMER for MoE, HPD for SSM), validates in ORT."""
    out = tmp_path_factory.mktemp("bundles") / f"{model}-{method}"
    folder = _model_folder(tmp_path_factory, model)
    adapter = get_adapter(json.loads((folder / "config.json").read_text()))
    options = METHOD_OPTIONS if method != "none" else None
    moe = adapter.family == "moe"
    profile = ROMER_PROFILE if moe and method == "auto" else "chipA"
    router = rf"re:.*\.{adapter.moe_block}\.{adapter.router}\.weight"
    analog = [router] if moe and method == "auto" else []
    res = api.convert(str(folder), profile, out=out, method=method, analog=analog, progress=False,
                      method_options=options)  # fmt: skip
    moe_auto = ["outlier_split", "experts_digital_inputs", "output_gain"]  # methods/defaults.py: MOE
    expected = {"none": [], "auto": moe_auto if moe else ["hpd_split"]}[method]
    assert [t for t in res["transforms"] if t != "romer_replacement"] == expected
    # The bundle keeps the source's storage dtype (bf16 demos stay bf16), whatever the method did.
    source = {n: m.dtype for n, m in resolve_model(str(folder)).tensor_shapes().items()}
    stored = {t["name"]: t["dtype"] for t in json.loads((out / "manifest.json").read_text())["tensors"]}
    assert {n: stored[n] for n in source if n in stored} == {n: source[n] for n in source if n in stored}
    summary = validate(out, **{**FAST, "seeds": 1})["summary"]
    assert summary["clean_logits_max_abs_diff"] <= 1e-4
    assert summary["programmed_weights_bit_identical"] and summary["graph_matches_placement"]
    # Shared counter draws: the single draw agrees per seed and every analog matmul agrees on its own.
    assert summary["noisy_ppl_max_rel_diff"] <= PPL_RTOL
    assert summary["node_check"] is None or summary["node_check"]["passed"]
    assert summary["passed"], summary


def test_cli_validate_json(olmoe_bundle: Path, run_cli: RunCli) -> None:
    code, out, _ = run_cli("validate", str(olmoe_bundle), "--profile", "chipA", "--seeds", "1",
                        "--max-tokens", "256", "--seq-len", "64", "--json")  # fmt: skip
    assert code == 0
    assert json.loads(out)["summary"]["outputs_match"] is True


def _copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


@pytest.mark.parametrize("damage", ["altered", "missing", "no-onnx"])
def test_damaged_onnx_is_one_line_exit_2(
    olmoe_bundle: Path, tmp_path: Path, run_cli: RunCli, damage: str
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
    code, out, err = run_cli("validate", str(bundle))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "model.onnx" in err


def test_profile_mismatch_refused_unless_allowed(
    olmoe_bundle: Path, run_cli: RunCli
) -> None:
    code, _, err = run_cli("validate", str(olmoe_bundle), "--profile", "chipB")
    assert code == 2 and "--profile-mismatch-ok" in err and err.count("\n") == 1
    res = validate(olmoe_bundle, "chipB", profile_mismatch_ok=True, **{**FAST, "seeds": 1})
    assert res["profile"] == "chipB" and res["summary"]["outputs_match"]
    assert res["summary"]["programmed_weights_bit_identical"]


def test_missing_dataset_is_one_line(olmoe_bundle: Path, run_cli: RunCli) -> None:
    code, _, err = run_cli("validate", str(olmoe_bundle), "--dataset", "/nonexistent/text.txt")
    assert code == 2 and err.count("\n") == 1 and "dataset" in err
    with pytest.raises(CimError):
        validate(olmoe_bundle, dataset="/nonexistent/text.txt")


# ------------------------------------------------------------------------ a verdict that is not luck
@pytest.mark.slow
def test_counter_mode_passes_for_every_seed_count(olmoe_bundle: Path) -> None:
    """Shared counter draws: every seed's noisy PPL agrees within the per-seed tolerance, every node alone."""
    for n in (1, 2, 3):
        res = validate(olmoe_bundle, "chipA", **{**FAST, "seeds": n})
        summary = res["summary"]
        assert res["mvm_noise"] == "counter" and res["comparison"] == "exact"
        assert len(summary["test"]["per_seed_rel_diff"]) == n
        assert summary["noisy_ppl_max_rel_diff"] <= summary["ppl_rtol"] == PPL_RTOL
        assert summary["node_check"]["nodes"] > 0 and summary["node_check"]["untracked"] == []
        assert summary["node_check"]["max_mismatch_fraction"] <= NODE_MISMATCH
        assert summary["graph_matches_placement"] and summary["passed"], summary


def _scaled_noise_bodies(monkeypatch: pytest.MonkeyPatch, factor: float) -> None:
    """onnxruntime's per-MVM bodies built with out_noise × ``factor`` (torch keeps the true profile)."""
    original = analog_op.mvm_functions

    def scaled(profile: ChipProfile, opset: int = 18, counter: bool = False) -> list:
        mvm = profile.mvm.model_copy(update={"out_noise": profile.mvm.out_noise * factor})
        return original(profile.model_copy(update={"mvm": mvm}), opset, counter)

    monkeypatch.setattr(analog_op, "mvm_functions", scaled)


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [1, 3])
def test_noise_scale_off_by_ten_percent_fails(
    olmoe_bundle: Path, monkeypatch: pytest.MonkeyPatch, seeds: int
) -> None:
    _scaled_noise_bodies(monkeypatch, 1.1)
    summary = validate(olmoe_bundle, "chipA", **{**FAST, "seeds": seeds})["summary"]
    assert summary["outputs_match"] and summary["programmed_weights_bit_identical"]
    # ≈ 5 % of a node's outputs move (one ADC step) when σ is 10 % off; a correct node: 0 to 0.03 %
    assert summary["node_check"]["max_mismatch_fraction"] > 2 * NODE_MISMATCH
    assert not summary["node_check"]["passed"] and not summary["passed"]


def _drop_analog_node(bundle: Path) -> str:
    """Turn the graph's first AnalogMatMul into a plain digital matmul (manifest checksums and the
    bundle lock updated, as a re-export would)."""
    path = bundle / "onnx" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    node = analog_op.analog_nodes(model)[0]
    tensor = str(analog_op.node_attrs(node)["tensor"])
    node.op_type = "DigitalMatMul"
    digital = analog_op.ideal_function()
    digital.name = "DigitalMatMul"
    model.functions.append(digital)
    onnx.save(model, str(path))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["name"] == "onnx/model.onnx":
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    write_manifest_and_lock(bundle, json.dumps(manifest))
    return tensor


@pytest.mark.slow
def test_graph_missing_one_analog_node_fails(olmoe_bundle: Path, tmp_path: Path) -> None:
    bundle = _copy(olmoe_bundle, tmp_path)
    tensor = _drop_analog_node(bundle)
    res = validate(bundle, **{**FAST, "seeds": 1})
    summary = res["summary"]
    assert summary["outputs_match"]  # the ideal model is unchanged: only the noise of one matmul is gone
    assert summary["analog_in_placement_not_graph"] == [tensor]
    assert not summary["graph_matches_placement"] and not summary["passed"]


def test_native_mode_is_a_stated_statistical_test(olmoe_bundle: Path) -> None:
    res = validate(olmoe_bundle, "chipA", **FAST, mvm_noise="native")
    summary, test = res["summary"], res["summary"]["test"]
    assert res["comparison"] == "statistical" and summary["node_check"] is None
    assert test["method"].startswith("paired t-test") and test["alpha"] == 0.01 and test["margin"] == 0.01
    assert test["n"] == 2 and test["p_value"] is not None and test["ci_low"] < test["ci_high"]
    assert test["verdict"] in ("pass", "inconclusive", "fail")
    assert summary["passed"] == (summary["outputs_match"] and test["verdict"] == "pass")


@pytest.mark.parametrize("option", [("--mvm-noise", "lucky"), ("--alpha", "0.7"), ("--margin", "0")])
def test_bad_comparison_option_is_one_line(
    olmoe_bundle: Path, run_cli: RunCli, option: tuple[str, str]
) -> None:
    code, out, err = run_cli("validate", str(olmoe_bundle), *option)
    assert code == 2 and out == "" and err.count("\n") == 1 and option[0] in err
