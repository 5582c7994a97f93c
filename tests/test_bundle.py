"""Bundles: layout, index, analog/digital split, manifest (pydantic + JSON Schema), reload to identical
logits, checksums, atomic writes, refusal of non-empty/unwritable outputs, and every registered type."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from safetensors import safe_open
from tiny_models import VOCAB, save_tiny, write_deepseek_v1_folder

import cimconvert.bundle.writer as writer_mod
from cimconvert.arch import get_adapter, supported_types
from cimconvert.bundle import (
    Manifest,
    inspect_bundle,
    load_bundle,
    read_manifest,
    verify_bundle,
    write_bundle,
)
from cimconvert.bundle.manifest import (
    SCHEMA_PATH,
    TensorEntry,
    compact_targets,
    match_target,
    schema_text,
)
from cimconvert.checkpoint import resolve_model
from cimconvert.errors import BundleError
from cimconvert.placement import plan_tensors
from cimconvert.profiles import load_profile
from cimconvert.transforms import TRANSFORM_LOADERS

CHIP = load_profile("chipA")
SMALL_TILES = load_profile("chipA", {"tile": "16"})  # several tiles per matrix on the tiny models


def _convert(src: Path, out: Path, profile=CHIP, **kwargs: Any):
    source = resolve_model(src)
    placement = plan_tensors(source.tensor_shapes(), get_adapter(source.model_type), profile)
    summary = write_bundle(source, out, profile, placement, progress=False, **kwargs)
    return source, placement, summary


def _logits(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path, Path]:
    """(source model, checkpoint folder, bundle folder) of a tiny OLMoE converted with small tiles."""
    root = tmp_path_factory.mktemp("olmoe")
    model, src = save_tiny("olmoe", root / "src")
    _convert(src, root / "bundle", SMALL_TILES, seeds={"global": 7}, extra={"method": "none"})
    return model, src, root / "bundle"


# ------------------------------------------------------------------ JSON Schema
def _schema_validator() -> jsonschema.protocols.Validator:
    """A validator for the committed manifest schema (the schema itself checked against its draft)."""
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return validator_class(schema)


def _tensor_entry(manifest: Manifest, name: str) -> TensorEntry:
    """The manifest entry of one tensor."""
    return next(entry for entry in manifest.tensors if entry.name == name)


def test_committed_schema_is_up_to_date() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        "run: python -c 'from cimconvert.bundle.manifest import write_schema; write_schema()'"
    )


# ------------------------------------------------------------------ layout and manifest
def test_bundle_layout_index_and_split(olmoe) -> None:
    _, src, out = olmoe
    names = {p.name for p in out.iterdir()}
    assert {"manifest.json", "REPORT.md", "config.json", "generation_config.json",
            "model.safetensors.index.json", "cim_scales.safetensors",
            "analog-00001-of-00001.safetensors", "digital-00001-of-00001.safetensors"} <= names  # fmt: skip
    assert not any(n.startswith(".") for n in os.listdir(out.parent))  # no temp folder left
    source = resolve_model(src)
    placement = plan_tensors(source.tensor_shapes(), get_adapter("olmoe"), SMALL_TILES)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source.tensor_shapes())
    assert index["metadata"]["total_size"] == sum(m.nbytes for m in source.tensor_shapes().values())
    for info in placement:
        shard = index["weight_map"][info.name]
        assert shard.startswith(info.unit + "-"), info.name
        with safe_open(str(out / shard), "pt") as handle:
            assert info.name in handle.keys()  # noqa: SIM118
    assert placement.analog() and placement.digital()


def test_manifest_validates_against_model_and_schema(olmoe) -> None:
    _, _src, out = olmoe
    data = json.loads((out / "manifest.json").read_text())
    manifest = Manifest.model_validate(data)
    validator = _schema_validator()
    validator.validate(data)
    broken = {**data, "tensors": [{**data["tensors"][0], "sha256": "not-hex"}, *data["tensors"][1:]]}
    assert not validator.is_valid(broken)  # the schema really constrains the manifest
    assert not validator.is_valid({k: v for k, v in data.items() if k != "files"})
    assert manifest.source.model_type == "olmoe"
    assert manifest.profile.content_hash == SMALL_TILES.content_hash()
    assert manifest.seeds == {"global": 7} and manifest.extra == {"method": "none"}
    assert {f.name for f in manifest.source.files} >= {"config.json", "model.safetensors"}
    listed = {f.name for f in manifest.files}
    assert listed == {p.name for p in out.iterdir()} - {"manifest.json", "bundle.lock"}
    # compressed-tensors-style groups select exactly the analog / digital tensors
    analog = set(manifest.analog_names())
    config = manifest.placement_config
    for entry in manifest.tensors:
        in_analog = any(match_target(t, entry.name) for t in config.config_groups["analog"].targets)
        in_ignore = any(match_target(t, entry.name) for t in config.ignore)
        assert in_analog == (entry.name in analog) and in_ignore == (entry.name not in analog)
    group = manifest.placement_config.config_groups["analog"]
    assert group.params.tile_rows == 16 and group.params.adc_bits == 8 and group.params.g_max == 25.0


def test_scales_are_abs_max_per_channel_and_tile(olmoe) -> None:
    _, src, out = olmoe
    manifest = read_manifest(out)
    # [32, 64]: 4 input tiles
    entry = _tensor_entry(manifest, "model.layers.0.mlp.experts.1.down_proj.weight")
    assert entry.unit == "analog" and entry.tiles == 4
    assert entry.tile_grid is not None and entry.tile_grid.in_sizes == [16, 16, 16, 16]
    with safe_open(str(out / "cim_scales.safetensors"), "pt") as handle:
        assert set(handle.keys()) == set(manifest.analog_names())
        scales = handle.get_tensor(entry.scales_key)
    with safe_open(str(src / "model.safetensors"), "pt") as handle:
        weight = handle.get_tensor(entry.name)
    assert list(scales.shape) == entry.scales_shape == [32, 4]  # per output channel and input tile
    assert torch.equal(scales, weight.abs().reshape(32, 4, 16).amax(dim=2))
    q_proj = _tensor_entry(manifest, "model.layers.0.self_attn.q_proj.weight")  # [32, 32]: 2 input tiles
    assert q_proj.tiles == 2 and q_proj.scales_shape == [32, 2]


def test_scales_file_is_reproducible_and_keeps_its_metadata(olmoe) -> None:
    _, _, out = olmoe
    data = (out / "cim_scales.safetensors").read_bytes()
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert header["__metadata__"]["format"] == "pt" and header["__metadata__"]["granularity"] == "channel"
    with safe_open(str(out / "cim_scales.safetensors"), "pt") as handle:  # still a valid file
        assert handle.metadata()["granularity"] == "channel"
    # safetensors orders its metadata map arbitrarily: every order canonicalises to the same bytes
    tensors = {"b": torch.ones(3), "a": torch.zeros(2, 2)}
    meta = {f"key{i}": str(i) for i in range(12)}
    variants = {
        writer_mod.canonical_safetensors_header(writer_mod.safetensors_bytes(tensors, metadata=meta))
        for _ in range(8)
    }
    assert len(variants) == 1


def test_load_bundle_verify_and_report(olmoe) -> None:
    model, _, out = olmoe
    assert verify_bundle(out) == []
    reloaded = load_bundle(out)
    experts = reloaded.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj, model.model.layers[0].mlp.experts.gate_up_proj)
    assert (_logits(model) - _logits(reloaded)).abs().max().item() <= 1e-5
    summary = inspect_bundle(out)
    assert summary["verified"] is True and summary["model_type"] == "olmoe"
    assert summary["units"]["analog"]["tensors"] == len(read_manifest(out).analog_names())
    report = (out / "REPORT.md").read_text()
    assert "chipA" in report and "| expert | analog |" in report


# ------------------------------------------------------------------ verification failures
def test_altered_byte_fails_verify_and_load(olmoe, tmp_path: Path) -> None:
    _, src, _ = olmoe
    out = tmp_path / "b"
    _convert(src, out)
    shard = out / "analog-00001-of-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    problems = verify_bundle(out)
    assert len(problems) == 1 and shard.name in problems[0]
    with pytest.raises(BundleError, match="failed verification") as info:
        load_bundle(out)
    assert "\n" not in str(info.value)
    assert inspect_bundle(out)["verified"] is False
    (out / "stray.txt").write_text("x")
    assert any("stray.txt" in p for p in verify_bundle(out))


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a cimconvert bundle"):
        read_manifest(tmp_path)


# ------------------------------------------------------------------ atomic writes
def test_non_empty_out_refused_then_replaced_with_force(olmoe, tmp_path: Path) -> None:
    _, src, _ = olmoe
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="not empty") as info:
        _convert(src, out)
    assert "\n" not in str(info.value) and (out / "precious.txt").exists()
    _convert(src, out, force=True)
    assert not (out / "precious.txt").exists() and verify_bundle(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    empty = tmp_path / "empty"
    empty.mkdir()
    _convert(src, empty)  # an empty folder is fine without --force
    assert verify_bundle(empty) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_mid_write_leaves_nothing(olmoe, tmp_path: Path, monkeypatch, exc: BaseException) -> None:
    _, src, _ = olmoe
    calls = {"n": 0}
    original = writer_mod.analog_scales

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return original(*args, **kwargs)

    monkeypatch.setattr(writer_mod, "analog_scales", failing)
    out = tmp_path / "sub" / "out"
    with pytest.raises(type(exc)):
        _convert(src, out)
    assert list(tmp_path.iterdir()) == []  # no OUT, no temp folder, no created parent


def test_failure_with_force_keeps_the_old_bundle(olmoe, tmp_path: Path, monkeypatch) -> None:
    _, src, _ = olmoe
    out = tmp_path / "out"
    _convert(src, out)
    before = (out / "manifest.json").read_bytes()
    monkeypatch.setattr(writer_mod, "_write_index", lambda *a: (_ for _ in ()).throw(OSError(28, "No space")))
    with pytest.raises(BundleError, match="No space"):
        _convert(src, out, force=True)
    assert (out / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unwritable_parent(olmoe, tmp_path: Path) -> None:
    _, src, _ = olmoe
    if os.geteuid() == 0:  # root ignores permission bits: a parent that cannot hold folders at all
        blocker = tmp_path / "blocker"
        blocker.write_text("a file, not a folder")
        target = blocker / "sub" / "out"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    with pytest.raises(BundleError, match="not writable") as info:
        _convert(src, target)
    assert "\n" not in str(info.value)


def test_output_path_is_a_file(olmoe, tmp_path: Path) -> None:
    _, src, _ = olmoe
    (tmp_path / "out").write_text("x")
    with pytest.raises(BundleError, match="not a folder"):
        _convert(src, tmp_path / "out")


# ------------------------------------------------------------------ shards, transforms, targets
def test_shard_rollover_names_and_reload(olmoe, tmp_path: Path) -> None:
    model, src, _ = olmoe
    out = tmp_path / "b"
    _convert(src, out, max_shard_size=40_000)
    analog = sorted(p.name for p in out.glob("analog-*.safetensors"))
    assert len(analog) > 2 and analog[-1] == f"analog-{len(analog):05d}-of-{len(analog):05d}.safetensors"
    assert (_logits(model) - _logits(load_bundle(out))).abs().max().item() <= 1e-5


def test_transforms_are_recorded_and_reapplied(olmoe, tmp_path: Path, monkeypatch) -> None:
    _, src, _ = olmoe
    out = tmp_path / "b"
    transform = {"id": "t0", "type": "test_scale", "params": {"x": 1},
                 "targets": [r"re:model\.layers\.0\.mlp\.gate\.weight"]}  # fmt: skip
    _convert(src, out, transforms=[transform])
    manifest = read_manifest(out)
    assert _tensor_entry(manifest, "model.layers.0.mlp.gate.weight").transform == "t0"
    assert _tensor_entry(manifest, "model.layers.1.mlp.gate.weight").transform is None
    with pytest.raises(BundleError, match="test_scale"):
        load_bundle(out)
    seen = []
    monkeypatch.setitem(TRANSFORM_LOADERS, "test_scale", lambda m, entry, d: seen.append((entry.id, d)))
    load_bundle(out)
    assert seen == [("t0", out)]


def test_compact_targets_never_select_the_other_unit() -> None:
    names = [f"l.{i}.e.{e}.w" for i in range(3) for e in range(4)]
    digital = ["l.1.e.2.w"]
    analog = [n for n in names if n not in digital]
    targets = compact_targets(analog, digital)
    assert {n for n in names if any(match_target(t, n) for t in targets)} == set(analog)
    assert compact_targets(names, []) == [r"re:l\.\d+\.e\.\d+\.w"]


# ------------------------------------------------------------------ every registered architecture
@pytest.mark.parametrize("model_type", supported_types())
def test_every_registered_type_converts_and_reloads(model_type: str, tmp_path: Path) -> None:
    if model_type == "deepseek":
        model, src = write_deepseek_v1_folder(tmp_path / "src")
    else:
        model, src = save_tiny(model_type, tmp_path / "src")
    _source, placement, summary = _convert(src, tmp_path / "out")
    out = tmp_path / "out"
    assert summary.totals["analog_tensors"] == len(placement.analog()) > 0
    assert verify_bundle(out) == []
    diff = (_logits(model) - _logits(load_bundle(out))).abs().max().item()
    assert diff <= 1e-5, f"{model_type}: max |Δlogits| {diff}"
