"""The outlier_channels method: exact split, calibration maxima, bundle round trip, ONNX validation."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, build_tiny
from torch import nn

from cimconvert import api
from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.analog.experts import ExpertsBinding, column_mask, digital_inputs, set_digital_inputs
from cimconvert.analog.patch import CleanKernel
from cimconvert.analog.routes import owner_of, route_of
from cimconvert.arch import get_adapter
from cimconvert.methods.calibration import analog_linear_layers
from cimconvert.methods.outliers import OutlierChannelsMethod, channel_maxima
from cimconvert.methods.outliers.method import channels_for
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.transforms.experts_inputs import TRANSFORM_TYPE
from cimconvert.transforms.outlier_split import OutlierSplitLinear, expected_key_changes
from cimconvert.transforms.romer import replacement
from cimconvert.validate import validate

DEMO = Path(__file__).resolve().parent.parent / "examples" / "models"
CALIB = {"calib_samples": 2, "calib_seq_len": 32}


def _tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_split_is_exact_and_keeps_the_bias() -> None:
    linear = nn.Linear(10, 4)
    split = OutlierSplitLinear.from_linear(linear, [7, 2])
    x = torch.randn(3, 10)
    assert torch.allclose(split(x), linear(x), atol=1e-6)
    assert split.digital_index.tolist() == [2, 7] and split.analog.weight.shape == (4, 8)
    assert torch.equal(split.weight, linear.weight) and torch.equal(split.bias, linear.bias)


@pytest.mark.parametrize("index", [[], [10], [-1], list(range(10))])
def test_split_refuses_channels_that_are_not_a_proper_subset(index: list[int]) -> None:
    with pytest.raises(ValueError, match="proper subset"):
        OutlierSplitLinear(10, 4, index, bias=False)


def test_channels_for_rounds_down_and_keeps_one() -> None:
    assert channels_for(576, 5.0) == 28 and channels_for(32, 0.1) == 1 and channels_for(100, 5.0) == 5
    assert channels_for(1536, 5.0) == 76 and channels_for(96, 5.0) == 4


def test_channel_maxima_finds_a_planted_outlier() -> None:
    model = build_tiny("llama")
    layer = "model.layers.1.mlp.gate_proj"
    with torch.no_grad():  # channel 5 of the MLP input: 50x larger through the norm weight
        model.model.layers[1].post_attention_layernorm.weight[5] *= 50
    maxima = channel_maxima(model, [layer], _tokens())
    assert int(maxima[layer].argmax()) == 5


def test_method_splits_every_analog_linear_and_keeps_logits() -> None:
    model = build_tiny("llama")
    chip = load_profile("chipA")
    layers = analog_linear_layers(model, chip, None)
    assert len(layers) == 14  # 2 blocks x (q, k, v, o, gate, up, down); lm_head is digital
    ref = model(input_ids=_tokens(1)).logits
    result = OutlierChannelsMethod().apply(
        model, None, chip, {"outlier_percent": 10.0, "calib_tokens": _tokens()}, progress=False
    )
    assert torch.allclose(model(input_ids=_tokens(1)).logits, ref, atol=1e-5)
    assert sum(isinstance(m, OutlierSplitLinear) for m in model.modules()) == 14
    report = result.report
    assert report["layers"] == 14 and 9.0 <= report["digital_share_of_split_layers_pct"] <= 13.0
    assert all(r["input_max_after"] <= r["input_max_before"] for r in report["rows"])
    missing, added = expected_key_changes(result.transforms[0]["params"])
    assert len(missing) == 14 and len(added) == 28
    assert result.digital == [name for name in added if ".digital." in name]


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.arange(3, 40).view(1, -1)).logits


def test_bundle_round_trip_places_split_and_validates(tmp_path: Path) -> None:
    """A MoE demo model: attention linears split, per-expert digital channels of the fused experts,
    load_bundle exact (channels given back), ORT agrees with torch (programmed weights bit-identical)."""
    out = tmp_path / "out"
    res = api.convert(str(DEMO / "tiny-olmoe"), "chipA", out=out, method="outlier_channels", progress=False,
                      method_options={"outlier_percent": 10.0, **CALIB})  # fmt: skip
    assert res["transforms"] == ["outlier_split", TRANSFORM_TYPE]
    assert res["method_report"]["1:outlier_channels"]["layers"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    units = {t["name"]: t["unit"] for t in manifest["tensors"]}
    split = [n.removesuffix(".analog.weight") for n in units if n.endswith(".analog.weight")]
    assert split and all(units[f"{s}.digital.weight"] == "digital" for s in split)
    assert all(units[f"{s}.analog.weight"] == "analog" for s in split)
    assert not any("experts" in s for s in split)
    entry = next(t for t in manifest["transforms"] if t["type"] == TRANSFORM_TYPE)
    loaded = api.load_bundle(out)
    for item in entry["params"]["tensors"]:
        owner, _, attr = owner_of(loaded, item["tensor"])
        assert digital_inputs(owner, attr).tolist() == item["digital_index"]
    source, _, _, _ = api.load_for_eval(str(DEMO / "tiny-olmoe"), "chipA")
    assert torch.allclose(_logits(loaded), _logits(source), atol=1e-4)
    summary = validate(out, seeds=1, max_tokens=256, seq_len=64)["summary"]
    assert summary["passed"] and summary["clean_logits_max_abs_diff"] <= 1e-4
    assert summary["programmed_weights_bit_identical"]


class _RecordingKernel(CleanKernel):
    """The exact kernel, remembering the inputs it was given."""

    def __init__(self) -> None:
        self.inputs: list[torch.Tensor] = []

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x)
        return super().expert(name, module, expert, x)


def _moe_with_digital_inputs() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    model = build_tiny("olmoe")
    experts = model.model.layers[0].mlp.experts
    index = torch.tensor([[0, 3], [1, 2], [5, 7], [4, 6]])  # two channels per expert of down_proj
    set_digital_inputs(experts, "down_proj", index)
    return model, experts, index


def test_experts_projection_zeroes_digital_channels_for_the_kernel_and_adds_them_exactly() -> None:
    _, experts, index = _moe_with_digital_inputs()
    kernel = _RecordingKernel()
    binding = ExpertsBinding(kernel, "model.layers.0.mlp.experts.", Counter(), analog={"down_proj"})
    x = torch.randn(5, experts.down_proj.shape[2])
    for expert in range(4):
        y = binding.project(experts, "down_proj", expert, x)
        assert torch.allclose(y, nn.functional.linear(x, experts.down_proj[expert]), atol=1e-5)
        seen = kernel.inputs[-1]
        assert torch.equal(seen[:, index[expert]], torch.zeros(5, 2))
        keep = [c for c in range(x.shape[1]) if c not in index[expert].tolist()]
        assert torch.equal(seen[:, keep], x[:, keep])


def test_chip_noise_programs_only_the_analog_columns_and_restores() -> None:
    model, experts, index = _moe_with_digital_inputs()
    name = "model.layers.0.mlp.experts.down_proj"
    clean = experts.down_proj.detach().clone()
    mask = column_mask(clean, index, "out_in").expand_as(clean)
    chip = load_profile("chipA")
    with apply_chip_noise(model, plan_model(model, chip).analog(), chip, seed=3) as handle:
        noisy = experts.down_proj.detach().clone()
        crossbar = handle.crossbar[name]
        assert torch.equal(noisy[mask], clean[mask])  # digital columns exact
        assert not torch.equal(noisy[~mask], clean[~mask])  # analog columns programmed
        assert torch.equal(crossbar[~mask], noisy[~mask]) and not torch.equal(crossbar[mask], clean[mask])
        assert handle.programmed_weights(model)[name] is crossbar
    assert torch.equal(experts.down_proj, clean)


def test_method_gives_every_expert_its_own_channels_and_keeps_logits() -> None:
    model = build_tiny("olmoe")
    ref = model(input_ids=_tokens(1)).logits
    chip = load_profile("chipA")
    result = OutlierChannelsMethod().apply(
        model, get_adapter(model.config), chip, {"outlier_percent": 10.0, "calib_tokens": _tokens()},
        progress=False,
    )  # fmt: skip
    assert torch.allclose(model(input_ids=_tokens(1)).logits, ref, atol=1e-5)
    entry = next(t for t in result.transforms if t["type"] == TRANSFORM_TYPE)
    fused = [info for info in plan_model(model, chip).analog() if route_of(model, info.name) == "experts"]
    assert {item["tensor"] for item in entry["params"]["tensors"]} == {info.name for info in fused}
    for info in fused:
        owner, _, attr = owner_of(model, info.name)
        index = digital_inputs(owner, attr)
        assert index.shape == (info.shape[0], channels_for(info.shape[2], 10.0))
    only_linear = build_tiny("olmoe")
    result = OutlierChannelsMethod().apply(
        only_linear, get_adapter(only_linear.config), chip,
        {"outlier_percent": 10.0, "calib_tokens": _tokens(), "outlier_scope": "linear"}, progress=False,
    )  # fmt: skip
    assert [t["type"] for t in result.transforms] == ["outlier_split"]


@pytest.mark.parametrize("percent", ["0", "60", "-1"])
def test_percent_out_of_range_is_exit_2_and_writes_nothing(run_cli, tmp_path: Path, percent: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(str(DEMO / "tiny-olmoe"), "--profile", "chipA", "--method", "outlier_channels",
                           "--outlier-percent", percent, "-o", str(out))  # fmt: skip
    assert code == 2 and "--outlier-percent" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_expert_replacement_copies_the_donor_channels_and_restores_them() -> None:
    _, experts, index = _moe_with_digital_inputs()
    saved = replacement.snapshot(experts)
    replacement.copy_experts(experts, [[0, 2]])
    assert digital_inputs(experts, "down_proj")[0].tolist() == index[2].tolist()
    assert torch.equal(experts.down_proj[0], experts.down_proj[2])
    replacement.restore(experts, saved)
    assert torch.equal(digital_inputs(experts, "down_proj"), index)
