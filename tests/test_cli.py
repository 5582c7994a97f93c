"""CLI behaviour: profiles listing, --json, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from reliability_helpers import RunCli


def test_profiles_list_json(run_cli: RunCli) -> None:
    code, out, _ = run_cli("profiles", "--json")
    assert code == 0
    names = {row["name"] for row in json.loads(out)}
    assert {"chipA", "chipB", "hermes", "ideal", "gaussian"} <= names


def test_profiles_show(run_cli: RunCli) -> None:
    code, out, _ = run_cli("profiles", "show", "gaussian:sigma=0.2", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["programming"]["sigma"] == 0.2
    assert data["content_hash"].startswith("sha256:")
    code, out, _ = run_cli("profiles", "show", "chipA")
    assert code == 0 and "g_max: 25.0" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("profiles", "show", "nochip"), "unknown profile 'nochip'"),
        (("profiles", "show", "gaussian:bogus=1"), "unknown parameter 'bogus'"),
        (("profiles", "show", "gaussian:sigma=-1"), "programming.sigma"),
    ],
)
def test_profile_errors_are_one_line(run_cli: RunCli, args: tuple[str, ...],
                                     needle: str) -> None:
    code, _, err = run_cli(*args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1


def test_malformed_profile_file(run_cli: RunCli, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmapping: [unclosed\n", encoding="utf-8")
    code, _, err = run_cli("profiles", "show", str(bad))
    assert code == 2 and "bad.yaml" in err and "malformed YAML" in err


def test_console_script_exit_code(tmp_path: Path) -> None:
    """The installed entry point: a missing model folder is one line on stderr and exit code 2."""
    proc = subprocess.run(
        [sys.executable, "-m", "cimconvert.cli", str(tmp_path / "missing"), "--profile", "chipA"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing-chipA").exists()
