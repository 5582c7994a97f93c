"""Layer-by-layer execution (cimconvert.layerwise): the same numbers as the whole-model path on the demo
models, ROMER layer by layer, when it engages, the out-of-memory report, ONNX for big models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from tiny_models import save_tiny
from transformers import AutoTokenizer

from cimconvert import api
from cimconvert.arch import get_adapter
from cimconvert.bundle.reader import read_manifest, verify_bundle
from cimconvert.checkpoint import resolve_model
from cimconvert.datasets import load_text, tokenize
from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import evaluate_model
from cimconvert.layerwise import LayerMemoryError, LayerwiseModel, evaluate_layerwise
from cimconvert.layerwise import memory as layer_memory
from cimconvert.methods import LAYERWISE, option_values
from cimconvert.methods.calibration import calibration_tokens, decoder_layers_only
from cimconvert.methods.romer.core import RomerConfig, calibration_stats
from cimconvert.methods.romer.layerwise import layerwise_stats
from cimconvert.onnx import export as onnx_export
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.transforms.romer.moe import moe_routers

DEMO = Path(__file__).resolve().parent.parent / "examples" / "models"
RTOL = 1e-5


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * abs(b)


@pytest.fixture(scope="module")
def chip():
    return load_profile("chipA")


@pytest.mark.parametrize("name", ["tiny-olmoe", "tiny-mamba", "tiny-deepseek"])
def test_layerwise_eval_matches_whole_model(name: str, chip) -> None:
    """Clean and noisy perplexities (chipA: programming noise, drift, 8-bit DAC/ADC, out_noise) agree."""
    source = resolve_model(DEMO / name)
    tokens = tokenize(AutoTokenizer.from_pretrained(str(source.dir)), load_text("heldout"), 512)
    net = source.load_model(torch.float32)
    whole = evaluate_model(net, tokens, plan_model(net, chip).analog(), chip, seeds=[7, 8], seq_len=128)
    lw = LayerwiseModel.open(source)
    targets = plan_model(lw.model, chip).analog()
    assert sorted(t.name for t in targets) == sorted(t.name for t in plan_model(net, chip).analog())
    layered = evaluate_layerwise(lw, tokens, targets, chip, seeds=[7, 8], seq_len=128)
    assert _close(layered.clean_ppl, whole.clean_ppl)
    assert all(_close(a, b) for a, b in zip(layered.per_seed, whole.per_seed, strict=True))
    assert layered.per_seed != [layered.clean_ppl] * 2  # the draws did perturb the layers


def test_layerwise_frees_each_layer_and_leaves_the_skeleton_on_meta(chip) -> None:
    lw = LayerwiseModel.open(resolve_model(DEMO / "tiny-olmoe"))
    tokens = torch.arange(256) % 100
    evaluate_layerwise(lw, tokens, plan_model(lw.model, chip).analog(), chip, seeds=[1], seq_len=128)
    assert all(p.is_meta for p in lw.layers.parameters())
    assert not lw.model.model.embed_tokens.weight.is_meta


def test_layerwise_romer_statistics_match_whole_model(chip) -> None:
    source = resolve_model(DEMO / "tiny-olmoe")
    adapter = get_adapter(source.model_type)
    cfg = RomerConfig(calib_seeds=2)
    options = {**option_values("romer", {}), "calib_samples": 4, "calib_seq_len": 64}
    net = source.load_model(torch.float32)
    tokens = calibration_tokens(net, options)
    targets = plan_model(net, chip).analog()
    whole = calibration_stats(net, moe_routers(net, adapter), tokens, targets, chip, cfg)
    lw = LayerwiseModel.open(source)
    layered = layerwise_stats(lw, moe_routers(lw.model, adapter), tokens, plan_model(lw.model, chip).analog(),
                              chip, cfg)  # fmt: skip
    assert layered.seeds == whole.seeds
    for which in ("clean", "noisy"):
        a, b = getattr(layered, which), getattr(whole, which)
        assert sorted(a.logits) == sorted(b.logits) and a.tokens == b.tokens
        for i in b.logits:
            torch.testing.assert_close(a.logits[i], b.logits[i], rtol=RTOL, atol=0)
            assert torch.equal(a.counts[i], b.counts[i])
    assert not torch.equal(layered.noisy.logits[0][: tokens.numel()], layered.clean.logits[0])


@pytest.mark.slow
def test_layer_by_layer_convert_gives_the_same_bundle_behaviour(run_cli, tmp_path: Path) -> None:
    """ROMER layer by layer: the whole-model conversion's transforms, and the bundles evaluate alike."""
    args = ["examples/models/tiny-olmoe", "-p", "chipA", "--method", "romer", "--calib-samples", "4",
            "--calib-seq-len", "64", "--router-deadband", "0", "--replacement", "substitute",
            "--replace-bottom", "1", "--no-onnx", "--json"]  # fmt: skip
    code, out, err = run_cli("convert", *args, "--layer-by-layer", "-o", str(tmp_path / "lw"))
    assert code == 0, err
    assert json.loads(out)["layer_by_layer"] is True
    code, out, err = run_cli("convert", *args, "--whole-model", "-o", str(tmp_path / "whole"))
    assert code == 0, err
    assert json.loads(out)["layer_by_layer"] is False
    lw, whole = read_manifest(tmp_path / "lw"), read_manifest(tmp_path / "whole")
    assert [t.model_dump() for t in lw.transforms] == [t.model_dump() for t in whole.transforms]
    assert {t.type for t in lw.transforms} == {"romer_replacement", "romer_routing"}
    assert lw.extra["layer_by_layer"] is True
    assert verify_bundle(tmp_path / "lw") == []
    results = [api.evaluate(str(tmp_path / b), None, seeds=1, max_tokens=512, seq_len=128, progress=False)
               for b in ("lw", "whole")]  # fmt: skip
    assert _close(results[0]["clean_ppl"], results[1]["clean_ppl"])
    assert _close(results[0]["per_seed"][0], results[1]["per_seed"][0])


def test_auto_engages_by_size(monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model(DEMO / "tiny-olmoe")
    size = layer_memory.model_bytes(source)
    assert size > 4 * 1e6  # float32 of a ~12 MB float32 checkpoint
    monkeypatch.setenv(layer_memory.BUDGET_ENV, str(size))  # model > half the budget
    assert layer_memory.use_layerwise("auto", source)
    monkeypatch.setenv(layer_memory.BUDGET_ENV, str(4 * size))
    assert not layer_memory.use_layerwise("auto", source)
    assert layer_memory.use_layerwise(True, source) and not layer_memory.use_layerwise(False, source)
    monkeypatch.setenv(layer_memory.BUDGET_ENV, "1K")
    res = api.evaluate(str(DEMO / "tiny-olmoe"), "chipA", seeds=1, max_tokens=256, seq_len=128,
                       progress=False)
    assert res["layer_by_layer"] is True


def test_parse_bytes() -> None:
    assert layer_memory.parse_bytes("6G") == 6 << 30
    assert layer_memory.parse_bytes("512MiB") == 512 << 20
    assert layer_memory.parse_bytes("1000") == 1000
    with pytest.raises(CimError, match="not a size"):
        layer_memory.parse_bytes("lots")


def test_out_of_memory_in_a_layer_names_the_layer(monkeypatch: pytest.MonkeyPatch, chip) -> None:
    """A failed allocation inside a layer pass: one line with the layer and the memory it needed."""
    lw = LayerwiseModel.open(resolve_model(DEMO / "tiny-olmoe"))
    original = lw.load_layer

    def failing(index: int, names=None):
        if index == 2:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] . DefaultCPUAllocator: can't allocate "
                               "memory: you tried to allocate 3221225472 bytes. Error code 12")  # fmt: skip
        return original(index, names)

    monkeypatch.setattr(lw, "load_layer", failing)
    with pytest.raises(LayerMemoryError) as info:
        evaluate_layerwise(lw, torch.arange(256) % 100, plan_model(lw.model, chip).analog(), chip, seeds=[1],
                           seq_len=128)  # fmt: skip
    message = str(info.value)
    assert "decoder layer 2 of 4" in message and "\n" not in message
    assert "the failed allocation 3.00 GiB" in message and "weights 0.00 GiB" in message


def test_other_runtime_errors_pass_through(monkeypatch: pytest.MonkeyPatch, chip) -> None:
    lw = LayerwiseModel.open(resolve_model(DEMO / "tiny-olmoe"))

    def broken(index: int, names=None):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(lw, "load_layer", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        evaluate_layerwise(lw, torch.arange(256) % 100, [], chip, seeds=[1], seq_len=128)


def test_memory_error_is_reported_too(monkeypatch: pytest.MonkeyPatch, chip) -> None:
    lw = LayerwiseModel.open(resolve_model(DEMO / "tiny-olmoe"))

    def exhausted(index: int, names=None):
        raise MemoryError

    monkeypatch.setattr(lw, "load_layer", exhausted)
    with pytest.raises(LayerMemoryError, match="out of memory in decoder layer 0 of 4: it needs about"):
        evaluate_layerwise(lw, torch.arange(256) % 100, [], chip, seeds=[1], seq_len=128)


def test_steps_without_a_layerwise_implementation_are_refused(run_cli, tmp_path: Path, monkeypatch) -> None:
    """Every built-in step has one; a plugin's may not (simulated by removing hpd's)."""
    monkeypatch.delitem(LAYERWISE, "hpd")
    code, _, err = run_cli("convert", "examples/models/tiny-mamba", "-p", "chipA", "--method", "hpd",
                           "--layer-by-layer", "--no-onnx", "-o", str(tmp_path / "out"))
    assert code == 2 and "no layer-by-layer implementation" in err and "--whole-model" in err
    assert not (tmp_path / "out").exists()


def test_bundle_is_not_evaluated_layer_by_layer(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("convert", "examples/models/tiny-olmoe", "-p", "chipA", "--method", "none",
                           "--no-onnx", "-o", str(tmp_path / "b"))  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli("eval", str(tmp_path / "b"), "--layer-by-layer", "--seeds", "1")
    assert code == 2 and "not a bundle" in err


def test_onnx_refused_when_the_export_would_not_fit(run_cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(layer_memory.BUDGET_ENV, "1M")
    out = tmp_path / "out"
    code, stdout, err = run_cli("convert", "examples/models/tiny-olmoe", "-p", "chipA", "--method", "none",
                                "-o", str(out))  # fmt: skip
    assert code == 2 and stdout == ""
    line = err.strip()
    assert "\n" not in line and "--no-onnx" in line and "validate" in line
    assert not out.exists()
    code, _, err = run_cli("convert", "examples/models/tiny-olmoe", "-p", "chipA", "--method", "none",
                           "--no-onnx", "-o", str(out))  # fmt: skip
    assert code == 0, err


@pytest.mark.slow
def test_external_onnx_data_is_locked_and_validated(run_cli, tmp_path: Path, monkeypatch) -> None:
    """Forced low threshold: the graph's weights go to onnx/model.onnx_data, which the manifest lists (so
    bundle.lock covers it), a changed byte fails the check, and validate loads it."""
    monkeypatch.setattr(onnx_export, "EXTERNAL_THRESHOLD", 0)
    out = tmp_path / "b"
    code, _, err = run_cli("convert", "examples/models/tiny-olmoe", "-p", "chipA", "--method", "none",
                           "-o", str(out))  # fmt: skip
    assert code == 0, err
    names = {f.name for f in read_manifest(out).files}
    assert {"onnx/model.onnx", "onnx/model.onnx_data"} <= names
    code, stdout, err = run_cli("validate", str(out), "--seeds", "1", "--max-tokens", "256", "--json")
    assert code == 0, err
    assert json.loads(stdout)["onnx"].endswith("model.onnx")
    data = out / "onnx" / "model.onnx_data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert any("model.onnx_data" in problem for problem in verify_bundle(out))
    code, _, err = run_cli("validate", str(out), "--seeds", "1", "--max-tokens", "256")
    assert code == 2 and "model.onnx_data" in err


def test_layer_by_layer_is_refused_under_a_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model(DEMO / "tiny-olmoe")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(CimError, match="runs in one process"):
        layer_memory.use_layerwise_here(True, source)
    assert layer_memory.use_layerwise_here(False, source) is False


RECIPE = """steps:
  - step: hpd
    options: {hpd_layers: [backbone.layers.0.mixer.out_proj]}
  - step: keep_digital
    options: {patterns: [backbone.layers.1.mixer.in_proj.weight]}
"""


def _tensor_digests(out: Path) -> dict[str, str]:
    return {t.name: t.sha256 for t in read_manifest(out).tensors}


CALIB = ["--calib-samples", "4", "--calib-seq-len", "64"]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method"), [
    ("tiny-olmoe", ["--method", "auto", *CALIB]),  # outlier_channels → output_correction
    ("tiny-qwen2-moe", ["--method", "auto", *CALIB]),
    ("tiny-mamba", ["--method", "output_correction", *CALIB]),
    ("tiny-mamba", ["--method", "auto"]),  # hpd on the last out_proj
    ("tiny-mamba", ["--method", "hpd", "--hpd-layers", "auto"]),  # its quick scan, layer by layer
    ("tiny-olmoe", ["--method", "digital_budget", "--budget-scan-tokens", "256"]),  # the same
    ("tiny-mamba2", ["--recipe", "RECIPE"]),  # hpd on layer 0, then keep_digital on layer 1
])  # fmt: skip
def test_weight_changing_recipe_layer_by_layer_writes_the_whole_model_bundle(
    name: str, method: list[str], run_cli, tmp_path: Path
) -> None:
    """Recipes that change weights, structure or placement, layer by layer: the same reports, transforms
    and bit-identical tensors as the whole-model conversion (one calibration batch)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    method = [str(recipe) if item == "RECIPE" else item for item in method]
    args = [f"examples/models/{name}", "-p", "chipA", *method, "--no-onnx", "--json"]
    results = {}
    for mode in ("--layer-by-layer", "--whole-model"):
        code, out, err = run_cli("convert", *args, mode, "-o", str(tmp_path / mode))
        assert code == 0, err
        results[mode] = json.loads(out)
    lw, whole = tmp_path / "--layer-by-layer", tmp_path / "--whole-model"
    assert results["--layer-by-layer"]["layer_by_layer"] is True
    assert results["--layer-by-layer"]["method_report"] == results["--whole-model"]["method_report"]
    assert [t.model_dump() for t in read_manifest(lw).transforms] == [
        t.model_dump() for t in read_manifest(whole).transforms
    ]
    assert _tensor_digests(lw) == _tensor_digests(whole)
    assert results["--layer-by-layer"]["placement_totals"] == results["--whole-model"]["placement_totals"]
    assert verify_bundle(lw) == []
    assert not list(tmp_path.glob(".*src*"))  # the transformed layers were written beside OUT, then removed


@pytest.mark.parametrize(("steps", "message"), [
    # ROMER's fit exists only after the pass: a later step could not see it while the layers run
    (["romer", "output_correction"], "must be the recipe's last step"),
    # the digital budget's quick scan runs before the pass: after outlier splits, the unsplit model
    (["outlier_channels", "digital_budget"], "--budget-scan"),
])  # fmt: skip
def test_step_orders_the_pass_cannot_follow_are_refused(steps: list[str], message: str, run_cli,
                                                        tmp_path: Path) -> None:  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n" + "".join(f"  - step: {step}\n" for step in steps), encoding="utf-8")
    code, _, err = run_cli("convert", "examples/models/tiny-olmoe", "-p", "chipA", "--recipe", str(recipe),
                           "--layer-by-layer", "--no-onnx", "-o", str(tmp_path / "out"))  # fmt: skip
    assert code == 2 and message in err and "--whole-model" in err
    assert not (tmp_path / "out").exists()


def test_analog_tensor_outside_the_layers_is_refused_by_layer_steps(chip, tmp_path: Path) -> None:
    """A layer step covers the decoder layers: an analog (untied) lm_head would go uncorrected: refused."""
    _, folder = save_tiny("llama", tmp_path / "llama")
    lw = LayerwiseModel.open(resolve_model(folder))
    decoder_layers_only(lw, "output_correction", chip, plan_model(lw.model, chip))  # lm_head digital: fine
    with pytest.raises(CimError, match="covers the decoder layers only, but 'lm_head' is analog"):
        analog_head = plan_model(lw.model, chip, analog=["lm_head.weight"])
        decoder_layers_only(lw, "output_correction", chip, analog_head)


def test_analyze_layer_by_layer_gives_the_whole_model_scan(run_cli, tmp_path: Path) -> None:
    scans = {}
    for mode in ("--layer-by-layer", "--whole-model"):
        code, out, err = run_cli("analyze", "examples/models/tiny-olmoe", "-p", "chipA", "--seeds", "2",
                                 "--max-tokens", "512", "--json", mode,
                                 "-o", str(tmp_path / mode))  # fmt: skip
        assert code == 0, err
        scans[mode] = json.loads(out)
    lw, whole = scans["--layer-by-layer"], scans["--whole-model"]
    assert lw["layer_by_layer"] is True and whole["layer_by_layer"] is False
    assert lw["clean_ppl"] == whole["clean_ppl"] and lw["all"] == whole["all"]
    assert [r["per_seed"] for r in lw["rows"]] == [r["per_seed"] for r in whole["rows"]]
    assert len({r["ppl_mean"] for r in lw["rows"]}) > 1  # the rows differ: each perturbed its own part


@pytest.mark.slow
def test_layer_by_layer_onnx_is_the_whole_model_graph_and_validates(run_cli, tmp_path: Path) -> None:
    """The ONNX export of a weight-changing layer-by-layer conversion loads the bundle being written: the
    same graph and initializers as the whole-model export, and validate passes on it."""
    args = ["examples/models/tiny-olmoe", "-p", "chipA", *CALIB, "--json"]
    for mode in ("--layer-by-layer", "--whole-model"):
        code, _, err = run_cli("convert", *args, mode, "-o", str(tmp_path / mode))
        assert code == 0, err
    graphs = [onnx.load(str(tmp_path / mode / "onnx" / "model.onnx")).graph
              for mode in ("--layer-by-layer", "--whole-model")]  # fmt: skip
    assert [n.op_type for n in graphs[0].node] == [n.op_type for n in graphs[1].node]
    inits = [{i.name: numpy_helper.to_array(i) for i in g.initializer} for g in graphs]
    assert sorted(inits[0]) == sorted(inits[1])
    assert all(np.array_equal(inits[0][name], inits[1][name]) for name in inits[1])
    code, out, err = run_cli("validate", str(tmp_path / "--layer-by-layer"), "--seeds", "1",
                             "--max-tokens", "256", "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["summary"]["passed"] is True
