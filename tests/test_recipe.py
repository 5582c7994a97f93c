"""Recipes: ordered method steps recorded in the manifest, replayed via `cimconvert recipe OUT`; bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from reliability_helpers import DEMO_OLMOE, RunCli, edit_manifest
from tiny_models import VOCAB, build_tiny, save_tiny

from cimconvert import api
from cimconvert.arch import get_adapter
from cimconvert.checkpoint import SourceCheckpoint
from cimconvert.errors import CimError
from cimconvert.methods import AUTO, METHODS, MethodOption, MethodResult, defaults, register_method
from cimconvert.methods.hpd import HpdLinear
from cimconvert.placement import model_placement, plan_model, replan_model
from cimconvert.profiles import load_profile
from cimconvert.recipe import (
    Recipe,
    dump_recipe,
    load_recipe,
    method_recipe,
    recipe_label,
    resolve_recipe,
    run_recipe,
)
from cimconvert.validate import validate

SPLIT = "backbone.layers.1.mixer.out_proj"
KEPT = "backbone.layers.0.mixer.in_proj"
#: ROMER settings small enough for a test (one calibration draw, four short sequences)
ROMER_FAST = {"calib_seeds": 1, "calib_samples": 4, "calib_seq_len": 32}
MAMBA_STEPS = [
    {"step": "hpd", "options": {"hpd_layers": [SPLIT]}},
    {"step": "keep_digital", "options": {"patterns": [KEPT]}},
]
MOE_STEPS = [
    {"step": "romer", "options": {**ROMER_FAST, "replace_bottom": 1, "replacement": "replicate_split"}},
    {"step": "keep_digital", "options": {"patterns": ["model.layers.1.mlp.experts"]}},
]


def _write(path: Path, data: Any) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text(encoding="utf-8"))


def _tensor_digests(out: Path) -> dict[str, str]:
    """Tensor sha256s and the sha256 of every safetensors shard (the bytes a chip loads)."""
    data = _manifest(out)
    shards = {f["name"]: f["sha256"] for f in data["files"] if f["name"].endswith(".safetensors")}
    return {**{t["name"]: t["sha256"] for t in data["tensors"]}, **shards}


def _convert(run_cli: RunCli, model: Path, out: Path, *args: str) -> dict[str, Any]:
    code, stdout, stderr = run_cli("convert", str(model), "-p", "chipA", "-o", str(out), "--json", *args)
    assert code == 0, stderr
    return json.loads(stdout)


@pytest.fixture(scope="module")
def mamba(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny("mamba", tmp_path_factory.mktemp("src") / "mamba")[1]


# ------------------------------------------------------------------------------------ round trips
def test_two_step_recipe_recorded_and_replayed(run_cli: RunCli, mamba: Path, tmp_path: Path) -> None:
    """hpd then keep_digital: recorded in order (defaults, seeds), placed, replayed bit for bit."""
    first = tmp_path / "first"
    res = _convert(
        run_cli,
        mamba,
        first,
        "--recipe",
        str(_write(tmp_path / "r.yaml", {"steps": MAMBA_STEPS})),
        "--seed",
        "5",
        "--no-onnx",
    )
    assert res["method"] == "hpd+keep_digital" and res["transforms"] == ["hpd_split"]
    assert list(res["method_report"]) == ["1:hpd", "2:keep_digital"]
    recipe = _manifest(first)["recipe"]
    assert (recipe["family"], recipe["model_type"]) == ("ssm", "mamba")
    assert [s["step"] for s in recipe["steps"]] == ["hpd", "keep_digital"]
    assert recipe["steps"][0]["options"] == {
        "hpd_layers": [SPLIT],
        "hpd_factor": "us_v",
        "hpd_rank": None,
        "hpd_scan": None,
        "hpd_auto_top": 1,
    }
    assert [s["seed"] for s in recipe["steps"]] == [5, 5]
    units = {t["name"]: t["unit"] for t in _manifest(first)["tensors"]}
    assert units[f"{KEPT}.weight"] == "digital" and units[f"{SPLIT}.analog.weight"] == "analog"
    code, stdout, _ = run_cli("inspect", str(first))
    assert code == 0 and "recipe     hpd+keep_digital" in stdout
    code, stdout, _ = run_cli("recipe", str(first), "-o", str(tmp_path / "replay.yaml"))
    assert code == 0 and "wrote" in stdout
    assert load_recipe(tmp_path / "replay.yaml").model_dump(mode="json") == recipe
    second = tmp_path / "second"
    _convert(run_cli, mamba, second, "--recipe", str(tmp_path / "replay.yaml"), "--seed", "5", "--no-onnx")
    assert _manifest(second)["transforms"] == _manifest(first)["transforms"]
    assert _tensor_digests(second) == _tensor_digests(first)


def test_loaded_two_step_bundle_reproduces_the_clean_model(
    run_cli: RunCli, mamba: Path, tmp_path: Path
) -> None:
    """load_bundle re-applies the HPD split; the placement-only step changes no weight."""
    out = tmp_path / "out"
    _convert(
        run_cli, mamba, out, "--recipe", str(_write(tmp_path / "r.yaml", {"steps": MAMBA_STEPS})), "--no-onnx"
    )
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = build_tiny("mamba")(input_ids=ids).logits
        got = api.load_bundle(out)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_romer_then_keep_digital_on_moe_replays(run_cli: RunCli, tmp_path: Path) -> None:
    """ROMER then keep_digital on a MoE: experts of layer 1 digital, transforms and bytes replayed."""
    recipe = _write(tmp_path / "moe.yaml", {"family": "moe", "steps": MOE_STEPS})
    first, second = tmp_path / "first", tmp_path / "second"
    _convert(run_cli, DEMO_OLMOE, first, "--recipe", str(recipe), "--seed", "2", "--no-onnx")
    data = _manifest(first)
    assert [s["step"] for s in data["recipe"]["steps"]] == ["romer", "keep_digital"]
    assert data["recipe"]["steps"][0]["options"]["replace_tau"] == 0.25  # default filled in
    assert {t["type"] for t in data["transforms"]} >= {"romer_replacement"}
    experts = [t for t in data["tensors"] if ".layers.1.mlp.experts." in t["name"]]
    assert experts and {t["unit"] for t in experts} == {"digital"}
    code, stdout, _ = run_cli("recipe", str(first), "--json")
    assert code == 0 and json.loads(stdout) == data["recipe"]
    (tmp_path / "replay.json").write_text(stdout, encoding="utf-8")
    _convert(
        run_cli, DEMO_OLMOE, second, "--recipe", str(tmp_path / "replay.json"), "--seed", "2", "--no-onnx"
    )
    assert _manifest(second)["transforms"] == data["transforms"]
    assert _tensor_digests(second) == _tensor_digests(first)


def test_method_flag_equals_its_one_step_recipe(run_cli: RunCli, mamba: Path, tmp_path: Path) -> None:
    by_flag, by_recipe = tmp_path / "flag", tmp_path / "recipe"
    _convert(
        run_cli, mamba, by_flag, "--method", "hpd", "--hpd-layers", SPLIT, "--hpd-rank", "4", "--no-onnx"
    )
    one_step = {"steps": [{"step": "hpd", "options": {"hpd_layers": [SPLIT], "hpd_rank": 4}}]}
    _convert(run_cli, mamba, by_recipe, "--recipe", str(_write(tmp_path / "r.yaml", one_step)), "--no-onnx")
    a, b = _manifest(by_flag), _manifest(by_recipe)
    for data in (a, b):
        data.pop("created")
        data["files"] = [f for f in data["files"] if f["name"] != "REPORT.md"]  # it prints the time
    assert a == b


def test_auto_resolves_per_family_to_the_recorded_recipe(
    run_cli: RunCli, mamba: Path, tmp_path: Path
) -> None:
    dry = api.convert(str(mamba), "chipA", method="auto", dry_run=True, progress=False)
    assert dry["method"] == "hpd" and [s["step"] for s in dry["recipe"]["steps"]] == ["hpd"]
    _convert(run_cli, mamba, tmp_path / "ssm", "--no-onnx")
    assert _manifest(tmp_path / "ssm")["recipe"] == dry["recipe"]
    moe = api.convert(str(DEMO_OLMOE), "chipA", dry_run=True, progress=False, method_options=ROMER_FAST)
    assert [s["step"] for s in moe["recipe"]["steps"]] == ["outlier_channels", "output_correction"]
    assert all(s["options"]["calib_samples"] == 4 for s in moe["recipe"]["steps"])  # flags reach the steps
    _, llama = save_tiny("llama", tmp_path / "llama")  # no tokenizer: auto skips the calibration steps
    _convert(run_cli, llama, tmp_path / "dense", "--no-onnx")
    dense = _manifest(tmp_path / "dense")
    assert dense["recipe"] == {"schema_version": 1, "family": "dense", "model_type": "llama", "steps": []}
    assert dense["extra"]["auto_skipped"] == ["outlier_channels", "output_correction"]


def test_auto_recipes_are_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults are data (methods/defaults.py); a family's default may hold several steps."""
    assert AUTO["dense"] == defaults.DENSE and AUTO["moe"] == defaults.MOE
    assert AUTO["ssm"] == [{"step": "hpd"}]
    monkeypatch.setitem(
        AUTO, "ssm", [{"step": "hpd"}, {"step": "keep_digital", "options": {"patterns": [KEPT]}}]
    )
    recipe = method_recipe("auto", {"hpd_rank": 2}, "ssm")
    assert recipe_label(recipe) == "hpd+keep_digital" and recipe.steps[0].options == {"hpd_rank": 2}


def test_empty_recipe_streams_without_loading(
    run_cli: RunCli, mamba: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the empty recipe must not materialise the model")

    monkeypatch.setattr(SourceCheckpoint, "load_model", refuse)
    _convert(run_cli, mamba, tmp_path / "none", "--method", "none", "--no-onnx")
    res = _convert(
        run_cli,
        mamba,
        tmp_path / "empty",
        "--recipe",
        str(_write(tmp_path / "r.yaml", {"steps": []})),
        "--no-onnx",
    )
    assert res["method"] == "none" and _manifest(tmp_path / "empty")["recipe"]["steps"] == []


def test_two_step_bundle_exports_onnx_and_validates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    recipe = Recipe.model_validate({"steps": MAMBA_STEPS})
    api.convert(str(DEMO_OLMOE.parent / "tiny-mamba"), "chipA", out=out, recipe=recipe, progress=False)
    assert (out / "onnx" / "model.onnx").is_file()
    res = validate(out, None, seeds=1, max_tokens=256, seq_len=32)
    assert res["summary"]["passed"]


@pytest.mark.slow
def test_three_steps_with_two_methods_reload_in_order(tmp_path: Path) -> None:
    """HPD, ROMER (on the split model's placement), HPD again: transforms recorded and re-applied in
    order; the ONNX graph validates."""
    steps = [
        {"step": "hpd", "options": {"hpd_layers": ["model.layers.0.self_attn.o_proj"]}},
        {"step": "romer", "options": {**ROMER_FAST, "replacement": "replicate_split", "replace_bottom": 1}},
        {"step": "hpd", "options": {"hpd_layers": ["model.layers.1.self_attn.o_proj"]}, "seed": 7},
    ]
    out = tmp_path / "out"
    res = api.convert(str(DEMO_OLMOE), "chipA", out=out, recipe=Recipe.model_validate({"steps": steps}),
                      progress=False)  # fmt: skip
    assert res["transforms"] == ["hpd_split", "romer_replacement", "romer_routing", "hpd_split"]
    assert [s["seed"] for s in _manifest(out)["recipe"]["steps"]] == [0, 0, 7]
    model = api.load_bundle(out)
    assert all(isinstance(layer.self_attn.o_proj, HpdLinear) for layer in model.model.layers[:2])
    assert validate(out, None, seeds=1, max_tokens=256, seq_len=32)["summary"]["passed"]


# ------------------------------------------------------------------------------------ the runner
def test_run_recipe_places_between_steps() -> None:
    """Step 2 sees step 1's tensors: keep_digital naming the split layer moves its analog factor."""
    model = build_tiny("mamba")
    chip = load_profile("chipA")
    recipe = resolve_recipe(
        Recipe.model_validate(
            {"steps": [MAMBA_STEPS[0], {"step": "keep_digital", "options": {"patterns": [SPLIT]}}]}
        ),
        "mamba",
        "ssm",
        0,
    )
    result, placement = run_recipe(
        model, get_adapter(model.config), chip, recipe, plan_model(model, chip), False
    )
    assert list(result.report) == ["1:hpd", "2:keep_digital"]
    assert placement.get(f"{SPLIT}.analog.weight").unit == "digital"
    assert placement.overrides["digital"][-1] == SPLIT
    assert model_placement(model, placement, chip).get(f"{SPLIT}.analog.weight").unit == "digital"


def test_replan_model_keeps_recorded_units_and_places_new_tensors() -> None:
    model = build_tiny("mamba")
    chip = load_profile("chipA")
    before = plan_model(model, chip, digital=[KEPT])
    METHODS["hpd"].apply(model, get_adapter(model.config), chip, {"hpd_layers": (SPLIT,)}, progress=False)
    after = replan_model(model, before, chip, analog=[f"{SPLIT}.analog.weight"])
    assert after.get(f"{KEPT}.weight").unit == "digital"  # the user's override is kept
    assert after.get(f"{SPLIT}.analog.weight").unit == "analog"
    assert after.get(f"{SPLIT}.digital.weight").unit == "digital"
    with pytest.raises(CimError, match=r"'nothing\.here' matches no tensor"):
        replan_model(model, after, chip, digital=["nothing.here"])


def test_a_newly_registered_method_is_a_recipe_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method registered by a new module is a step with no change to the recipe code."""

    class Probe:
        name, families = "probe", ("ssm",)
        options = (MethodOption("probe_level", int, 1, "level", minimum=0, maximum=3),)

        def apply(self, model, adapter, profile, options, progress=True, placement=None) -> MethodResult:
            return MethodResult(report={"level": options["probe_level"], "seed": options["seed"]})

    monkeypatch.setitem(METHODS, "probe", None)  # removed again after the test
    register_method(Probe())
    recipe = resolve_recipe(
        Recipe.model_validate({"steps": [{"step": "probe", "seed": 9}]}), "mamba", "ssm", 0
    )
    model = build_tiny("mamba")
    chip = load_profile("chipA")
    result, _ = run_recipe(model, get_adapter(model.config), chip, recipe, plan_model(model, chip), False)
    assert result.report == {"1:probe": {"level": 1, "seed": 9}}


# ------------------------------------------------------------------------------------ bad input
BAD_RECIPES = [
    ({"steps": [{"step": "romr"}]}, "unknown recipe step 'romr' (available: "),
    (
        {"steps": [{"step": "hpd", "options": {"hpd_rnk": 2}}]},
        "recipe step 1 (hpd): unknown option 'hpd_rnk'",
    ),
    ({"steps": [{"step": "hpd", "options": {"hpd_rank": "two"}}]}, "option 'hpd_rank' expects a int"),
    ({"steps": [{"step": "hpd", "options": {"hpd_rank": 0}}]}, "option 'hpd_rank' must be >= 1"),
    ({"steps": [{"step": "hpd", "options": {"hpd_factor": "svd"}}]}, "option 'hpd_factor' must be one of"),
    (
        {"steps": [{"step": "romer"}]},
        "recipe step 1 (romer): method 'romer' applies to moe models, not to a ssm model",
    ),
    ({"model_type": "llama", "steps": []}, "made for model_type 'llama', not for 'mamba'"),
    ({"family": "moe", "steps": []}, "made for moe models, not for a ssm model"),
    (
        {"steps": [{"step": "keep_digital", "options": {"patterns": ["no.such.layer"]}}]},
        "recipe step 1 (keep_digital): --digital 'no.such.layer' matches no tensor",
    ),
    ({"steps": [{"step": "keep_analog"}]}, "keep_analog: option 'patterns' names no tensor"),
    ({"steps": [{"step": "hpd", "option": {}}]}, "field 'steps.0.option'"),
    ([{"step": "hpd"}], "a recipe is a mapping"),
]


@pytest.mark.parametrize(("data", "message"), BAD_RECIPES)
def test_bad_recipe_is_one_line_exit_2_nothing_written(
    run_cli: RunCli, mamba: Path, tmp_path: Path, data: Any, message: str
) -> None:
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(
        str(mamba),
        "-p",
        "chipA",
        "-o",
        str(out),
        "--no-onnx",
        "--recipe",
        str(_write(tmp_path / "r.yaml", data)),
    )
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "hpd"), "--recipe cannot be combined with --method hpd"),
        (("--hpd-rank", "2"), "--recipe cannot be combined with method options (--hpd-rank)"),
        (("--recipe", "missing.yaml"), "recipe file not found"),
    ],
)
def test_recipe_flag_conflicts(
    run_cli: RunCli, mamba: Path, tmp_path: Path, args: tuple, message: str
) -> None:
    recipe = _write(tmp_path / "r.yaml", {"steps": []})
    out = tmp_path / "out"
    code, _, stderr = run_cli(str(mamba), "-p", "chipA", "-o", str(out), "--recipe", str(recipe), *args)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and message in stderr, stderr
    assert not out.exists()


def test_bad_yaml_and_method_flag_ranges(run_cli: RunCli, mamba: Path, tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("steps: [\n", encoding="utf-8")
    with pytest.raises(CimError, match="malformed YAML"):
        load_recipe(tmp_path / "bad.yaml")
    code, _, stderr = run_cli(
        str(mamba), "-p", "chipA", "-o", str(tmp_path / "o"), "--method", "hpd", "--hpd-rank", "0"
    )
    assert code == 2 and "--hpd-rank" in stderr and not (tmp_path / "o").exists()
    option = MethodOption("tau", float, 0.5, "t", minimum=0.0, maximum=1.0)
    assert option.check(1, "x") == 1.0
    with pytest.raises(CimError, match="x: option 'tau' must be <= 1"):
        option.check(2, "x")
    with pytest.raises(CimError, match="expects a float"):
        option.check(True, "x")


def test_recipe_of_a_bundle_written_before_recipes(run_cli: RunCli, mamba: Path, tmp_path: Path) -> None:
    """Such manifests still load; `cimconvert recipe` rebuilds theirs from extra.method/method_options."""
    out = tmp_path / "old"
    _convert(run_cli, mamba, out, "--method", "none", "--no-onnx")

    def as_old_hpd(data: dict[str, Any]) -> None:
        data.pop("recipe")
        data["extra"] = {"method": "hpd", "method_options": {"hpd_layers": [SPLIT], "hpd_rank": 2, "seed": 4}}

    edit_manifest(out, as_old_hpd)
    assert api.inspect(out)["verified"] and api.inspect(out)["recipe"] is None
    assert "recipe     not recorded" in run_cli("inspect", str(out))[1]
    api.load_bundle(out)
    assert api.recipe_of(out) == {"schema_version": 1, "family": "ssm", "model_type": "mamba",
                                  "steps": [{"step": "hpd", "options": {"hpd_layers": [SPLIT], "hpd_rank": 2},
                                             "seed": 4}]}  # fmt: skip
    edit_manifest(out, lambda data: data.update(extra={}))
    code, _, stderr = run_cli("recipe", str(out))
    assert code == 2 and "records no recipe and no method" in stderr
    code, _, stderr = run_cli("recipe", str(tmp_path / "absent"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    recipe = resolve_recipe(Recipe.model_validate({"steps": MAMBA_STEPS}), "mamba", "ssm", 3)
    for name in ("r.yaml", "r.json"):
        assert load_recipe(dump_recipe(recipe, tmp_path / name)) == recipe
    with pytest.raises(CimError, match="cannot write recipe"):
        dump_recipe(recipe, tmp_path / "no" / "such" / "r.yaml")
