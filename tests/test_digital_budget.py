"""Digital budget: the knapsack (exact vs greedy), budget 0 / 100, analog MACs per token, a conversion
driven by an `analyze --granularity layer` scan (manifest, dtype, ONNX validation), bad input."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reliability_helpers import DEMO_OLMOE, RunCli
from tiny_models import VOCAB, build_tiny

from cimconvert import api
from cimconvert.arch import get_adapter
from cimconvert.checkpoint import resolve_model
from cimconvert.cli import cli
from cimconvert.errors import CimError
from cimconvert.evaluation.sensitivity import sensitivity_scan
from cimconvert.methods import METHODS, resolve_method
from cimconvert.methods.budget import Item, greedy_knapsack, solve_knapsack
from cimconvert.placement import analog_macs_per_token, plan_model, plan_tensors
from cimconvert.profiles import load_profile
from cimconvert.validate import validate

TOKENS = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(0))


def _value(items: list[Item]) -> float:
    return sum(item.value for item in items)


def _brute_force(items: list[Item], capacity: float) -> float:
    subsets = itertools.chain.from_iterable(itertools.combinations(items, r) for r in range(len(items) + 1))
    return max(_value(list(s)) for s in subsets if sum(i.cost for i in s) <= capacity)


# ------------------------------------------------------------------------------------ knapsack
def test_knapsack_beats_greedy_where_greedy_is_suboptimal() -> None:
    items = [Item("a", 7.0, 6.0), Item("b", 5.0, 5.0), Item("c", 5.0, 5.0)]  # a has the best value/cost
    assert _value(greedy_knapsack(items, 10.0)) == 7.0
    assert {i.name for i in solve_knapsack(items, 10.0)} == {"b", "c"}


def test_knapsack_is_exact_on_small_integer_instances() -> None:
    rng = random.Random(0)
    for _ in range(40):
        items = [Item(str(i), rng.random(), float(rng.randint(1, 30))) for i in range(rng.randint(1, 8))]
        capacity = float(rng.randint(0, 80))
        chosen = solve_knapsack(items, capacity)
        assert sum(i.cost for i in chosen) <= capacity
        assert _value(chosen) == pytest.approx(_brute_force(items, capacity))
        assert _value(chosen) >= _value(greedy_knapsack(items, capacity)) - 1e-12


def test_knapsack_on_the_rounded_grid_stays_within_the_budget() -> None:
    rng = random.Random(1)
    items = [Item(str(i), rng.random(), rng.uniform(1e5, 1e7)) for i in range(60)]
    capacity = 0.05 * sum(i.cost for i in items)
    chosen = solve_knapsack(items, capacity)
    assert chosen and sum(i.cost for i in chosen) <= capacity
    assert _value(chosen) >= 0.99 * _value(greedy_knapsack(items, capacity))


# --------------------------------------------------------------------------------- macs helper
def test_analog_macs_per_token_counts_top_k_experts_on_disk_and_in_memory() -> None:
    source = resolve_model(str(DEMO_OLMOE))
    adapter = get_adapter(source.model_type)
    chip = load_profile("chipA")
    model = source.load_model(dtype=torch.float32)
    in_memory = plan_model(model, chip)
    on_disk = plan_tensors(
        source.tensor_shapes(), adapter, chip, tied_lm_head=adapter.tied_embeddings(source.config)
    )
    cfg = model.config
    hidden, inter, layers, top_k = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, 2
    attention = 4 * hidden * hidden  # q, k, v, o (4 heads of 32, no GQA)
    experts = top_k * (2 * inter * hidden + hidden * inter)  # gate_up + down of top_k experts
    expected = layers * (attention + experts)  # the router and the tied LM head stay digital under chipA
    assert analog_macs_per_token(in_memory, adapter, cfg) == expected
    assert analog_macs_per_token(on_disk, adapter, source.config) == pytest.approx(expected)


# ---------------------------------------------------------------------------- method on a model
@pytest.fixture(scope="module")
def llama_scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    model = build_tiny("llama")
    chip = load_profile("chipA")
    scan = sensitivity_scan(model, TOKENS, plan_model(model, chip).analog(), chip, [1], "layer", seq_len=32)
    path = tmp_path_factory.mktemp("scan") / "sensitivity.json"
    path.write_text(json.dumps(scan))
    return path, scan


def _apply(budget: float, scan: Path, **options: object):
    model = build_tiny("llama")
    opts = {"digital_budget": budget, "budget_scan": str(scan), **options}
    return METHODS["digital_budget"].apply(model, get_adapter(model.config), load_profile("chipA"), opts,
                                           progress=False)  # fmt: skip


def test_budget_zero_keeps_nothing_and_budget_hundred_keeps_everything(llama_scan) -> None:
    path, scan = llama_scan
    none = _apply(0.0, path)
    assert none.digital == [] and none.report["cost_moved"] == 0 and none.transforms == []
    everything = _apply(100.0, path, budget_cost="weights")
    assert set(everything.digital) == {t for row in scan["rows"] for t in row["tensors"]}
    assert everything.report["cost_moved_pct"] == pytest.approx(100.0)


def test_report_fields_and_auto_never_picks_the_budget(llama_scan) -> None:
    report = _apply(30.0, llama_scan[0]).report
    assert report["cost_moved"] <= report["budget_cost"] and report["cost"] == "macs"
    assert report["damage_removed"] == pytest.approx(sum(c["value"] for c in report["chosen"]))
    assert report["scan_source"] == str(llama_scan[0]) and report["tensors_moved"] == len(report["chosen"])
    assert all(resolve_method("auto", f) != "digital_budget" for f in ("dense", "moe", "ssm"))


def test_quick_scan_without_tokenizer_is_one_line() -> None:
    model = build_tiny("llama")
    with pytest.raises(CimError, match="pass --budget-scan") as info:
        METHODS["digital_budget"].apply(model, get_adapter(model.config), load_profile("chipA"), {},
                                        progress=False)  # fmt: skip
    assert "\n" not in str(info.value)


def test_quick_scan_on_calib_when_no_scan_is_given() -> None:
    model = resolve_model(str(DEMO_OLMOE)).load_model(dtype=torch.float32)
    options = {"digital_budget": 10.0, "budget_scan_tokens": 256, "budget_scan_seeds": 1, "seed": 3}
    result = METHODS["digital_budget"].apply(model, get_adapter(model.config), load_profile("chipA"), options,
                                             progress=False)  # fmt: skip
    scan = result.report["scan"]
    assert scan["source"] == "quick scan on calib" and scan["seeds"] == [1003] and scan["tokens"] == 256
    assert result.digital and result.report["cost_moved_pct"] <= 10.0


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def olmoe_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`cimconvert analyze --granularity layer --json` on the tiny OLMoE demo, saved as a file."""
    folder = tmp_path_factory.mktemp("analyze")
    args = ["--granularity", "layer", "--seeds", "1", "--max-tokens", "256", "--seq-len", "64"]
    out = api_cli(["analyze", str(DEMO_OLMOE), "-p", "chipA", *args, "-o", str(folder / "files"), "--json"])
    path = folder / "scan.json"
    path.write_text(out)
    return path


def api_cli(args: list[str]) -> str:
    """Run the CLI in-process (from a module-scoped fixture too) and return its stdout; exit 0 required."""
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return result.stdout


def test_conversion_keeps_exactly_the_chosen_tensors_digital(olmoe_scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    args = ["--method", "digital_budget", "--digital-budget", "20", "--budget-scan", str(olmoe_scan)]
    res = json.loads(api_cli([str(DEMO_OLMOE), "-p", "chipA", *args, "-o", str(out), "--json"]))
    report = res["method_report"]["1:digital_budget"]
    chosen = {row["tensor"] for row in report["chosen"]}
    assert chosen and report["cost_moved_pct"] <= 20.0
    plain = api.convert(str(DEMO_OLMOE), "chipA", method="none", dry_run=True, progress=False)["tensors"]
    planned = {t["name"]: t["unit"] for t in plain}
    tensors = json.loads((out / "manifest.json").read_text())["tensors"]
    adapter = get_adapter(resolve_model(str(DEMO_OLMOE)).model_type)
    for entry in tensors:
        expected = "digital" if adapter.memory_name(entry["name"]) in chosen else planned[entry["name"]]
        assert entry["unit"] == expected, entry["name"]
    source = {n: m.dtype for n, m in resolve_model(str(DEMO_OLMOE)).tensor_shapes().items()}
    assert {t["name"]: t["dtype"] for t in tensors} == source  # no weight rewritten, dtypes kept
    markdown = (out / "REPORT.md").read_text()
    assert "- chosen:" in markdown and "| tensor | kind | value | cost |" in markdown
    summary = validate(out, seeds=1, max_tokens=384, seq_len=64)["summary"]
    assert summary["graph_matches_placement"] and summary["passed"], summary


def test_budget_after_an_hpd_step_skips_the_split_layer(olmoe_scan: Path, tmp_path: Path) -> None:
    """In a recipe, a layer an earlier step split is no candidate (the scan names its old weight)."""
    layer = "model.layers.3.self_attn.o_proj"
    budget = {"digital_budget": 10, "budget_scan": str(olmoe_scan)}
    steps = [
        {"step": "hpd", "options": {"hpd_layers": [layer]}},
        {"step": "digital_budget", "options": budget},
    ]
    recipe = {"steps": steps}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    out = tmp_path / "bundle"
    res = json.loads(api_cli([str(DEMO_OLMOE), "-p", "chipA", "--recipe", str(tmp_path / "recipe.json"),
                              "-o", str(out), "--no-onnx", "--json"]))  # fmt: skip
    report = res["method_report"]["2:digital_budget"]
    assert report["scan_replaced"] == [f"{layer}.weight"] and report["tensors_moved"] > 0
    units = {t["name"]: t["unit"] for t in json.loads((out / "manifest.json").read_text())["tensors"]}
    assert units[f"{layer}.analog.weight"] == "analog"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--digital-budget", "-1"], "--digital-budget"),
        (["--digital-budget", "101"], "--digital-budget"),
        (["--budget-cost", "flops"], "--budget-cost"),
        (["--budget-scan-seeds", "0"], "--budget-scan-seeds"),
        (["--budget-scan", "BLOCK"], "block-granularity"),
        (["--budget-scan", "OTHER"], "does not have"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    olmoe_scan: Path, tmp_path: Path, run_cli: RunCli, args: list[str], message: str
) -> None:
    scan = json.loads(olmoe_scan.read_text())
    (tmp_path / "block.json").write_text(json.dumps({**scan, "granularity": "block"}))
    scan["rows"][0]["tensors"] = ["model.layers.9.self_attn.q_proj.weight"]
    (tmp_path / "other.json").write_text(json.dumps(scan))
    files = {"BLOCK": str(tmp_path / "block.json"), "OTHER": str(tmp_path / "other.json")}
    work = tmp_path / "work"
    work.mkdir()
    args = [files.get(a, a) for a in args]
    if "--budget-scan" not in args:
        args += ["--budget-scan", str(olmoe_scan)]
    code, _, err = run_cli(str(DEMO_OLMOE), "-p", "chipA", "--method", "digital_budget", *args,
                           "-o", str(work / "out"), "--no-onnx")  # fmt: skip
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1
    assert list(work.iterdir()) == []
