"""HPD: exact clean decomposition, factor placement, rank truncation, bundle-loader round trip, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import VOCAB, build_tiny, save_tiny

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter, load_pretrained
from cimconvert.cli import main
from cimconvert.errors import CimError
from cimconvert.methods import METHODS, resolve_method
from cimconvert.methods.hpd import (
    FACTORS,
    HpdLinear,
    apply_hpd,
    decompose,
    expected_key_changes,
    hadamard_matrix,
    hpd_placement,
    load_hpd_split,
)
from cimconvert.profiles import load_profile

SSM_TYPES = ("mamba", "mamba2", "falcon_mamba")
IDS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _apply(model: torch.nn.Module, **options: object):
    adapter = get_adapter(model.config)
    return METHODS["hpd"].apply(model, adapter, load_profile("chipA"), dict(options), progress=False)


@pytest.mark.parametrize("model_type", SSM_TYPES)
@pytest.mark.parametrize("factor", tuple(FACTORS))
def test_split_reproduces_clean_logits(model_type: str, factor: str) -> None:
    model = build_tiny(model_type)
    ref = _logits(model)
    result = _apply(model, hpd_factor=factor)
    layer = get_adapter(model.config).ssm_out_projs(model)[-1][0]
    assert isinstance(model.get_submodule(layer), HpdLinear)
    assert [t["params"]["module"] for t in result.transforms] == [layer]
    assert (_logits(model) - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("factor", tuple(FACTORS))
def test_lm_head_split_on_dense_model(factor: str) -> None:
    model = build_tiny("llama")
    ref = _logits(model)
    result = _apply(model, hpd_layers=("lm_head",), hpd_factor=factor)
    assert isinstance(model.lm_head, HpdLinear)
    assert (_logits(model) - ref).abs().max() <= 1e-4
    assert result.report["digital_macs_per_token"] == model.lm_head.rank * model.lm_head.in_features


def test_factor_orientations_and_hadamard() -> None:
    w = torch.randn(6, 10, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    us_v = decompose(w, "us_v")
    assert torch.allclose(us_v.analog, u * s) and torch.allclose(us_v.digital, vh)
    assert torch.allclose(decompose(w, "u").analog, u)
    for factor in FACTORS:
        f = decompose(w, factor)
        assert torch.allclose(f.analog @ f.digital, w, atol=1e-12)
    h = hadamard_matrix(12)  # 3 blocks of H_4
    assert torch.allclose(h @ h, torch.eye(12, dtype=torch.float64), atol=1e-12)


def test_factors_classified_analog_and_digital_under_chipA() -> None:
    model = build_tiny("mamba")
    _apply(model)
    layer = get_adapter(model.config).ssm_out_projs(model)[-1][0]
    placement = hpd_placement(model, load_profile("chipA"))
    analog = placement.get(f"{layer}.analog.weight")
    digital = placement.get(f"{layer}.digital.weight")
    assert (analog.unit, analog.kind, analog.tiles) == ("analog", "ssm_out_proj", 1)
    assert digital.unit == "digital"
    with apply_chip_noise(model, placement.analog(), load_profile("chipA"), seed=1) as handle:
        assert f"{layer}.analog.weight" in handle.mvm_simulated
        assert f"{layer}.digital.weight" not in handle.perturbed


def test_lm_head_factor_follows_profile_and_overrides() -> None:
    model = build_tiny("llama")
    _apply(model, hpd_layers=("lm_head",))
    chip = load_profile("chipA")  # keeps lm_head digital
    assert hpd_placement(model, chip).get("lm_head.analog.weight").unit == "digital"
    assert hpd_placement(model, chip, analog=["lm_head"]).get("lm_head.analog.weight").unit == "analog"


def test_rank_truncation() -> None:
    model = build_tiny("mamba")
    result = _apply(model, hpd_rank=8)
    split = next(m for m in model.modules() if isinstance(m, HpdLinear))
    assert split.rank == 8 and split.digital.weight.shape == (8, split.in_features)
    row = result.report["layers"][0]
    assert row["analog_shape"] == [split.out_features, 8] and row["max_abs_reconstruction_error"] > 0


def test_loader_round_trip(tmp_path) -> None:
    model = build_tiny("mamba")
    result = _apply(model, hpd_layers=("backbone.layers.0.mixer.out_proj", "lm_head"), hpd_factor="sqrt")
    ref = _logits(model)
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path, strict=False)
    for entry in result.transforms:
        load_hpd_split(loaded, entry, tmp_path)
    assert isinstance(loaded.lm_head, HpdLinear)
    assert torch.equal(_logits(loaded), ref)
    missing, added = expected_key_changes(result.transforms[1]["params"])
    assert missing == ["lm_head.weight"] and added == ["lm_head.digital.weight", "lm_head.analog.weight"]


def test_auto_layers_from_scan(tmp_path) -> None:
    scan = tmp_path / "sensitivity.json"
    scan.write_text(
        '{"rows": [{"name": "backbone.layers.0.mixer.in_proj", "delta_pct_mean": 5, "splittable": true},'
        ' {"name": "backbone.layers.1.mixer.dt_proj", "delta_pct_mean": 9, "splittable": false}]}'
    )
    model = build_tiny("mamba")
    result = _apply(model, hpd_layers=("auto",), hpd_scan=str(scan))
    assert result.report["layers"][0]["layer"] == "backbone.layers.0.mixer.in_proj"


def test_auto_method_picks_hpd_for_ssm_only() -> None:
    assert resolve_method("auto", "ssm") == "hpd"
    assert resolve_method("hpd", "dense") == "hpd"


@pytest.mark.parametrize(
    ("model_type", "options", "message"),
    [
        ("llama", {}, "has no SSM out_proj"),
        ("mamba", {"hpd_layers": ("backbone.layers.9.mixer.out_proj",)}, "has no module"),
        ("mamba", {"hpd_layers": ("backbone.layers.0.mixer.conv1d",)}, "not a linear layer"),
        ("mamba", {"hpd_layers": ("backbone.layers.0.mixer.dt_proj",)}, "raw weight"),
        ("mamba", {"hpd_rank": 10_000}, "out of range"),
        ("mamba", {"hpd_factor": "hadamard", "hpd_rank": 4}, "cannot be combined"),
        ("mamba", {"hpd_layers": ("auto",)}, "no tokenizer"),
    ],
)
def test_bad_input_is_one_line_cim_error(model_type: str, options: dict, message: str) -> None:
    with pytest.raises(CimError, match=message) as info:
        _apply(build_tiny(model_type), **options)
    assert "\n" not in str(info.value)


def test_apply_hpd_rejects_unknown_factor() -> None:
    model = build_tiny("mamba")
    with pytest.raises(CimError, match="unknown hpd_factor"):
        apply_hpd(model, get_adapter(model.config), ["backbone.layers.1.mixer.out_proj"], "svd")


@pytest.mark.parametrize(("override", "unit"), [((), "analog"), (("--analog", "lm_head"), "analog"),
                                                (("--digital", "lm_head"), "digital")])  # fmt: skip
def test_convert_lm_head_split_places_factors(tmp_path, override, unit) -> None:
    """End to end: the analog factor of a split LM head follows the method, and user overrides win."""
    _, src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "out"
    main([str(src), "--profile", "chipA", "--method", "hpd", "--hpd-layers", "lm_head", "-o", str(out),
          "--no-onnx", "--json", *override])  # fmt: skip
    units = {t["name"]: t["unit"] for t in json.loads((out / "manifest.json").read_text())["tensors"]}
    assert units["lm_head.analog.weight"] == unit
    assert units["lm_head.digital.weight"] == "digital"
