"""Placement is decided once and read back: every consumer of a bundle takes the units from the manifest's
per-tensor list (never from the rules), and an in-memory model gets its units from the plan it loaded from."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cimconvert import api
from cimconvert.arch import get_adapter
from cimconvert.bundle.reader import placement_from_manifest, read_manifest
from cimconvert.errors import CimError, ModelInputError
from cimconvert.finetune.trainer import finetune
from cimconvert.methods.romer.method import METHOD as ROMER
from cimconvert.onnx.export import export_bundle_onnx
from cimconvert.placement import (
    Placement,
    model_placement,
    plan_model,
    plan_tensors,
    replan_tensors,
)
from cimconvert.profiles import load_profile
from cimconvert.validate import placement_targets

sys.path.insert(0, str(Path(__file__).parent))
from reliability_helpers import edit_manifest
from tiny_models import build_tiny, read_shapes, save_tiny, tiny_types

DEMO = Path(__file__).resolve().parent.parent / "examples" / "models"
CHIP_A = load_profile("chipA")
#: An analog tensor of tiny-mamba that the bundle below records as digital (the rules make it analog).
FLIPPED = "backbone.layers.0.mixer.in_proj.weight"


def _flip(placement: Placement, name: str, unit: str) -> Placement:
    """``placement`` with one tensor's unit changed (as a hand-edited manifest would have it)."""
    tensors = tuple(replace(t, unit=unit) if t.name == name else t for t in placement.tensors)
    return replace(placement, tensors=tensors)


def _analog(infos: object) -> set[str]:
    return {t.name for t in infos}  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def edited_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-mamba bundle whose manifest records FLIPPED digital although the rules place it analog."""
    out = tmp_path_factory.mktemp("readback") / "bundle"
    api.convert(str(DEMO / "tiny-mamba"), "chipA", out=out, method="none", onnx=False, progress=False)

    def to_digital(data: dict) -> None:
        entry = next(t for t in data["tensors"] if t["name"] == FLIPPED)
        assert entry["unit"] == "analog"
        entry["unit"] = "digital"

    edit_manifest(out, to_digital)
    return out


# ------------------------------------------------------------------ bundle consumers
def test_manifest_reader_returns_the_recorded_units(edited_bundle: Path) -> None:
    manifest = read_manifest(edited_bundle)
    placement = placement_from_manifest(manifest)
    assert placement.get(FLIPPED).unit == "digital"
    assert [t.name for t in placement] == [t.name for t in manifest.tensors]
    assert {t.name for t in placement.analog()} == set(manifest.analog_names())


def test_eval_honours_the_manifest(edited_bundle: Path) -> None:
    net, _, targets, chip = api.load_for_eval(str(edited_bundle), None)
    by_rules = _analog(plan_model(net, chip).analog())
    assert FLIPPED in by_rules  # the rules would make it analog ...
    assert _analog(targets) == by_rules - {FLIPPED}  # ... the bundle says digital, and eval follows it


def test_eval_of_a_bundle_under_another_profile_keeps_its_placement(edited_bundle: Path) -> None:
    *_, targets, chip = api.load_for_eval(str(edited_bundle), "chipB")
    assert chip.name == "chipB" and FLIPPED not in _analog(targets)


def test_validate_and_export_honour_the_manifest(edited_bundle: Path, tmp_path: Path) -> None:
    manifest = read_manifest(edited_bundle)
    net = api.load_bundle(edited_bundle)
    expected = _analog(plan_model(net, CHIP_A).analog()) - {FLIPPED}
    assert _analog(placement_targets(net, manifest)) == expected
    copy = tmp_path / "bundle"
    shutil.copytree(edited_bundle, copy)
    exported = export_bundle_onnx(copy, net, manifest)
    assert set(exported["onnx"]["analog_tensors"]) == expected


def test_finetune_of_a_bundle_honours_the_manifest(edited_bundle: Path) -> None:
    tokens = torch.randint(0, 64, (512,))
    manifest = read_manifest(edited_bundle)
    res = finetune(str(edited_bundle), "chipA", data=tokens, steps=1, batch_size=1, seq_len=32,
                   progress=False)  # fmt: skip
    assert res["analog_tensors"] == len(manifest.analog_names())
    with pytest.raises(CimError, match="placement is fixed"):
        finetune(str(edited_bundle), "chipA", data=tokens, steps=1, digital=["lm_head"], progress=False)


# ------------------------------------------------------------------ in-memory models
@pytest.mark.parametrize("model_type", tiny_types())
def test_model_placement_of_a_plan_on_disk_equals_the_plan_in_memory(model_type: str, tmp_path: Path) -> None:
    """The on-disk plan (per-expert keys) mapped onto the loaded model gives exactly the in-memory plan."""
    model, folder = save_tiny(model_type, tmp_path / model_type)
    adapter = get_adapter(model_type)
    tied = adapter.tied_embeddings(model.config)
    on_disk = plan_tensors(read_shapes(folder), adapter, CHIP_A, tied_lm_head=tied)
    mapped = model_placement(model, on_disk, CHIP_A)
    planned = plan_model(model, CHIP_A)
    fields = ("name", "unit", "kind", "layout", "shape", "tiles", "tile_grid", "aliases")
    rows = [[[getattr(t, f) for f in fields] for t in p] for p in (mapped, planned)]
    assert rows[0] == rows[1]


def test_model_placement_follows_the_given_units_not_the_rules() -> None:
    model = build_tiny("qwen2_moe")
    router = "model.layers.1.mlp.gate.weight"
    planned = plan_model(model, CHIP_A)
    assert planned.get(router).unit == "digital"
    assert model_placement(model, _flip(planned, router, "analog"), CHIP_A).get(router).unit == "analog"


def test_experts_placed_on_two_units_are_refused(tmp_path: Path) -> None:
    model, folder = save_tiny("olmoe", tmp_path / "olmoe")
    on_disk = plan_tensors(read_shapes(folder), get_adapter("olmoe"), CHIP_A)
    one_expert = next(t.name for t in on_disk.analog() if t.name != t.memory_name)
    with pytest.raises(ModelInputError, match="both analog and digital"):
        model_placement(model, _flip(on_disk, one_expert, "digital"), CHIP_A)


def test_romer_uses_the_conversion_placement() -> None:
    """ROMER given a placement calibrates with its analog tensors, not with a plan of its own."""
    model = build_tiny("olmoe")
    router = "model.layers.0.mlp.gate.weight"
    placement = _flip(plan_model(model, CHIP_A), router, "analog")
    options = {o.name: o.default for o in ROMER.options}
    tokens = torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    options.update(calib_seeds=1, calib_tokens=tokens)
    res = ROMER.apply(model, get_adapter("olmoe"), CHIP_A, options, progress=False, placement=placement)
    assert res.report["router_analog"] and res.report["analog_tensors"] == len(placement.analog())


# ------------------------------------------------------------------ a method's rewritten checkpoint
def test_replan_keeps_planned_units_and_places_only_new_tensors() -> None:
    adapter = get_adapter("llama")
    shapes = {"model.layers.0.mlp.up_proj.weight": (64, 32), "model.layers.0.mlp.down_proj.weight": (32, 64)}
    planned = _flip(plan_tensors(shapes, adapter, CHIP_A), "model.layers.0.mlp.up_proj.weight", "digital")
    rewritten = {**shapes, "lm_head.analog.weight": (128, 32), "lm_head.digital.weight": (32, 32)}
    placement = replan_tensors(planned, rewritten, adapter, CHIP_A, analog=["lm_head.analog.weight"])
    kept = placement.get("model.layers.0.mlp.up_proj.weight")
    assert kept.unit == "digital"  # as planned, though the rules place it analog
    assert placement.get("lm_head.analog.weight").unit == "analog"
    assert placement.get("lm_head.digital.weight").unit == "digital"
    assert placement.overrides["analog"] == ("lm_head.analog.weight",)
    with pytest.raises(ModelInputError, match="matches no tensor"):
        replan_tensors(planned, rewritten, adapter, CHIP_A, analog=["lm_head.nothing.weight"])
