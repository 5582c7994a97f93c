"""ONNX export with AnalogMatMul local functions: agreement with torch, dynamic shapes, routing, noise."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tiny_models import VOCAB, build_tiny
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as ds

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.onnx import analog_op, rope
from cimconvert.onnx.analog_op import AnalogSpec
from cimconvert.onnx.export import _Patches, build_onnx, clean_scales, save_onnx
from cimconvert.onnx.metadata import read_metadata
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.runtime import OrtNoiseRunner, analog_tensors, make_session
from cimconvert.runtime.ort_noise import AnalogTensor, bound_equal
from cimconvert.simulator import analog_matmul, prepare_mvm

ATOL = 1e-4
#: Every family: MoE (incl. shared experts, sigmoid/group routing, own DeepSeek v1 module, GraniteMoE's
#: top-k-then-softmax router), dense, SSM.
EXPORTABLE = ["olmoe", "qwen2_moe", "mixtral", "deepseek_v2", "deepseek_v3", "deepseek", "granitemoe",
              "llama", "gpt2", "mamba", "mamba2", "falcon_mamba"]  # fmt: skip
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


def _routers(model) -> list[torch.Tensor]:
    """The router weights of every MoE layer (``mlp.gate.weight [E, hidden]``)."""
    out = []
    for layer in model.model.layers:
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(getattr(gate, "weight", None), torch.nn.Parameter) and hasattr(layer.mlp, "experts"):
            out.append(gate.weight)
    return out


@pytest.mark.parametrize("model_type", ["olmoe", "deepseek_v2"])
def test_moe_graph_is_not_baked_to_the_trace_routing(model_type, chip):
    """Re-route every token (new router weights in torch and in the graph): outputs still agree."""
    model, _, proto, _, _ = _export(model_type, chip)
    nodes = analog_op.analog_nodes(proto)
    attrs = [analog_op.node_attrs(n) for n in nodes]
    experts = {a["expert"] for a in attrs if int(a["expert"]) >= 0}
    assert experts == set(range(model.config.num_experts))
    generator = torch.Generator().manual_seed(7)
    routers = _routers(model)
    assert routers
    with torch.no_grad():
        for weight in routers:
            new = torch.randn(weight.shape, generator=generator) * 3
            _replace_initializer(proto, weight, new)
            weight.copy_(new)
    session = make_session(proto)
    ids = _ids((2, 50), seed=3)
    diff = np.abs(_ort_logits(session, ids) - _torch_logits(model, ids)).max()
    assert diff <= ATOL


def test_real_rotary_patch_matches_complex_deepseek_v2_and_is_undone():
    """The export-time real cos/sin RoPE equals transformers' complex one (≤1e-5) and is removed after."""
    model = build_tiny("deepseek_v2").eval()
    rotary = model.model.rotary_emb
    stock_apply = ds.apply_rotary_emb
    generator = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 9, 4, generator=generator), torch.randn(2, 1, 9, 4, generator=generator)
    positions = torch.arange(9)[None].expand(2, 9)
    freqs_cis = rotary(q, positions)
    reference = stock_apply(q, k, freqs_cis)
    ids = _ids((2, 30))
    stock = _torch_logits(model, ids)
    patches = _Patches()
    try:
        assert rope.patch_complex_rope(patches, model) == ["model.rotary_emb"]
        real = rope.real_apply_rotary_emb(q, k, rotary(q, positions))
        for got, want in zip(real, reference, strict=True):
            assert torch.allclose(got, want, rtol=0, atol=1e-5)
        assert np.abs(_torch_logits(model, ids) - stock).max() <= 1e-5
    finally:
        patches.undo()
    assert ds.apply_rotary_emb is stock_apply and "forward" not in rotary.__dict__
    assert rotary(q, positions).is_complex()


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
    """IO-bound programmed weights equal apply_chip_noise's for the same seed; weight-noise logits agree."""
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
            handle.drop_mvm()  # weight noise only: drop the per-MVM simulation
            diff = np.abs(ort_out - _torch_logits(model, ids)).max()
        finally:
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
    assert runner.mvm and sorted(runner.mvm_inputs) == sorted(
        t.name for t in tensors if t.name not in runner.raw
    )
    runner.program(5)
    ids = _ids((2, 24))
    with apply_chip_noise(model, tensors, profile, 5):
        reference = _torch_logits(model, ids)
    assert np.abs(runner.logits(ids.numpy()) - reference).max() <= ATOL


@pytest.mark.parametrize("in_features", [20, 40, 41])
def test_mvm_op_equals_simulator_analog_matmul(in_features, chip):
    """One AnalogMatMul under the per-MVM runtime (DAC/ADC on, out_noise off) vs simulator.analog_matmul
    on the same prepared weights: one tile, two equal tiles, two unequal (padded) tiles."""
    profile = chip.model_copy(
        update={
            "mvm": chip.mvm.model_copy(update={"out_noise": 0.0}),
            "mapping": chip.mapping.model_copy(update={"tile_rows": 24}),
        }
    )
    out_features = 12
    spec = AnalogSpec(
        tensor="w", kind="mlp", layout="out_in", in_features=in_features, out_features=out_features,
        tile_rows=24, tile_cols=512, profile=profile.name, profile_hash=profile.content_hash(),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=generator) * 0.2
    scales = clean_scales(w, "out_in", profile)
    node = onnx.helper.make_node(
        analog_op.OP_TYPE, ["X", "w", "w::cim_scales"], ["Y"], domain=analog_op.DOMAIN, **spec.attributes()
    )
    inits = [
        onnx.numpy_helper.from_array(w.numpy(), "w"),
        onnx.numpy_helper.from_array(scales.numpy(), "w::cim_scales"),
    ]
    x_info = onnx.helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, None, in_features])
    y_info = onnx.helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph([node], "one_mvm", [x_info], [y_info], inits)
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid(analog_op.DOMAIN, 1)]
    )
    analog_op.attach_function(proto, analog_op.ideal_function(18))
    runner = OrtNoiseRunner(proto, profile, [AnalogTensor("w", "out_in")])
    assert len(runner.mvm_inputs["w"]) == 1 and not runner.raw
    noisy = torch.from_numpy(runner.program(3)["w"])
    x = torch.randn(2, 33, in_features, generator=generator)
    x[0, 0] = 0.0  # an all-zero vector (α clamped to tiny)
    got = runner.run({"X": x.numpy()}, ["Y"])[0]
    want = analog_matmul(x, prepare_mvm(noisy, profile, "out_in", scales.clone()), None).numpy()
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("model_type", ["olmoe", "qwen2_moe"])
def test_analog_router_exports_as_named_weight_only_initializer(model_type, chip):
    """A router placed analog (no nn.Linear: weight-level noise only) keeps its name and layout in ONNX."""
    model = build_tiny(model_type)
    targets = plan_model(model, chip, analog=[r"re:.*mlp\.gate\.weight"]).analog()
    routers = [t.name for t in targets if t.kind == "router"]
    assert routers
    proto, _, weight_only = build_onnx(model, targets, chip)
    assert set(routers) <= set(weight_only)
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    for name in routers:
        assert inits[name] == list(dict(model.named_parameters())[name].shape)
    session = make_session(proto)
    ids = _ids((2, 9))
    assert np.abs(_ort_logits(session, ids) - _torch_logits(model, ids)).max() <= ATOL
