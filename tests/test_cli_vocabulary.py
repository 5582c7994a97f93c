"""One CLI, one API: shared flag names and defaults, typo suggestions, options before MODEL, -q / -v,
progress on stderr without control codes in logs, the package-level API, in-memory models, unknown options."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from reliability_helpers import RunCli
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer

import cimconvert
from cimconvert import api
from cimconvert.arch import get_adapter
from cimconvert.cli import cli
from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import evaluate_model
from cimconvert.methods.romer import LayerRouting, install_hook, moe_routers, remove_hook
from cimconvert.profiles import load_profile
from cimconvert.progress import PlainProgress, progress_bar

DEMO_MAMBA = Path(__file__).resolve().parent.parent / "examples" / "models" / "tiny-mamba"
SHARED_FLAGS = ("seeds", "seed", "dataset", "max_tokens", "seq_len", "threads")


def _defaults(command: str) -> dict[str, object]:
    """Every option of ``command`` → its default."""
    return {p.name: p.default for p in cli.commands[command].params}


def _flags(command: str) -> set[str]:
    """Every visible flag spelling of ``command``."""
    return {opt for p in cli.commands[command].params if not getattr(p, "hidden", False) for opt in p.opts}


def test_evaluation_flags_share_names_and_defaults() -> None:
    defaults = {command: _defaults(command) for command in ("eval", "validate", "analyze")}
    for name in SHARED_FLAGS:
        values = {command: d[name] for command, d in defaults.items()}
        assert len(set(values.values())) == 1, (name, values)
    assert defaults["eval"]["max_tokens"] == 4096 and defaults["eval"]["seq_len"] == 256


def test_dataset_flag_everywhere_old_spellings_hidden() -> None:
    for command in ("convert", "eval", "validate", "analyze", "finetune"):
        assert "--dataset" in _flags(command), command
    assert "--data" not in _flags("finetune") and "--calib-data" not in _flags("convert")


def test_deprecated_flag_still_works_and_warns(run_cli: RunCli) -> None:
    args = ("--profile", "chipA", "--dry-run", "--method", "none", "--json")
    code, out, err = run_cli(str(DEMO_MAMBA), *args, "--calib-data", "calib")
    assert code == 0 and json.loads(out)["dry_run"] is True
    assert err.strip() == "warning: --calib-data is deprecated: use --dataset"


@pytest.mark.parametrize(("word", "meant"), [("convrt", "convert"), ("evl", "eval"), ("inspct", "inspect")])
def test_command_typo_suggests_the_command(run_cli: RunCli, word: str, meant: str) -> None:
    code, out, err = run_cli(word, "some-model", "--profile", "chipA")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert f"did you mean 'cimconvert {meant}'" in err


def test_help_word_points_to_help(run_cli: RunCli) -> None:
    code, _, err = run_cli("help")
    assert code == 2 and "cimconvert --help" in err and len(err.strip().splitlines()) == 1


def test_options_may_come_before_model(run_cli: RunCli) -> None:
    tail = ("--dry-run", "--method", "none", "--json")
    code_a, out_a, _ = run_cli("--profile", "chipA", str(DEMO_MAMBA), *tail)
    code_b, out_b, _ = run_cli(str(DEMO_MAMBA), "--profile", "chipA", *tail)
    assert code_a == code_b == 0 and json.loads(out_a) == json.loads(out_b)


def test_progress_is_plain_lines_in_logs_and_quiet_silences_it(run_cli: RunCli, tmp_path: Path) -> None:
    model = str(DEMO_MAMBA)
    code, out, err = run_cli(model, "-p", "chipA", "-o", str(tmp_path / "a"), "--method", "none", "--no-onnx")
    assert code == 0 and out.startswith("wrote ")
    assert "converting: " in err and "(100%)" in err
    assert "\r" not in err and "\x1b" not in err  # no bar control codes in a non-terminal stderr
    code, out, err = run_cli("-q", model, "-p", "chipA", "-o", str(tmp_path / "b"), "--method", "none",
                             "--no-onnx")  # fmt: skip
    assert code == 0 and out.startswith("wrote ") and err == ""


def test_plain_progress_reports_tenths_inner_bars_say_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="cimconvert.progress"):
        assert list(PlainProgress(range(20), None, "draws", "draw")) == list(range(20))
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 10 and lines[-1] == "draws: 20/20 draw (100%)"
        caplog.clear()
        assert list(progress_bar(range(5), desc="inner", inner=True)) == list(range(5))
        assert caplog.records == []


def test_package_exposes_the_api() -> None:
    for name in ("convert", "evaluate", "load_bundle", "inspect", "validate", "analyze", "finetune"):
        assert callable(getattr(cimconvert, name)), name
    assert cimconvert.api is api and cimconvert.convert is api.convert


def test_convert_accepts_an_in_memory_model(tmp_path: Path) -> None:
    net = build_tiny("llama")
    res = api.convert(net, "chipA", out=tmp_path / "b", method="none", onnx=False, progress=False)
    assert res["model"].startswith("in-memory:")
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["source"]["model"] == manifest["source"]["path"] == res["model"]
    loaded = api.load_bundle(tmp_path / "b")
    ids = torch.arange(12).view(1, 12)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, net(input_ids=ids).logits)


def test_convert_refuses_a_plain_module(tmp_path: Path) -> None:
    with pytest.raises(CimError, match="PreTrainedModel"):
        api.convert(torch.nn.Linear(2, 2), "chipA", out=tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists()


def test_unknown_method_option_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CimError, match="unknown method option 'router_pl'"):
        api.convert(str(DEMO_MAMBA), "chipA", out=tmp_path / "b", method_options={"router_pl": 3},
                    progress=False)  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_calibrated_routing_is_not_reported_as_clean() -> None:
    """ROMER router calibration: clean_ppl is the stock routing's PPL, noise_free_ppl the calibrated one's."""
    model = build_tiny("olmoe").eval()
    tokens = torch.randint(0, 128, (96,), generator=torch.Generator().manual_seed(0))
    chip = load_profile("ideal")
    stock = evaluate_model(model, tokens, [], chip, seeds=[1], seq_len=32)
    assert stock.calibrated_routing_layers == 0 and stock.to_dict()["noise_free_ppl"] == stock.clean_ppl
    moe = moe_routers(model, get_adapter(model.config.model_type))
    n = moe.num_experts
    for m in moe.layers:
        spec = LayerRouting(layer=m.index, num_experts=n, calibration="affine",
                            a=[float(1 + e) for e in range(n)], b=[0.5 * e for e in range(n)])  # fmt: skip
        install_hook(m.router, spec, moe.rules[m.index])
    calibrated = evaluate_model(model, tokens, [], chip, seeds=[1], seq_len=32).to_dict()
    assert calibrated["calibrated_routing_layers"] == len(moe.layers)
    assert calibrated["clean_ppl"] == pytest.approx(stock.clean_ppl, rel=1e-6)
    assert abs(calibrated["noise_free_ppl"] / calibrated["clean_ppl"] - 1) > 1e-4
    for m in moe.layers:
        remove_hook(m.router)


def test_verbose_and_quiet_are_global_and_restored(run_cli: RunCli) -> None:
    for flag in ("-v", "-vv", "--verbose", "-q", "--quiet"):
        code, out, _ = run_cli(flag, "profiles", "--json")
        assert code == 0 and json.loads(out), flag
    assert logging.getLogger("cimconvert").level == logging.NOTSET  # a run leaves logging as it found it


def test_evaluate_accepts_an_in_memory_model() -> None:
    net = AutoModelForCausalLM.from_pretrained(DEMO_MAMBA, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MAMBA)
    fast = dict(seeds=2, max_tokens=256, seq_len=64, progress=False)
    in_memory = api.evaluate(net, "chipA", tokenizer=tokenizer, **fast)
    on_disk = api.evaluate(str(DEMO_MAMBA), "chipA", **fast)
    assert in_memory["model"].startswith("in-memory:")
    assert in_memory["clean_ppl"] == pytest.approx(on_disk["clean_ppl"], rel=1e-6)
    assert in_memory["per_seed"] == pytest.approx(on_disk["per_seed"], rel=1e-6)
    with pytest.raises(CimError, match="tokenizer"):
        api.evaluate(net, "chipA", **fast)
