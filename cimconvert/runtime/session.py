"""onnxruntime sessions for exported graphs: ideal, programmed-noise (overridable weights) and per-MVM.

One graph serves every mode. :func:`prepare_model` derives the variant a session runs:

* ``overridable``: the named initializers are also declared as graph inputs, so an IO binding can feed
  programmed weights each draw without rebuilding the session (ORT then keeps them non-constant);
* ``mvm_profile``: the AnalogMatMul local function gets the standard-op body of
  :func:`cimconvert.onnx.analog_op.mvm_function` (DAC, per-MVM noise, ADC), with per-node noise seeds
  and the profile's tile grid written into the node attributes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import ModelProto, helper, numpy_helper

from cimconvert.onnx import analog_op
from cimconvert.onnx.analog_op import AnalogSpec
from cimconvert.profiles.schema import ChipProfile

#: onnxruntime log level for our sessions (3 = errors only: overridable initializers warn otherwise).
LOG_LEVEL = 3


def session_options(threads: int = 1) -> ort.SessionOptions:
    """Session options: ``threads`` intra-op threads, one inter-op thread, all graph optimisations."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = LOG_LEVEL
    return options


def load_model(path: str | Path) -> ModelProto:
    """Load a graph with its external data."""
    return onnx.load(str(path), load_external_data=True)


def initializer_arrays(model: ModelProto, names: Iterable[str]) -> dict[str, np.ndarray]:
    """The values of the named initializers (copies, float32 as stored)."""
    wanted = set(names)
    return {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer if t.name in wanted}


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
    """Per-node RandomNormalLike seed (a float attribute) from (base seed, tensor, expert)."""
    digest = hashlib.sha256(f"cimconvert-mvm:{base}:{tensor}:{expert}".encode()).digest()
    return float(int.from_bytes(digest[:3], "little"))


def _set_attr(node: onnx.NodeProto, name: str, value: object) -> None:
    for i, attr in enumerate(node.attribute):
        if attr.name == name:
            del node.attribute[i]
            break
    node.attribute.append(helper.make_attribute(name, value))


def retile(model: ModelProto, profile: ChipProfile, noise_seed: int = 0) -> None:
    """Rewrite every AnalogMatMul's tile attributes for ``profile`` and give it a noise seed."""
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


def prepare_model(
    model: ModelProto,
    overridable: Sequence[str] = (),
    mvm_profile: ChipProfile | None = None,
    noise_seed: int = 0,
) -> ModelProto:
    """A copy of ``model`` set up for a session mode (see the module docstring)."""
    out = ModelProto()
    out.CopyFrom(model)
    if overridable:
        _make_overridable(out, overridable)
    if mvm_profile is not None:
        retile(out, mvm_profile, noise_seed)
        opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 18)
        analog_op.attach_function(out, analog_op.mvm_function(mvm_profile, opset))
    return out


def make_session(model: ModelProto, threads: int = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session of an in-memory model (external data already loaded)."""
    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )


def default_threads() -> int:
    """Intra-op threads: ``OMP_NUM_THREADS`` when set, else 1."""
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1
