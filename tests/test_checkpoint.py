"""Input side: resolving, validating and streaming checkpoints; every bad input is a one-line CimError."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import build_tiny, save_tiny

from cimconvert.checkpoint import SourceCheckpoint, read_header, resolve_model
from cimconvert.errors import CimError, ModelInputError


@pytest.fixture(scope="module")
def olmoe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny OLMoE checkpoint (per-expert keys on disk), shared read-only by the tests."""
    _, folder = save_tiny("olmoe", tmp_path_factory.mktemp("olmoe") / "model")
    return folder


@pytest.fixture
def olmoe_copy(olmoe_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny OLMoE checkpoint that a test may damage."""
    return Path(shutil.copytree(olmoe_dir, tmp_path / "model"))


def _error(model: str | Path, **kwargs) -> str:
    with pytest.raises(CimError) as info:
        resolve_model(str(model), **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def _stream_all(source: SourceCheckpoint) -> None:
    for _ in source.stream_tensors():
        pass


# ------------------------------------------------------------------ good input
def test_resolve_reads_headers_and_hashes(olmoe_dir: Path) -> None:
    source = resolve_model(str(olmoe_dir))
    assert source.model_type == "olmoe"
    shapes = source.tensor_shapes()
    with safe_open(str(olmoe_dir / "model.safetensors"), "pt") as handle:
        assert set(shapes) == set(handle.keys())
        key = "model.layers.0.mlp.experts.1.down_proj.weight"
        assert shapes[key].shape == tuple(handle.get_slice(key).get_shape())
    files = {f.name: f for f in source.files()}
    assert files["model.safetensors"].sha256 == hashlib.sha256(
        (olmoe_dir / "model.safetensors").read_bytes()
    ).hexdigest()
    assert "config.json" in files


def test_stream_and_iter_shards_give_the_stored_tensors(olmoe_dir: Path) -> None:
    source = resolve_model(str(olmoe_dir))
    expected_sha = hashlib.sha256((olmoe_dir / "model.safetensors").read_bytes()).hexdigest()
    source._sha.clear()
    streamed = {}
    for meta, raw in source.stream_tensors():
        streamed[meta.name] = raw.view(meta.torch_dtype).reshape(meta.shape).clone()
    assert source._sha["model.safetensors"] == expected_sha  # hashed while streaming
    shards = list(source.iter_shards())
    assert [name for name, _ in shards] == ["model.safetensors"]
    for name, tensor in shards[0][1].items():
        assert torch.equal(streamed[name], tensor)


def test_mixtral_legacy_keys_and_fused_layout_pass_the_shape_check(tmp_path: Path) -> None:
    _, folder = save_tiny("mixtral", tmp_path / "mixtral")
    assert any("block_sparse_moe.experts.0.w1" in k for k in resolve_model(folder).tensor_shapes())
    # a checkpoint written straight from the in-memory state dict keeps the fused 3-D experts
    fused = tmp_path / "fused"
    fused.mkdir()
    model = build_tiny("olmoe")
    model.config.to_json_file(str(fused / "config.json"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
    shapes = resolve_model(fused).tensor_shapes()
    assert shapes["model.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4


def test_hub_id_resolves_from_the_local_cache(olmoe_dir: Path, tmp_path: Path, monkeypatch) -> None:
    commit = "a" * 40
    repo = tmp_path / "hub" / "models--tiny-org--tiny-olmoe"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in olmoe_dir.iterdir():
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, repo / "blobs" / digest)
        (snapshot / file.name).symlink_to(repo / "blobs" / digest)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    source = resolve_model("tiny-org/tiny-olmoe")
    assert source.revision == commit
    assert source.file_sha256("model.safetensors") == hashlib.sha256(
        (olmoe_dir / "model.safetensors").read_bytes()
    ).hexdigest()


# ------------------------------------------------------------------ bad input
def test_missing_folder(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "nope")


def test_hub_id_not_cached(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert "not in the local Hugging Face cache" in _error("no-such-org/no-such-model")


def test_missing_config(olmoe_copy: Path) -> None:
    (olmoe_copy / "config.json").unlink()
    assert "no config.json" in _error(olmoe_copy)


def test_config_without_model_type_or_broken(olmoe_copy: Path) -> None:
    (olmoe_copy / "config.json").write_text('{"hidden_size": 4}')
    assert "model_type" in _error(olmoe_copy)
    (olmoe_copy / "config.json").write_text('{"model_type": ')
    assert "not valid JSON" in _error(olmoe_copy)


def test_unknown_model_type(olmoe_copy: Path) -> None:
    config = json.loads((olmoe_copy / "config.json").read_text())
    (olmoe_copy / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    message = _error(olmoe_copy)
    assert "bert" in message and "olmoe" in message


def test_pickled_only_checkpoint_is_refused_without_unpickling(olmoe_copy: Path) -> None:
    (olmoe_copy / "model.safetensors").unlink()
    (olmoe_copy / "pytorch_model.bin").write_bytes(b"\x80\x04 not a pickle we would ever load")
    message = _error(olmoe_copy)
    assert "pickled" in message and "safetensors" in message


def test_no_weights_at_all(olmoe_copy: Path) -> None:
    (olmoe_copy / "model.safetensors").unlink()
    assert "no *.safetensors" in _error(olmoe_copy)


def test_corrupt_header(olmoe_copy: Path) -> None:
    path = olmoe_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#garbage!#{{"
    path.write_bytes(bytes(data))
    message = _error(olmoe_copy)
    assert "model.safetensors" in message and "corrupt safetensors header" in message


def test_header_length_beyond_file(olmoe_copy: Path) -> None:
    path = olmoe_copy / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (10**9).to_bytes(8, "little")
    path.write_bytes(bytes(data))
    assert "corrupt safetensors header" in _error(olmoe_copy)


def test_truncated_file(olmoe_copy: Path) -> None:
    path = olmoe_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = _error(olmoe_copy)
    assert "truncated" in message and "model.safetensors" in message


def test_index_pointing_at_missing_shard(tmp_path: Path) -> None:
    model = build_tiny("olmoe")
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="100KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1
    resolve_model(folder)
    shards[1].unlink()
    message = _error(folder)
    assert shards[1].name in message and "missing" in message


def test_shape_mismatch_names_tensor_and_shapes(olmoe_copy: Path) -> None:
    config = json.loads((olmoe_copy / "config.json").read_text())
    (olmoe_copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    message = _error(olmoe_copy)
    assert "model.layers.0.mlp.experts." in message
    assert "shape [32, 64] but the config implies [32, 48]" in message


def test_missing_tensor(olmoe_copy: Path) -> None:
    path = olmoe_copy / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    assert "lacks tensor 'model.layers.1.self_attn.q_proj.weight'" in _error(olmoe_copy)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weights(olmoe_copy: Path, bad: float) -> None:
    path = olmoe_copy / "model.safetensors"
    with safe_open(str(path), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    name = "model.layers.1.mlp.experts.2.up_proj.weight"
    tensors[name][3, 5] = bad
    save_file(tensors, str(path), metadata={"format": "pt"})
    source = resolve_model(olmoe_copy)  # headers are fine; the data check runs while streaming
    with pytest.raises(ModelInputError, match=name) as info:
        _stream_all(source)
    assert "\n" not in str(info.value)
    with pytest.raises(ModelInputError, match=name):
        list(source.iter_shards())


def test_read_header_of_a_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ModelInputError, match="truncated"):
        read_header(path)
