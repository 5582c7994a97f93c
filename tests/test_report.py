"""The deployment report (REPORT.md, ``inspect``'s ``deployment``): figures checked against counts made
by hand from the tensor shapes, unknown costs stay unknown, one on-disk tensor count, step outcomes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from tiny_models import TINY_CONFIGS, read_shapes, save_tiny

from cimconvert import api
from cimconvert.bundle.costs import TENSOR_COUNT, deployment_figures
from cimconvert.bundle.manifest import Recipe, RecipeStep
from cimconvert.bundle.reader import inspect_bundle, read_manifest
from cimconvert.bundle.report import render_report, step_outcomes
from cimconvert.errors import ProfileError
from cimconvert.methods.romer.core import RomerConfig, RomerPlan
from cimconvert.methods.romer.method import plan_outcome
from cimconvert.profiles import load_profile
from cimconvert.profiles.schema import CostSpec
from cimconvert.transforms.romer.hook import LayerRouting

TILE_IN, TILE_OUT = 24, 20
SMALL = f"chipA:mapping.tile_rows={TILE_IN},mapping.tile_cols={TILE_OUT}"
#: analog MACs per token of the tiny llama (hidden 32, MLP 64, 4 heads / 2 KV heads of 8, 2 layers), by hand:
#: q 32·32 + k 16·32 + v 16·32 + o 32·32 + gate 64·32 + up 64·32 + down 32·64 = 9216 per layer
TINY_LLAMA_ANALOG_MACS = 2 * 9216
TINY_LLAMA_LM_HEAD_MACS = 128 * 32  # vocab × hidden, digital under chipA


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny llama checkpoint and its plain bundle for the small-tile chipA."""
    root = tmp_path_factory.mktemp("report")
    _, src = save_tiny("llama", root / "src")
    out = root / "bundle"
    api.convert(str(src), SMALL, out, method="none", onnx=False, progress=False)
    return src, out


def _analog_matrices(src: Path) -> dict[str, tuple[int, int]]:
    """(out, in) of every projection the chipA default keeps analog (attention and MLP weights)."""
    return {k: v for k, v in read_shapes(src).items() if k.endswith("proj.weight")}


def test_arrays_and_counts_match_a_count_from_the_shapes(llama: tuple[Path, Path]) -> None:
    src, out = llama
    figures = inspect_bundle(out)["deployment"]
    matrices = _analog_matrices(src)
    grids = {k: (math.ceil(i / TILE_IN), math.ceil(o / TILE_OUT)) for k, (o, i) in matrices.items()}
    tiles = sum(n_in * n_out for n_in, n_out in grids.values())
    weights = sum(o * i for o, i in matrices.values())
    capacity = tiles * TILE_IN * TILE_OUT
    assert figures["arrays"] == {
        "tiles": tiles, "tile_rows": TILE_IN, "tile_cols": TILE_OUT, "weights_stored": weights,
        "capacity": capacity, "utilisation": pytest.approx(weights / capacity),
    }  # fmt: skip
    per_token = figures["per_token"]
    assert per_token["analog_macs"] == weights == TINY_LLAMA_ANALOG_MACS
    assert per_token["tile_reads"] == tiles == 68
    assert per_token["adc_conversions"] == sum(o * grids[k][0] for k, (o, _) in matrices.items()) == 1088
    assert per_token["dac_conversions"] == sum(i * grids[k][1] for k, (_, i) in matrices.items()) == 1152
    assert figures["digital_macs_by_source"] == {"digital lm_head": TINY_LLAMA_LM_HEAD_MACS}
    assert per_token["digital_macs"] == TINY_LLAMA_LM_HEAD_MACS


def test_unknown_costs_stay_unknown(llama: tuple[Path, Path]) -> None:
    _, out = llama
    estimate = inspect_bundle(out)["deployment"]["estimate"]
    energy = estimate["energy_per_token"]
    assert all(c == {"pj": None, "status": "unknown"} for c in energy["components"].values())
    assert energy["total_pj"] is None
    assert estimate["analog_latency_ns_per_token_serial"] is None and estimate["array_area_mm2"] is None
    report = (out / "REPORT.md").read_text()
    assert "| energy per token: total | unknown" in report and "| array area | unknown" in report
    assert " pJ |" not in report and " nJ |" not in report and " µJ |" not in report


def test_hermes_estimate_uses_its_published_figures_and_leaves_the_rest_unknown(llama) -> None:
    _, out = llama
    manifest = read_manifest(out)
    hermes = load_profile("hermes").costs
    assert hermes.analog_mac_energy_pj is not None and "Le Gallo" in hermes.analog_mac_energy_pj.source
    figures = deployment_figures(manifest, {**TINY_CONFIGS["llama"]}, hermes)
    energy = figures["estimate"]["energy_per_token"]["components"]
    assert energy["analog"]["pj"] == pytest.approx(0.806 * TINY_LLAMA_ANALOG_MACS)
    assert energy["adc"]["status"] == energy["dac"]["status"] == "included in analog"
    assert energy["digital"] == {"pj": None, "status": "unknown"}
    assert figures["estimate"]["energy_per_token"]["total_pj"] is None  # digital MAC energy is unpublished
    assert figures["estimate"]["analog_latency_ns_per_token_serial"] == pytest.approx(521.0 * 68)
    assert figures["estimate"]["unknown"] == ["digital_mac_energy_pj", "tile_area_mm2"]
    assert figures["costs"]["tile_area_mm2"] is None


def test_every_cost_known_gives_the_sum(llama: tuple[Path, Path]) -> None:
    _, out = llama
    figure = {"source": "test figure"}
    costs = CostSpec.model_validate({
        "tile_read_energy_pj": {"value": 10.0, **figure}, "adc_energy_pj": {"value": 1.0, **figure},
        "dac_energy_pj": {"value": 0.5, **figure}, "digital_mac_energy_pj": {"value": 2.0, **figure},
        "tile_area_mm2": {"value": 0.25, **figure},
    })  # fmt: skip
    figures = deployment_figures(read_manifest(out), {**TINY_CONFIGS["llama"]}, costs)
    expected = 10.0 * 68 + 1.0 * 1088 + 0.5 * 1152 + 2.0 * TINY_LLAMA_LM_HEAD_MACS
    assert figures["estimate"]["energy_per_token"]["total_pj"] == pytest.approx(expected)
    assert figures["estimate"]["array_area_mm2"] == pytest.approx(0.25 * 68)
    assert figures["estimate"]["unknown"] == ["tile_read_latency_ns"]


@pytest.mark.parametrize(
    ("costs", "message"),
    [
        ("  analog_mac_energy_pj: {value: 1, source: x}\n  tile_read_energy_pj: {value: 1, source: x}\n",
         "not both"),
        ("  adc_energy_pj: {value: 1}\n", "source"),
        ("  adc_energy_pj: {value: -1, source: x}\n", "greater than or equal"),
        ("  adc_energy_pj: {value: .nan, source: x}\n", "nan|finite"),
    ],
)  # fmt: skip
def test_bad_cost_figures_are_one_line_errors(tmp_path: Path, costs: str, message: str) -> None:
    path = tmp_path / "priced.yaml"
    path.write_text(f"schema_version: 1\nname: priced\ncosts:\n{costs}", encoding="utf-8")
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(str(path))
    assert "\n" not in str(info.value)


def test_costs_leave_the_content_hash_alone() -> None:
    chip = load_profile("chipA")
    priced = load_profile("chipA:costs.adc_energy_pj.value=1,costs.adc_energy_pj.source=test")
    assert priced.costs.adc_energy_pj is not None
    assert chip.model_copy(update={"costs": priced.costs}).content_hash() == chip.content_hash()
    assert chip.model_copy(update={"t_inference": 1.0}).content_hash() != chip.content_hash()


def test_hpd_overhead_and_step_summary(llama: tuple[Path, Path], tmp_path: Path) -> None:
    src, _ = llama
    out = tmp_path / "hpd"
    layer = "model.layers.1.mlp.down_proj"
    api.convert(str(src), SMALL, out, method="hpd", onnx=False, progress=False,
                method_options={"hpd_layers": (layer,)})  # fmt: skip
    info = inspect_bundle(out)
    figures = info["deployment"]
    rank = 32  # full rank of a [32, 64] matrix: Vᵀ is [32, 64] on the digital unit
    assert figures["digital_macs_by_source"]["hpd_split"] == rank * 64
    assert figures["transforms"] == [{"type": "hpd_split", "entries": 1, "targets": 2,
                                      "digital_macs_per_token": rank * 64}]  # fmt: skip
    manifest = read_manifest(out)
    assert manifest.extra["method_report"]["1:hpd"]["digital_macs_per_token"] == rank * 64
    # the analog factor U·Σ [32, 32] replaces the [32, 64] weight on the tiles
    assert figures["per_token"]["analog_macs"] == TINY_LLAMA_ANALOG_MACS - 32 * 64 + 32 * rank
    assert info["steps"][0]["summary"].startswith(f"split 1 layer(s) ({layer})")
    report = (out / "REPORT.md").read_text()
    assert "| hpd_split | 1 | 2 | 2,048 |" in report and "nothing to apply" not in report


def test_one_on_disk_tensor_count_in_report_and_inspect(tmp_path: Path) -> None:
    _, src = save_tiny("olmoe", tmp_path / "src")
    out = tmp_path / "bundle"
    api.convert(str(src), "chipA", out, method="none", onnx=False, progress=False)
    manifest = read_manifest(out)
    info = inspect_bundle(out)
    analog = manifest.analog_names()
    assert any(".experts.3." in name for name in analog)  # per-expert keys: the on-disk count
    assert info["tensor_count"] == TENSOR_COUNT and "on-disk" in TENSOR_COUNT
    assert info["units"]["analog"]["tensors"] == len(analog) == manifest.totals.analog_tensors
    report = (out / "REPORT.md").read_text()
    assert f"- tensors: {len(manifest.tensors)} ({len(analog)} analog," in report
    # routed experts run top_k of E per token: each per-expert key counts top_k / E of its matrix
    config = TINY_CONFIGS["olmoe"]
    share = config["num_experts_per_tok"] / config["num_experts"]
    expected = sum(
        math.prod(entry.shape) * (share if entry.kind == "expert" else 1.0)
        for entry in manifest.tensors if entry.unit == "analog"
    )  # fmt: skip
    assert info["deployment"]["per_token"]["analog_macs"] == pytest.approx(expected)


def test_inspect_without_config_reports_no_deployment(tmp_path: Path) -> None:
    _, src = save_tiny("llama", tmp_path / "src")
    out = tmp_path / "bundle"
    api.convert(str(src), "chipA", out, method="none", onnx=False, progress=False)
    (out / "config.json").unlink()
    info = inspect_bundle(out)
    assert info["verified"] is False and any("config.json" in p for p in info["problems"])
    assert info["deployment"] is None


def test_step_outcomes_show_summary_measured_ppl_and_warnings(llama: tuple[Path, Path]) -> None:
    _, out = llama
    manifest = read_manifest(out)
    steps = ("output_correction", "romer", "hpd")
    manifest.recipe = Recipe(steps=[RecipeStep(step=name, seed=0) for name in steps])
    inactive = "router calibration inactive under this profile: the routers are digital"
    manifest.extra = {"method_report": {
        "1:output_correction": {"summary": "fitted gains", "calibration_ppl_clean": 10.0,
                                "calibration_ppl_noisy_before": 12.5, "layers": 3},
        "2:romer": {"summary": "romer did nothing", "warnings": [inactive], "analog_tensors": 24},
    }}  # fmt: skip
    outcomes = step_outcomes(manifest)
    measured = {"calibration_ppl_clean": 10.0, "calibration_ppl_noisy_before": 12.5}
    assert outcomes[0]["measured_ppl"] == measured
    assert outcomes[1]["warnings"] == [inactive] and outcomes[1]["measured_ppl"] == {}
    assert "no summary recorded" in outcomes[2]["summary"]
    text = render_report(manifest)
    assert f"## Warnings\n\n- step 2 `romer`: {inactive}" in text
    assert "measured perplexity: calibration_ppl_clean 10.00, calibration_ppl_noisy_before 12.50" in text
    assert "analog_tensors" not in text  # ROMER's in-memory count: the report counts on disk only
    assert "   - layers: 3" in text


def test_romer_warns_when_router_calibration_is_inactive() -> None:
    cfg = RomerConfig()
    idle = RomerPlan(routing={i: LayerRouting(layer=i, num_experts=4, calibration="none") for i in (0, 1)},
                     pairs={0: [], 1: []}, replacement=cfg.replacement)  # fmt: skip
    outcome = plan_outcome(idle, cfg, router_analog=False)
    assert "active in 0 of 2 MoE layers" in outcome["summary"]
    assert any(w.startswith("router calibration inactive under this profile: the routers are digital")
               for w in outcome["warnings"])  # fmt: skip
    active = RomerPlan(routing={0: LayerRouting(layer=0, num_experts=4, calibration="affine")}, pairs={0: []},
                       replacement=cfg.replacement)  # fmt: skip
    warnings = plan_outcome(active, cfg, router_analog=True)["warnings"]
    assert not any("router calibration" in w for w in warnings)


def test_outlier_channel_overheads_match_the_method_report(tmp_path: Path) -> None:
    """Attention linears split (digital halves stored) and fused experts with digital input channels
    (channels recorded in the transform's params): overheads counted by hand from shapes and params."""
    demo = Path(__file__).resolve().parent.parent / "examples" / "models" / "tiny-olmoe"
    out = tmp_path / "out"
    res = api.convert(str(demo), "chipA", out=out, method="outlier_channels", progress=False, onnx=False,
                      method_options={"calib_samples": 2, "calib_seq_len": 32})  # fmt: skip
    manifest = read_manifest(out)
    rows = inspect_bundle(out)["deployment"]["transforms"]
    by_type = {t["type"]: t["digital_macs_per_token"] for t in rows}
    halves = sum(math.prod(t.shape) for t in manifest.tensors if t.name.endswith(".digital.weight"))
    assert by_type["outlier_split"] == halves > 0
    experts = next(t for t in manifest.transforms if t.type == "experts_digital_inputs")
    # tiny-olmoe: 8 experts, top-2, expert MLP 192: gate_up_proj has 2·192 outputs, down_proj 128
    outputs = {"gate_up_proj": 2 * 192, "down_proj": 128}
    by_hand = sum(len(index) * outputs[item["tensor"].rpartition(".")[2]] * 2 / 8
                  for item in experts.params["tensors"] for index in item["digital_index"])  # fmt: skip
    assert by_type["experts_digital_inputs"] == pytest.approx(by_hand) and by_hand > 0
    reported = res["method_report"]["1:outlier_channels"]["digital_macs_per_token"]
    assert by_type["outlier_split"] + by_type["experts_digital_inputs"] == pytest.approx(reported)
