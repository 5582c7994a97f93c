"""The output_correction method: per-channel gains fitted across chip draws, folded into the weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import VOCAB, build_tiny

from cimconvert import api
from cimconvert.methods.output_correction import (
    GainFit,
    OutputCorrectionMethod,
    fit_output_gains,
    fold_expert_gains,
    fold_gains,
)
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile

DEMO = Path(__file__).resolve().parent.parent / "examples" / "models"
TOKENS = torch.randint(3, VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))


def test_gain_fit_undoes_a_planted_shrinkage() -> None:
    """analog = 0.9·exact + noise: the fitted gain is 1/0.9 per channel, and folding it restores the row."""
    fit = GainFit(3)
    exact = torch.randn(4000, 3, generator=torch.Generator().manual_seed(1))
    fit.add(0.9 * exact + 0.01 * torch.randn(4000, 3, generator=torch.Generator().manual_seed(2)), exact)
    assert torch.allclose(fit.gain(), torch.full((3,), 1 / 0.9, dtype=torch.float64), rtol=2e-3)
    linear = torch.nn.Linear(4, 3)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    model = torch.nn.Sequential(linear)
    fold_gains(model, {"0": torch.tensor([1.0, 2.0, 0.5])})
    assert torch.allclose(linear.weight, weight * torch.tensor([[1.0], [2.0], [0.5]]))
    assert torch.allclose(linear.bias, bias * torch.tensor([1.0, 2.0, 0.5]))


def test_ideal_chip_gives_unit_gains() -> None:
    model = build_tiny("llama")
    ideal = load_profile("ideal")
    layer = "model.layers.0.mlp.down_proj"
    gains = fit_output_gains(model, [layer], plan_model(model, ideal).analog(), ideal, TOKENS, seeds=[0])
    assert torch.allclose(gains[layer], torch.ones_like(gains[layer]), atol=1e-5)


def test_method_folds_gains_near_one_under_chipA() -> None:
    model = build_tiny("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = OutputCorrectionMethod().apply(
        model, None, load_profile("chipA"), {"correction_draws": 2, "calib_tokens": TOKENS}, progress=False
    )
    report = result.report
    assert report["layers"] == 14 and report["draws"] == 2
    assert 0.8 < report["gain_min"] <= report["gain_mean"] <= report["gain_max"] < 1.25
    assert report["gain_std"] > 0
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(n.endswith("_proj.weight") for n in changed)
    assert result.seeds["output_correction"] == [200_000, 200_001, 200_002]  # two fits + one check draw
    for key in ("clean", "noisy_before", "noisy_after"):
        assert 0 < report[f"calibration_ppl_{key}"] < 10 * VOCAB
    assert report["check_seed"] == 200_002
    assert result.transforms[0]["type"] == "output_gain"


def test_bundle_stores_corrected_weights_and_loads(tmp_path: Path) -> None:
    """A recipe outlier_channels → output_correction: the bundle loads with both, exactly as fitted."""
    recipe = tmp_path / "recipe.yaml"
    calib = "calib_samples: 2, calib_seq_len: 32"
    recipe.write_text(
        "steps:\n"
        f"  - step: outlier_channels\n    options: {{outlier_percent: 10, {calib}}}\n"
        f"  - step: output_correction\n    options: {{correction_draws: 1, {calib}}}\n"
    )
    out = tmp_path / "out"
    res = api.convert(str(DEMO / "tiny-olmoe"), "chipA", out=out, recipe=str(recipe), progress=False)
    assert res["transforms"] == ["outlier_split", "experts_digital_inputs", "output_gain"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["step"] for s in manifest["recipe"]["steps"]] == ["outlier_channels", "output_correction"]
    model = api.load_bundle(out)
    with torch.no_grad():
        logits = model(input_ids=torch.arange(3, 30).view(1, -1)).logits
    assert torch.isfinite(logits).all()
    assert res["method_report"]["2:output_correction"]["layers"] > 0


def test_experts_get_per_expert_gains_unit_on_an_ideal_chip_and_folded_per_row() -> None:
    model = build_tiny("olmoe")
    ideal = load_profile("ideal")
    fused = [info for info in plan_model(model, ideal).analog() if info.name.endswith("experts.down_proj")]
    gains = fit_output_gains(model, [], plan_model(model, ideal).analog(), ideal, TOKENS, seeds=[0],
                             experts=fused)  # fmt: skip
    for info in fused:
        assert gains[info.name].shape == info.shape[:2]
        assert torch.allclose(gains[info.name], torch.ones_like(gains[info.name]), atol=1e-5)
    name = fused[0].name
    param = dict(model.named_parameters())[name]
    before = param.detach().clone()
    planted = torch.linspace(0.5, 1.5, before.shape[0] * before.shape[1]).view(before.shape[:2])
    fold_expert_gains(model, {name: planted}, {name: "out_in"})
    assert torch.allclose(param, before * planted[:, :, None])


def test_method_corrects_fused_experts_under_chipA() -> None:
    model = build_tiny("olmoe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = OutputCorrectionMethod().apply(
        model, None, load_profile("chipA"), {"correction_draws": 1, "calib_tokens": TOKENS}, progress=False
    )
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    fused = {n for n in before if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    assert fused and fused <= changed
    assert fused <= set(result.transforms[0]["targets"])
