"""The outlier_channels method: exact split, calibration maxima, bundle round trip, ONNX validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, build_tiny
from torch import nn

from cimconvert import api
from cimconvert.methods.calibration import analog_linear_layers
from cimconvert.methods.outliers import OutlierChannelsMethod, channel_maxima
from cimconvert.methods.outliers.method import channels_for
from cimconvert.profiles import load_profile
from cimconvert.transforms.outlier_split import OutlierSplitLinear, expected_key_changes
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


def test_channels_for_rounds_up_and_keeps_one() -> None:
    assert channels_for(576, 5.0) == 29 and channels_for(32, 0.1) == 1 and channels_for(100, 5.0) == 5


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
    """A MoE demo model: attention linears split (experts untouched), load_bundle exact, ORT agrees."""
    out = tmp_path / "out"
    res = api.convert(str(DEMO / "tiny-olmoe"), "chipA", out=out, method="outlier_channels", progress=False,
                      method_options={"outlier_percent": 10.0, **CALIB})  # fmt: skip
    assert res["transforms"] == ["outlier_split"] and res["method_report"]["1:outlier_channels"]["layers"] > 0
    units = {t["name"]: t["unit"] for t in json.loads((out / "manifest.json").read_text())["tensors"]}
    split = [n.removesuffix(".analog.weight") for n in units if n.endswith(".analog.weight")]
    assert split and all(units[f"{s}.digital.weight"] == "digital" for s in split)
    assert all(units[f"{s}.analog.weight"] == "analog" for s in split)
    assert not any("experts" in s for s in split)
    source, _, _, _ = api.load_for_eval(str(DEMO / "tiny-olmoe"), "chipA")
    assert torch.allclose(_logits(api.load_bundle(out)), _logits(source), atol=1e-4)
    summary = validate(out, seeds=1, max_tokens=256, seq_len=64)["summary"]
    assert summary["passed"] and summary["clean_logits_max_abs_diff"] <= 1e-4


@pytest.mark.parametrize("percent", ["0", "60", "-1"])
def test_percent_out_of_range_is_exit_2_and_writes_nothing(run_cli, tmp_path: Path, percent: str) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(str(DEMO / "tiny-olmoe"), "--profile", "chipA", "--method", "outlier_channels",
                           "--outlier-percent", percent, "-o", str(out))  # fmt: skip
    assert code == 2 and "--outlier-percent" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
