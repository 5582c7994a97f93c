"""onnxruntime sessions for exported graphs: ideal, programmed-noise (overridable weights) and per-MVM.

One graph serves every mode. :func:`prepare_model` derives the variant a session runs:

* ``overridable``: the named initializers are also declared as graph inputs, so an IO binding can feed
  programmed weights each draw without rebuilding the session (ORT then keeps them non-constant);
* ``mvm_profile``: every AnalogMatMul node becomes one of the per-MVM ops of
  :func:`cimconvert.onnx.analog_op.mvm_functions` (DAC, per-MVM noise, ADC in standard ops), with the
  profile's tile grid and a noise seed in its attributes. Its weight and scale inputs are new graph
  inputs (:class:`MvmInput`) that take the weights *prepared* once per programming
  (``simulator.prepare_mvm``: tiled, normalised, in ADC units), so a call does only
  DAC → matmul → noise → ADC; initializers no node reads any more are dropped.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper, numpy_helper

from cimconvert.onnx import analog_op
from cimconvert.onnx.analog_op import AnalogSpec
from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator import rng
from cimconvert.simulator.rng import stable_seed

#: onnxruntime log level for our sessions (3 = errors only: overridable initializers warn otherwise).
LOG_LEVEL = 3


def session_options(threads: int = 1, arena: bool = True) -> ort.SessionOptions:
    """Session options: ``threads`` intra-op threads, one inter-op thread, all graph optimisations;
    ``arena=False``: no CPU memory arena (buffers are freed after each run instead of kept reserved)."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = arena
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = LOG_LEVEL
    return options


def load_model(path: str | Path, external_data: bool = True) -> ModelProto:
    """Load a graph, with its external data unless ``external_data=False`` (then only references)."""
    return onnx.load(str(path), load_external_data=external_data)


def initializer_arrays(model: ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of the named initializers (copies, float32 as stored; external data already loaded)."""
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer if t.name in wanted}


def initializer_protos(model: ModelProto, names: Iterable[str]) -> dict[str, onnx.TensorProto]:
    """Detached copies of the named initializers (only references when their data is external)."""
    wanted = set(names)
    out: dict[str, onnx.TensorProto] = {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted:
            out[tensor.name] = onnx.TensorProto()
            out[tensor.name].CopyFrom(tensor)
    return out


def initializer_value(tensor: onnx.TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """A fresh array of ``tensor``'s value; external data is read from ``base_dir`` (tensor untouched)."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor).copy()
    if base_dir is None:
        raise ValueError(f"initializer {tensor.name} has external data: pass the model's folder")
    info = {entry.key: entry.value for entry in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    offset = int(info.get("offset", 0))
    value = np.fromfile(base_dir / info["location"], dtype=dtype, count=count, offset=offset)
    return value.reshape(tuple(tensor.dims))


def _make_overridable(model: ModelProto, names: Sequence[str]) -> None:
    """Declare initializers as graph inputs too (defaults stay the initializer values)."""
    present = {i.name for i in model.graph.input}
    by_name = {t.name: t for t in model.graph.initializer}
    for name in names:
        if name in present:
            continue
        tensor = by_name[name]
        model.graph.input.append(helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))


def _noise_seed(base: int, tensor: str, expert: int) -> float:
    """Per-node RandomNormalLike seed from (base seed, tensor, expert): the project's one seeding hash,
    cut to 24 bits so the float attribute holds it exactly."""
    return float(stable_seed(base, f"mvm:{tensor}:{expert}") & 0xFFFFFF)


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def retile(model: ModelProto, profile: ChipProfile, noise_seed: int = 0) -> None:
    """Rewrite every AnalogMatMul's tile attributes for ``profile`` and give it its noise seed
    (``RandomNormalLike``) and noise key (counter generator: ``simulator.rng.node_key``)."""
    for node in analog_op.analog_nodes(model):
        attrs = analog_op.node_attrs(node)
        spec = AnalogSpec(
            tensor=str(attrs["tensor"]), kind=str(attrs["kind"]), layout=str(attrs["layout"]),
            in_features=int(attrs["in_features"]), out_features=int(attrs["out_features"]),  # type: ignore[arg-type]
            tile_rows=profile.mapping.tile_rows, tile_cols=profile.mapping.tile_cols,
            profile=profile.name, profile_hash=profile.content_hash(), expert=int(attrs["expert"]),  # type: ignore[arg-type]
        )  # fmt: skip
        for key in (
            "s_shape3",
            "tile_in_sizes",
            "tile_out_sizes",
            "tile_index",
            "tile_shape_x",
            "tile_shape_w",
        ):
            _set_attr(node, key, spec.attributes()[key])
        _set_attr(node, "noise_seed", _noise_seed(noise_seed, spec.tensor, spec.expert))
        _set_attr(node, "noise_key", list(rng.node_key(spec.tensor, spec.expert)))


@dataclass(frozen=True)
class MvmInput:
    """The prepared-weight inputs of one per-MVM node: ``prepare_mvm`` output of (tensor, expert).

    ``weight``: Ŵ/unit, ``[max_in, out]`` (one input tile) or ``[n_in, max_in, out]``; ``scales``:
    s·unit, ``[1, out]`` or ``[n_in, 1, out]``; ``abs_weight``: |Ŵ|/unit² like ``weight`` (``pcm_read``
    w_noise only).
    """

    tensor: str
    expert: int
    weight: str
    scales: str
    abs_weight: str | None
    weight_shape: tuple[int, ...]
    scales_shape: tuple[int, ...]


def _mvm_input(attrs: dict[str, object], abs_weights: bool) -> MvmInput:
    tensor, expert = str(attrs["tensor"]), int(attrs["expert"])  # type: ignore[call-overload]
    sizes = [int(v) for v in attrs["tile_in_sizes"]]  # type: ignore[attr-defined]
    out = int(attrs["out_features"])  # type: ignore[call-overload]
    suffix = "" if expert < 0 else f"[{expert}]"
    single = len(sizes) == 1
    return MvmInput(
        tensor=tensor,
        expert=expert,
        weight=f"{tensor}::mvm_w{suffix}",
        scales=f"{tensor}::mvm_s{suffix}",
        abs_weight=f"{tensor}::mvm_abs{suffix}" if abs_weights else None,
        weight_shape=(sizes[0], out) if single else (len(sizes), max(sizes), out),
        scales_shape=(1, out) if single else (len(sizes), 1, out),
    )


def _used_names(graph: onnx.GraphProto, into: set[str]) -> set[str]:
    """Every value name a node of ``graph`` (or of a subgraph, e.g. a Scan body) reads."""
    for node in graph.node:
        into.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _used_names(sub, into)
    return into


def use_prepared_weights(model: ModelProto, profile: ChipProfile, counter: bool = False) -> list[MvmInput]:
    """Switch every AnalogMatMul of ``model`` (already :func:`retile`'d) to its per-MVM op in place.

    Each node reads new graph inputs for its prepared weights (declared once per (tensor, expert));
    initializers no longer read by any node are removed. ``counter``: every node also reads the run
    key input ``analog_op.NOISE_KEY_INPUT`` (uint32 ``[3]``). Returns the prepared-weight inputs to bind.
    """
    abs_weights = analog_op.mvm_uses_abs_weights(profile)
    inputs: dict[str, MvmInput] = {}
    for node in analog_op.analog_nodes(model):
        attrs = analog_op.node_attrs(node)
        spec = _mvm_input(attrs, abs_weights)
        names = [spec.weight, spec.scales] + ([spec.abs_weight] if spec.abs_weight else [])
        names += [analog_op.NOISE_KEY_INPUT] if counter else []
        del node.input[1:]
        node.input.extend(names)
        node.op_type = analog_op.mvm_op_type([int(v) for v in attrs["tile_in_sizes"]])  # type: ignore[attr-defined]
        inputs.setdefault(spec.weight, spec)
    for spec in inputs.values():
        declared = [(spec.weight, spec.weight_shape), (spec.scales, spec.scales_shape)]
        if spec.abs_weight:
            declared.append((spec.abs_weight, spec.weight_shape))
        for name, shape in declared:
            model.graph.input.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shape))
    if counter:
        key = helper.make_tensor_value_info(analog_op.NOISE_KEY_INPUT, onnx.TensorProto.UINT32, [3])
        model.graph.input.append(key)
    used = _used_names(model.graph, set()) | {o.name for o in model.graph.output}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return list(inputs.values())


def mvm_inputs(model: ModelProto) -> list[MvmInput]:
    """The :class:`MvmInput` of a model prepared with an ``mvm_profile`` (read back from its graph)."""
    shapes = {i.name: tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input}
    out: dict[str, MvmInput] = {}
    for node in model.graph.node:
        if node.domain != analog_op.DOMAIN or node.op_type not in analog_op.MVM_OPS:
            continue
        attrs = analog_op.node_attrs(node)
        weight, scales = node.input[1], node.input[2]
        extra = node.input[3] if len(node.input) > 3 else analog_op.NOISE_KEY_INPUT
        out.setdefault(weight, MvmInput(
            tensor=str(attrs["tensor"]), expert=int(attrs["expert"]), weight=weight, scales=scales,  # type: ignore[call-overload]
            abs_weight=extra if extra != analog_op.NOISE_KEY_INPUT else None,
            weight_shape=shapes[weight], scales_shape=shapes[scales],
        ))  # fmt: skip
    return list(out.values())


def prepare_model(
    model: ModelProto,
    overridable: Sequence[str] = (),
    mvm_profile: ChipProfile | None = None,
    noise_seed: int = 0,
    mvm_noise: str = "native",
    copy: bool = True,
) -> ModelProto:
    """``model`` set up for a session mode (see the module docstring); a copy unless ``copy=False``.

    With ``mvm_profile``, names in ``overridable`` that no node reads any more (the weights of the
    rewritten analog nodes) are not declared; :func:`mvm_inputs` lists the prepared-weight inputs.
    ``mvm_noise``: ``native`` (``RandomNormalLike`` seeded from ``noise_seed``) or ``counter`` (the
    counter generator, keyed per run through the graph input ``analog_op.NOISE_KEY_INPUT``).
    """
    if mvm_noise not in analog_op.MVM_NOISE_MODES:
        raise ValueError(f"mvm_noise must be one of {analog_op.MVM_NOISE_MODES}, not {mvm_noise!r}")
    out = model
    if copy:
        out = ModelProto()
        out.CopyFrom(model)
    if mvm_profile is not None:
        counter = mvm_noise == "counter"
        retile(out, mvm_profile, noise_seed)
        use_prepared_weights(out, mvm_profile, counter)
        opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 18)
        analog_op.attach_function(out, analog_op.mvm_functions(mvm_profile, opset, counter))
    present = {t.name for t in out.graph.initializer}
    _make_overridable(out, [name for name in overridable if name in present])
    return out


#: Session config key: folder from which a model given as bytes reads its external initializers.
EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


def make_session(
    model: ModelProto | str | Path,
    threads: int = 1,
    external_dir: str | Path | None = None,
    arena: bool = True,
) -> ort.InferenceSession:
    """An onnxruntime CPU session of an in-memory model or of a ``.onnx`` file.

    An in-memory model either carries its external data or names the folder holding it
    (``external_dir``); onnxruntime then reads those initializers from the file itself.
    """
    options = session_options(threads, arena)
    providers = ["CPUExecutionProvider"]
    if not isinstance(model, ModelProto):
        return ort.InferenceSession(str(model), options, providers=providers)
    if external_dir is not None:
        options.add_session_config_entry(EXTERNAL_FOLDER_KEY, str(external_dir))
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def default_threads() -> int:
    """Intra-op threads: ``OMP_NUM_THREADS`` when set, else 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1
