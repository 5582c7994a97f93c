"""Sensitivity scan: one row per analog layer (or block), JSON/MD/PNG outputs, the CLI command."""

from __future__ import annotations

import json

import torch
from tiny_models import VOCAB, build_tiny, save_tiny

from cimconvert.analysis import write_scan
from cimconvert.cli import main
from cimconvert.evaluation.sensitivity import sensitivity_scan
from cimconvert.methods.hpd import hpd_placement
from cimconvert.profiles import load_profile

TOKENS = torch.randint(0, VOCAB, (96,), generator=torch.Generator().manual_seed(0))


def _scan(granularity: str) -> tuple[dict, list]:
    model = build_tiny("mamba")
    chip = load_profile("gaussian:sigma=0.2")
    targets = hpd_placement(model, chip).analog()
    return sensitivity_scan(model, TOKENS, targets, chip, [1, 2], granularity, seq_len=32), targets


def test_layer_scan_has_one_row_per_analog_layer_and_writes_outputs(tmp_path) -> None:
    scan, targets = _scan("layer")
    assert [r["name"] for r in scan["rows"]] == [t.name.removesuffix(".weight") for t in targets]
    row = scan["rows"][0]
    assert len(row["per_seed"]) == 2 and row["ppl_std"] >= 0
    assert {r["splittable"] for r in scan["rows"] if r["name"].endswith("dt_proj")} == {False}
    assert scan["all"]["ppl_mean"] != scan["clean_ppl"]
    files = write_scan(scan, tmp_path)
    assert json.loads((tmp_path / "sensitivity.json").read_text())["rows"][0]["name"] == row["name"]
    assert (tmp_path / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"
    assert "| layer |" in (tmp_path / "sensitivity.md").read_text() and set(files) == {"json", "md", "png"}


def test_block_scan_has_one_row_per_block() -> None:
    scan, _ = _scan("block")
    assert [r["name"] for r in scan["rows"]] == ["backbone.layers.0", "backbone.layers.1"]


def test_analyze_cli_bad_model_is_one_line(tmp_path, capsys) -> None:
    _, folder = save_tiny("mamba", tmp_path / "m")
    try:
        main(["analyze", str(folder), "--profile", "chipA", "--out", str(tmp_path / "o")])
    except SystemExit as exc:
        assert exc.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error:")  # no tokenizer/usable text in a bare tiny checkpoint: one line
