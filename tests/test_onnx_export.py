"""ONNX export with AnalogMatMul local functions: agreement with torch, dynamic shapes, routing, noise."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cimconvert.noise import apply_chip_noise
from cimconvert.onnx import analog_op
from cimconvert.onnx.export import build_onnx, save_onnx
from cimconvert.onnx.metadata import read_metadata
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.runtime import OrtNoiseRunner, analog_tensors, make_session
from cimconvert.runtime.noise import bound_equal
from tests.tiny_models import VOCAB, build_tiny

ATOL = 1e-4
#: Every family: MoE (incl. shared experts, sigmoid/group routing, own DeepSeek v1 module), dense, SSM.
EXPORTABLE = ["olmoe", "qwen2_moe", "mixtral", "deepseek_v3", "deepseek", "llama", "gpt2",
              "mamba", "mamba2", "falcon_mamba"]  # fmt: skip
#: Shapes unlike the trace input [2, 16]: batch 1 and 3, shorter and longer sequences.
SHAPES = [(1, 7), (3, 40)]


@pytest.fixture(scope="module")
def chip():
    return load_profile("chipA")


def _export(model_type: str, chip, seed: int = 0):
    model = build_tiny(model_type, seed)
    targets = plan_model(model, chip).analog()
    proto, found, weight_only = build_onnx(model, targets, chip)
    return model, targets, proto, found, weight_only


def _ids(shape, seed=1):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits.numpy()


def _ort_logits(session, ids):
    feed = {"input_ids": ids.numpy(), "attention_mask": np.ones(tuple(ids.shape), dtype=np.int64)}
    return session.run(["logits"], feed)[0]


@pytest.mark.parametrize("model_type", EXPORTABLE)
def test_clean_export_matches_torch_for_new_shapes(model_type, chip):
    model, targets, proto, found, weight_only = _export(model_type, chip)
    assert sorted([*found, *weight_only]) == sorted(t.name for t in targets)
    assert analog_op.analog_nodes(proto)
    session = make_session(proto)
    for shape in SHAPES:
        ids = _ids(shape)
        diff = np.abs(_ort_logits(session, ids) - _torch_logits(model, ids)).max()
        assert diff <= ATOL, (model_type, shape, diff)


def _replace_initializer(proto, old: torch.Tensor, new: torch.Tensor) -> None:
    """Overwrite the initializer holding ``old`` (as stored, or transposed by constant folding)."""
    for tensor in proto.graph.initializer:
        for before, after in ((old, new), (old.t(), new.t())):
            if tensor.raw_data == before.contiguous().numpy().tobytes() and list(tensor.dims) == list(
                before.shape
            ):
                tensor.raw_data = after.contiguous().numpy().tobytes()
                return
    raise AssertionError("router weight not found in the graph")


def test_moe_graph_is_not_baked_to_the_trace_routing(chip):
    """Re-route every token (new router weights in torch and in the graph): outputs still agree."""
    model, _, proto, _, _ = _export("olmoe", chip)
    nodes = analog_op.analog_nodes(proto)
    attrs = [analog_op.node_attrs(n) for n in nodes]
    experts = {a["expert"] for a in attrs if "experts" in str(a["tensor"])}
    assert experts == set(range(model.config.num_experts))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.model.layers:
            weight = layer.mlp.gate.weight
            new = torch.randn(weight.shape, generator=generator) * 3
            _replace_initializer(proto, weight, new)
            weight.copy_(new)
    session = make_session(proto)
    ids = _ids((2, 50), seed=3)
    diff = np.abs(_ort_logits(session, ids) - _torch_logits(model, ids)).max()
    assert diff <= ATOL


def test_analog_node_attributes_and_metadata(chip):
    _, _, proto, _, _ = _export("olmoe", chip)
    assert proto.producer_name == "cimconvert" and proto.producer_version
    assert any(f.domain == analog_op.DOMAIN and f.name == analog_op.OP_TYPE for f in proto.functions)
    assert any(o.domain == analog_op.DOMAIN for o in proto.opset_import)
    attrs = analog_op.node_attrs(analog_op.analog_nodes(proto)[0])
    assert attrs["tensor"] == "model.layers.0.self_attn.q_proj.weight"
    assert attrs["layout"] == "out_in" and attrs["expert"] == -1
    assert attrs["tile_in_sizes"] == [32] and attrs["profile_hash"] == chip.content_hash()
    meta = read_metadata(proto)
    assert meta["profile"] == "chipA" and meta["model_type"] == "olmoe"
    assert len(json.loads(meta["analog_tensors"])) == len(analog_tensors(proto))
    onnx.checker.check_model(proto)


def test_external_data_is_one_page_aligned_file(chip, tmp_path):
    model, _, proto, _, _ = _export("llama", chip)
    paths = save_onnx(proto, tmp_path, external=True)
    assert [p.name for p in paths] == ["model.onnx", "model.onnx_data"]
    saved = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in saved.graph.initializer for e in t.external_data if e.key == "offset"]
    assert offsets and all(o % 4096 == 0 for o in offsets)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = _ids((2, 9))
    assert np.abs(_ort_logits(session, ids) - _torch_logits(model, ids)).max() <= ATOL


@pytest.mark.parametrize("model_type", ["olmoe", "mamba"])
def test_programmed_weights_bit_identical_and_logits_agree(model_type, chip):
    """IO-bound programmed weights equal noise.py's for the same seed; weight-noise logits agree."""
    model, _, proto, _, _ = _export(model_type, chip)
    tensors = analog_tensors(proto)
    runner = OrtNoiseRunner(proto, chip, tensors, mvm=False)
    ids = _ids((2, 24))
    for seed in (1000, 1001):
        bound = runner.program(seed)
        ort_out = runner.logits(ids.numpy())
        handle = apply_chip_noise(model, tensors, chip, seed)
        try:
            assert bound_equal(bound, dict(model.named_parameters()))
            for hook in handle._hooks:  # weight noise only: drop the per-MVM simulation
                hook.remove()
            for config, previous in handle._configs:
                config._experts_implementation_internal = previous
            diff = np.abs(ort_out - _torch_logits(model, ids)).max()
        finally:
            handle._hooks.clear()
            handle.restore()
        assert diff <= ATOL
    runner.clean()
    assert np.abs(runner.logits(ids.numpy()) - _torch_logits(model, ids)).max() <= ATOL


@pytest.mark.parametrize("model_type", ["olmoe", "mamba2"])
def test_mvm_body_matches_torch_dac_adc(model_type, chip):
    """The standard-op per-MVM body equals simulator.analog_matmul when no random per-MVM noise is on
    (several input tiles, padded short tiles, 8-bit DAC/ADC)."""
    profile = chip.model_copy(
        update={
            "mvm": chip.mvm.model_copy(update={"out_noise": 0.0}),
            "mapping": chip.mapping.model_copy(update={"tile_rows": 24}),
        }
    )
    model, _, proto, _, _ = _export(model_type, profile)
    tensors = analog_tensors(proto)
    runner = OrtNoiseRunner(proto, profile, tensors)
    assert runner.mvm
    runner.program(5)
    ids = _ids((2, 24))
    with apply_chip_noise(model, tensors, profile, 5):
        reference = _torch_logits(model, ids)
    assert np.abs(runner.logits(ids.numpy()) - reference).max() <= ATOL
