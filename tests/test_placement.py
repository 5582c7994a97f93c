"""Placement: profile defaults, --analog/--digital overrides, tile counts, totals, and agreement of the
in-memory (fused experts) and on-disk (per-expert keys) views for every tiny model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, build_tiny, read_shapes, save_tiny, tiny_types

from cimconvert.arch import build_model, get_adapter, load_config
from cimconvert.errors import ModelInputError
from cimconvert.placement import Placement, plan_model, plan_tensors
from cimconvert.profiles import load_profile
from cimconvert.profiles.schema import ChipProfile, MappingSpec, PlacementDefaults

CHIP_A = load_profile("chipA")
CHIP_B = load_profile("chipB")
ALL_ANALOG = ChipProfile(name="all-analog", placement=PlacementDefaults(digital=[]))
LLAMA = get_adapter("llama")


@pytest.fixture(scope="module")
def qwen2_moe() -> torch.nn.Module:
    return build_tiny("qwen2_moe")


def units(placement: Placement) -> dict[str, str]:
    return {t.name: t.unit for t in placement}


# ------------------------------------------------------------------ defaults
def test_chip_a_defaults(qwen2_moe: torch.nn.Module) -> None:
    placement = plan_model(qwen2_moe, CHIP_A)
    by_kind: dict[str, set[str]] = {}
    for info in placement:
        by_kind.setdefault(info.kind, set()).add(info.unit)
    assert by_kind["lm_head"] == by_kind["router"] == by_kind["shared_expert_gate"] == {"digital"}
    assert (
        by_kind["expert"] == by_kind["shared_expert"] == by_kind["attention"] == by_kind["mlp"] == {"analog"}
    )
    assert by_kind["embedding"] == by_kind["norm"] == by_kind["bias"] == {"digital"}
    router = placement.get("model.layers.1.mlp.gate.weight")
    assert router.tiles == 0 and router.tile_grid == (0, 0) and "profile" in router.reason


def test_profile_without_digital_kinds_puts_router_and_lm_head_on_tiles(qwen2_moe: torch.nn.Module) -> None:
    placement = units(plan_model(qwen2_moe, ALL_ANALOG))
    assert placement["model.layers.1.mlp.gate.weight"] == "analog"
    assert placement["lm_head.weight"] == "analog"
    assert placement["model.embed_tokens.weight"] == "digital"


# ----------------------------------------------------------------- overrides
def test_exact_regex_and_module_overrides(qwen2_moe: torch.nn.Module) -> None:
    placement = units(
        plan_model(
            qwen2_moe,
            CHIP_A,
            analog=["re:.*mlp\\.gate\\.weight"],
            digital=[
                "model.layers.0.self_attn.q_proj.weight",
                "re:.*\\.o_proj\\.weight",
                "model.layers.1.mlp.experts",
            ],
        )
    )
    assert placement["model.layers.1.mlp.gate.weight"] == "analog"
    assert placement["model.layers.0.self_attn.q_proj.weight"] == "digital"
    assert placement["model.layers.1.self_attn.q_proj.weight"] == "analog"
    assert (
        placement["model.layers.0.self_attn.o_proj.weight"]
        == placement["model.layers.1.self_attn.o_proj.weight"]
    )
    assert placement["model.layers.0.self_attn.o_proj.weight"] == "digital"
    assert placement["model.layers.1.mlp.experts.gate_up_proj"] == "digital"
    assert placement["model.layers.1.mlp.experts.down_proj"] == "digital"


def test_plain_pattern_is_a_regex_when_not_a_name(qwen2_moe: torch.nn.Module) -> None:
    placement = units(plan_model(qwen2_moe, CHIP_A, digital=[r"model\.layers\.1\.self_attn\..*"]))
    assert placement["model.layers.1.self_attn.k_proj.weight"] == "digital"
    assert placement["model.layers.0.self_attn.k_proj.weight"] == "analog"


def test_digital_wins_over_analog(qwen2_moe: torch.nn.Module) -> None:
    name = "model.layers.1.mlp.shared_expert.up_proj.weight"
    placement = plan_model(qwen2_moe, CHIP_A, analog=[name], digital=["re:.*shared_expert\\..*"])
    assert placement.get(name).unit == "digital" and placement.get(name).reason.startswith("--digital")


def test_override_matching_nothing_is_an_error(qwen2_moe: torch.nn.Module) -> None:
    with pytest.raises(ModelInputError, match="matches no tensor"):
        plan_model(qwen2_moe, CHIP_A, digital=["model.layers.9.self_attn.q_proj.weight"])
    with pytest.raises(ModelInputError, match="matches no tensor"):
        plan_model(qwen2_moe, CHIP_A, analog=["re:.*\\.q_porj\\..*"])
    with pytest.raises(ModelInputError, match="invalid regular expression"):
        plan_model(qwen2_moe, CHIP_A, analog=["re:(unclosed"])


def test_forcing_digital_only_tensors_analog(qwen2_moe: torch.nn.Module) -> None:
    with pytest.raises(ModelInputError, match=r"kind embedding\) cannot be analog"):
        plan_model(qwen2_moe, CHIP_A, analog=["model.embed_tokens.weight"])
    with pytest.raises(ModelInputError, match="only digital-only tensors"):
        plan_model(qwen2_moe, CHIP_A, analog=["re:.*layernorm\\.weight"])
    # a regex that also hits matmuls skips the digital-only tensors it matches
    placement = units(plan_model(qwen2_moe, CHIP_A, analog=["re:model\\.layers\\.1\\..*"]))
    assert placement["model.layers.1.mlp.gate.weight"] == "analog"
    assert placement["model.layers.1.input_layernorm.weight"] == "digital"


def test_in_memory_names_select_on_disk_keys(tmp_path: Path) -> None:
    _, folder = save_tiny("mixtral", tmp_path / "mixtral")
    shapes = read_shapes(folder)
    placement = plan_tensors(
        shapes,
        get_adapter("mixtral"),
        CHIP_A,
        analog=["model.layers.0.mlp.gate.weight"],
        digital=["model.layers.1.mlp.experts.gate_up_proj"],
    )
    got = units(placement)
    assert got["model.layers.0.block_sparse_moe.gate.weight"] == "analog"
    assert got["model.layers.1.block_sparse_moe.gate.weight"] == "digital"
    assert got["model.layers.1.block_sparse_moe.experts.2.w1.weight"] == "digital"
    assert got["model.layers.1.block_sparse_moe.experts.2.w3.weight"] == "digital"
    assert got["model.layers.1.block_sparse_moe.experts.2.w2.weight"] == "analog"


# ---------------------------------------------------------------------- tiles
def test_tile_counts() -> None:
    shapes = {
        "model.layers.0.mlp.down_proj.weight": (1000, 700),
        "model.layers.0.mlp.up_proj.weight": (512, 512),
        "model.layers.0.mlp.gate_proj.weight": (513, 100),
    }
    placement = plan_tensors(shapes, LLAMA, CHIP_A)
    assert placement.get("model.layers.0.mlp.down_proj.weight").tile_grid == (2, 2)
    assert placement.get("model.layers.0.mlp.down_proj.weight").tiles == 4
    assert placement.get("model.layers.0.mlp.up_proj.weight").tiles == 1
    assert placement.get("model.layers.0.mlp.gate_proj.weight").tile_grid == (1, 2)
    chip_b = plan_tensors(shapes, LLAMA, CHIP_B)  # 256 x 256 tiles
    assert chip_b.get("model.layers.0.mlp.down_proj.weight").tile_grid == (3, 4)
    custom = ChipProfile(name="tall", mapping=MappingSpec(tile_rows=1024, tile_cols=128))
    assert plan_tensors(shapes, LLAMA, custom).get("model.layers.0.mlp.down_proj.weight").tile_grid == (1, 8)


def test_fused_experts_and_conv1d_tiles() -> None:
    experts = plan_tensors(
        {"model.layers.0.mlp.experts.down_proj": (8, 1000, 700)}, get_adapter("olmoe"), CHIP_A
    )
    info = experts.get("model.layers.0.mlp.experts.down_proj")
    assert info.tile_grid == (2, 2) and info.tiles == 32 and info.matrix_shape == (1000, 700)
    conv = plan_tensors({"transformer.h.0.mlp.c_fc.weight": (700, 1000)}, get_adapter("gpt2"), CHIP_A)
    info = conv.get("transformer.h.0.mlp.c_fc.weight")
    assert info.layout == "in_out" and info.tile_grid == (2, 2) and info.matrix_shape == (1000, 700)


def test_totals_table_and_json(qwen2_moe: torch.nn.Module) -> None:
    placement = plan_model(qwen2_moe, CHIP_A)
    totals = placement.totals()
    analog = placement.analog()
    assert totals["analog_tensors"] == len(analog) and totals["tensors"] == len(placement)
    assert totals["analog_tiles"] == sum(t.tiles for t in analog) > 0
    assert totals["analog_params"] + totals["digital_params"] == sum(
        p.numel() for p in qwen2_moe.parameters()
    )
    assert totals["digital_bytes"] == 4 * totals["digital_params"]
    assert totals["by_kind"]["router"] == {"analog": 0, "digital": 2 - 1, "params": 4 * 32}
    rows = placement.table()
    assert set(rows[0]) == {"tensor", "unit", "kind", "shape", "tiles", "bytes"}
    text = placement.format_table()
    assert text.splitlines()[0].split() == ["tensor", "unit", "kind", "shape", "tiles", "bytes"]
    assert f"{totals['analog_tiles']} tiles of 512x512" in text
    assert json.loads(json.dumps(placement.to_json()))[0]["name"] == "model.embed_tokens.weight"


def test_dtype_bytes_from_headers() -> None:
    @dataclass
    class Meta:
        shape: tuple[int, ...]
        dtype: str

    placement = plan_tensors({"model.layers.0.mlp.up_proj.weight": Meta((64, 32), "BF16")}, LLAMA, CHIP_A)
    assert placement.get("model.layers.0.mlp.up_proj.weight").nbytes == 64 * 32 * 2
    model = build_tiny("llama").to(torch.bfloat16)
    assert plan_model(model, CHIP_A).get("model.norm.weight").nbytes == 32 * 2


# ------------------------------------------------------------ tied lm_head
@pytest.mark.parametrize("model_type", ["mamba", "gpt2", "llama"])
def test_tied_lm_head_stays_with_the_embedding(model_type: str) -> None:
    config = {**TINY_CONFIGS[model_type], "tie_word_embeddings": True}
    model = build_model(load_config(config), seed=0)
    placement = plan_model(model, CHIP_A)
    assert "lm_head.weight" not in [t.name for t in placement]
    info = placement.get("lm_head.weight")
    assert info.kind == "embedding" and info.unit == "digital" and info.aliases == ("lm_head.weight",)
    with pytest.raises(ModelInputError, match="cannot be analog"):
        plan_model(model, CHIP_A, analog=["lm_head.weight"])


def test_tied_lm_head_on_disk() -> None:
    shapes = {"model.embed_tokens.weight": (128, 32), "lm_head.weight": (128, 32)}
    assert plan_tensors(shapes, LLAMA, ALL_ANALOG).get("lm_head.weight").unit == "analog"
    tied = plan_tensors(shapes, LLAMA, ALL_ANALOG, tied_lm_head=True).get("lm_head.weight")
    assert tied.unit == "digital" and tied.reason == "tied to the embedding"


# ------------------------------------------- in-memory vs on-disk agreement
@pytest.mark.parametrize("model_type", tiny_types())
def test_plan_model_and_plan_tensors_agree(model_type: str, tmp_path: Path) -> None:
    model, folder = save_tiny(model_type, tmp_path / model_type)
    adapter = get_adapter(model_type)
    for profile in (CHIP_A, ALL_ANALOG):
        in_memory = plan_model(model, profile)
        on_disk = plan_tensors(
            read_shapes(folder), adapter, profile, tied_lm_head=adapter.tied_embeddings(model.config)
        )
        assert {t.name for t in in_memory.analog()} == {t.memory_name for t in on_disk.analog()}
        assert {t.memory_name for t in on_disk.digital()} - {t.name for t in in_memory.digital()} <= {
            n for n, _ in model.named_buffers()
        }
        disk_kinds = {t.memory_name: t.kind for t in on_disk}
        assert all(disk_kinds.get(t.name, t.kind) == t.kind for t in in_memory)
