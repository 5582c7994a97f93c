"""The ``ai.cimconvert.AnalogMatMul`` op: torch-side marker, ONNX local function bodies, graph helpers.

During export every analog matmul goes through :func:`analog_linear`, an autograd function whose
``symbolic`` emits one ``ai.cimconvert::AnalogMatMul(X, W, S)`` node (legacy TorchScript exporter), so
the weight initializer keeps its in-memory name and the node carries its placement as attributes
(:class:`AnalogSpec`). After export :func:`attach_function` adds a model-local ``FunctionProto`` for the
op, so a stock onnxruntime inlines it and runs the ideal digital model. :func:`mvm_functions` builds
the per-MVM bodies in standard ops (noise management, DAC, per-MVM noise, ADC, digital tile sums) that
the runtime switches each node to, fed with weights prepared once per programming. The op is
specified in docs/ANALOG_OP.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx
import torch
from onnx import FunctionProto, ModelProto, helper

from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator import rng
from cimconvert.simulator.mvm import step_size
from cimconvert.simulator.tiles import split_sizes

DOMAIN = "ai.cimconvert"
OP_TYPE = "AnalogMatMul"
OP_VERSION = 1
#: Suffix of the initializer holding a tensor's digital output scales (``[..., out, n_in_tiles]``).
SCALES_SUFFIX = "::cim_scales"
#: Every attribute an AnalogMatMul node carries (declared on the function, documented in ANALOG_OP.md).
ATTRIBUTES = (
    "tensor", "kind", "layout", "expert", "w_perm", "w_shape3", "s_shape3", "in_features",
    "out_features", "tile_in_sizes", "tile_out_sizes", "tile_index", "tile_shape_x", "tile_shape_w",
    "manifest_tensors", "scales_key", "scales_keys", "profile", "profile_hash", "noise_seed", "noise_key",
)  # fmt: skip
#: Graph input of runtime copies in counter noise mode: the run key (uint32 ``[3]``) of the current forward.
NOISE_KEY_INPUT = "cim::noise_key"
#: Per-MVM noise modes of the runtime bodies: ``native`` (``RandomNormalLike``), ``counter`` (shared draws).
MVM_NOISE_MODES = ("native", "counter")


@dataclass(frozen=True)
class AnalogSpec:
    """Placement of one analog matmul: what the node's attributes say.

    ``tensor``: in-memory parameter name (= the ONNX initializer of ``W``); ``expert``: index into a
    fused ``[E, out, in]`` stack, -1 for a single matrix; ``layout``: ``out_in`` (``W [out, in]``,
    y = x·Wᵀ) or ``in_out`` (``W [in, out]``, y = x·W); ``manifest_tensors``/``scales_keys``: the
    bundle's on-disk tensors (and their keys in ``cim_scales.safetensors``) this matmul implements.
    """

    tensor: str
    kind: str
    layout: str
    in_features: int
    out_features: int
    tile_rows: int
    tile_cols: int
    profile: str
    profile_hash: str
    expert: int = -1
    manifest_tensors: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tile_in_sizes(self) -> list[int]:
        """Inputs per tile along the input dimension (aihwkit near-equal split)."""
        return split_sizes(self.in_features, self.tile_rows)

    @property
    def tile_out_sizes(self) -> list[int]:
        """Outputs per tile along the output dimension."""
        return split_sizes(self.out_features, self.tile_cols)

    def tile_index(self) -> list[int]:
        """Gather index laying the inputs out as ``n_in × max_in`` slots (``in_features`` = padding)."""
        sizes = self.tile_in_sizes
        width = max(sizes)
        index, start = [], 0
        for size in sizes:
            index += list(range(start, start + size)) + [self.in_features] * (width - size)
            start += size
        return index

    def attributes(self) -> dict[str, object]:
        """The node attributes (ONNX attribute name → Python value)."""
        rows, cols = (
            (self.out_features, self.in_features)
            if self.layout == "out_in"
            else (self.in_features, self.out_features)
        )
        n_in, max_in = len(self.tile_in_sizes), max(self.tile_in_sizes)
        return {
            "tensor": self.tensor,
            "kind": self.kind,
            "layout": self.layout,
            "expert": self.expert,
            "w_perm": [1, 0] if self.layout == "out_in" else [0, 1],
            "w_shape3": [-1, rows, cols],
            "s_shape3": [-1, self.out_features, n_in],
            "in_features": self.in_features,
            "out_features": self.out_features,
            "tile_in_sizes": self.tile_in_sizes,
            "tile_out_sizes": self.tile_out_sizes,
            "tile_index": self.tile_index(),
            "tile_shape_x": [-1, n_in, max_in],
            "tile_shape_w": [n_in, max_in, -1],
            "manifest_tensors": list(self.manifest_tensors) or [self.tensor],
            "scales_key": (list(self.manifest_tensors) or [self.tensor])[0],
            "scales_keys": list(self.manifest_tensors) or [self.tensor],
            "profile": self.profile,
            "profile_hash": self.profile_hash,
        }


def _symbolic_attrs(spec: AnalogSpec) -> dict[str, object]:
    """Attributes with the legacy exporter's type suffixes (``_s`` strings, ``_i`` ints, lists alike)."""
    out: dict[str, object] = {}
    for key, value in spec.attributes().items():
        if isinstance(value, str):
            out[f"{key}_s"] = value
        elif isinstance(value, int):
            out[f"{key}_i"] = value
        elif value and isinstance(value[0], str):  # type: ignore[index]
            out[f"{key}_s"] = value
        else:
            out[f"{key}_i"] = value
    return out


def matmul_reference(x: torch.Tensor, w: torch.Tensor, spec: AnalogSpec) -> torch.Tensor:
    """The ideal digital semantics: ``x · W[expert]ᵀ`` (``out_in``) or ``x · W[expert]`` (``in_out``)."""
    matrix = w[spec.expert] if w.dim() == 3 else w
    if spec.layout == "out_in":
        return torch.nn.functional.linear(x, matrix)
    return x @ matrix


class _AnalogMatMulFn(torch.autograd.Function):
    """Identity-semantics marker: runs the digital matmul, exports as one AnalogMatMul node."""

    @staticmethod
    def forward(ctx, x, w, scales, spec):  # type: ignore[override]
        return matmul_reference(x, w, spec)

    @staticmethod
    def symbolic(g, x, w, scales, spec):
        out = g.op(f"{DOMAIN}::{OP_TYPE}", x, w, scales, **_symbolic_attrs(spec))
        sizes = x.type().varyingSizes()
        if sizes:
            out.setType(x.type().with_sizes([*sizes[:-1], spec.out_features]))
        return out


def analog_linear(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor, spec: AnalogSpec) -> torch.Tensor:
    """``y = x·Wᵀ`` (no bias) that exports as ``ai.cimconvert.AnalogMatMul``."""
    return _AnalogMatMulFn.apply(x, w, scales, spec)


# ----------------------------------------------------------------------------------------------
# Function bodies
# ----------------------------------------------------------------------------------------------


def _ref_node(op: str, inputs: list[str], out: str, name: str, kind: int, attr: str) -> onnx.NodeProto:
    """Node whose attribute ``name`` takes the value of the calling node's attribute ``attr``."""
    node = helper.make_node(op, inputs, [out])
    node.attribute.append(helper.make_attribute_ref(name, kind, ref_attr_name=attr))  # type: ignore[arg-type]
    return node


def _const_ints(out: str, attr: str) -> onnx.NodeProto:
    """``Constant`` whose int list comes from the calling node's attribute ``attr``."""
    return _ref_node("Constant", [], out, "value_ints", onnx.AttributeProto.INTS, attr)


def _const_int(out: str, attr: str) -> onnx.NodeProto:
    """``Constant`` scalar int from the calling node's attribute ``attr``."""
    return _ref_node("Constant", [], out, "value_int", onnx.AttributeProto.INT, attr)


def _transpose_ref(inp: str, out: str) -> onnx.NodeProto:
    """``Transpose`` with ``perm`` = the calling node's ``w_perm``."""
    return _ref_node("Transpose", [inp], out, "perm", onnx.AttributeProto.INTS, "w_perm")


def _select_nodes(source: str, shape_attr: str, out: str) -> list[onnx.NodeProto]:
    """``out = Reshape(source, @shape_attr)[@expert]``: one matrix of a (possibly stacked) tensor."""
    return [
        _const_ints(f"{out}_shape", shape_attr),
        helper.make_node("Reshape", [source, f"{out}_shape"], [f"{out}_3d"]),
        _const_int(f"{out}_index", "expert"),
        helper.make_node("Gather", [f"{out}_3d", f"{out}_index"], [out], axis=0),
    ]


def _function(nodes: list[onnx.NodeProto], opset: int, doc: str) -> FunctionProto:
    return helper.make_function(
        DOMAIN,
        OP_TYPE,
        inputs=["X", "W", "S"],
        outputs=["Y"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
        doc_string=doc,
    )


def ideal_function(opset: int = 18) -> FunctionProto:
    """Body of the ideal digital model: ``Y = X · Transpose(W[expert], w_perm)`` (S unused)."""
    nodes = [
        *_select_nodes("W", "w_shape3", "Wm"),
        _transpose_ref("Wm", "Wt"),
        helper.make_node("MatMul", ["X", "Wt"], ["Y"]),
    ]
    return _function(nodes, opset, "ideal digital matmul: Y = X . W^T (out_in) or X . W (in_out)")


def _c(name: str, value: float | list[int]) -> onnx.NodeProto:
    if isinstance(value, list):
        tensor = helper.make_tensor(name, onnx.TensorProto.INT64, [len(value)], value)
    else:
        tensor = helper.make_tensor(name, onnx.TensorProto.FLOAT, [], [float(value)])
    return helper.make_node("Constant", [], [name], value=tensor)


#: Runtime op types of the per-MVM bodies (inputs X, Wn, Sn[, An]; see :func:`mvm_functions`):
#: one input tile / several equal tiles / several tiles of unequal size (short tiles zero-padded).
MVM_OP = "AnalogMatMulMvm"
MVM_TILED_OP = "AnalogMatMulMvmTiled"
MVM_PADDED_OP = "AnalogMatMulMvmPadded"
MVM_OPS = (MVM_OP, MVM_TILED_OP, MVM_PADDED_OP)


def mvm_op_type(in_sizes: list[int]) -> str:
    """The per-MVM body a matmul with input tiles ``in_sizes`` runs."""
    if len(in_sizes) == 1:
        return MVM_OP
    return MVM_TILED_OP if len(set(in_sizes)) == 1 else MVM_PADDED_OP


def mvm_uses_abs_weights(profile: ChipProfile) -> bool:
    """Whether the per-MVM body takes |Ŵ| as a fourth input (``pcm_read`` w_noise)."""
    return profile.mvm.w_noise > 0 and profile.mvm.w_noise_type == "pcm_read"


def _tile_x_nodes(padded: bool) -> list[onnx.NodeProto]:
    """X ``[..., in]`` → Xt ``[n_in, N, max_in]`` (+ ``lead`` = X's leading shape)."""
    nodes = [helper.make_node("Shape", ["X"], ["lead"], start=0, end=-1)]
    if padded:
        nodes += [
            helper.make_node("Shape", ["X"], ["in_dim"], start=-1),
            _c("minus1", [-1]),
            helper.make_node("Concat", ["minus1", "in_dim"], ["x2_shape"], axis=0),
            helper.make_node("Reshape", ["X", "x2_shape"], ["X2"]),
            _c("pad_x", [0, 0, 0, 1]),
            helper.make_node("Pad", ["X2", "pad_x"], ["Xp"]),
            _const_ints("tidx", "tile_index"),
            helper.make_node("Gather", ["Xp", "tidx"], ["Xg"], axis=1),
            _const_ints("tshape_x", "tile_shape_x"),
            helper.make_node("Reshape", ["Xg", "tshape_x"], ["Xr"]),
        ]
    else:
        nodes += [
            _const_ints("tshape_x", "tile_shape_x"),
            helper.make_node("Reshape", ["X", "tshape_x"], ["Xr"]),
        ]
    return [*nodes, helper.make_node("Transpose", ["Xr"], ["Xt"], perm=[1, 0, 2])]


def _dac_nodes(x: str, dac_step: float | None) -> list[onnx.NodeProto]:
    """Noise management (α = max|x| per vector and tile) and DAC rounding: ``x`` → xn, alpha."""
    nodes = [
        helper.make_node("Abs", [x], ["Xabs"]),
        _c("axis_last", [-1]),
        helper.make_node("ReduceMax", ["Xabs", "axis_last"], ["amax"], keepdims=1),
        _c("tiny", float(torch.finfo(torch.float32).tiny)),
        helper.make_node("Max", ["amax", "tiny"], ["alpha"]),
    ]
    if dac_step is None:
        return [*nodes, helper.make_node("Div", [x, "alpha"], ["xn"])]
    return [
        *nodes,
        _c("dac_step", dac_step),
        helper.make_node("Mul", ["alpha", "dac_step"], ["alpha_step"]),
        helper.make_node("Div", [x, "alpha_step"], ["xq"]),
        helper.make_node("Round", ["xq"], ["xr"]),
        helper.make_node("Mul", ["xr", "dac_step"], ["xn"]),
    ]


def _random_normal_like(inp: str, out: str, scale: float = 1.0) -> onnx.NodeProto:
    """``RandomNormalLike`` (float32, std ``scale``) seeded from the calling node's ``noise_seed``."""
    node = _ref_node("RandomNormalLike", [inp], out, "seed", onnx.AttributeProto.FLOAT, "noise_seed")
    node.attribute.append(helper.make_attribute("dtype", onnx.TensorProto.FLOAT))
    if scale != 1.0:
        node.attribute.append(helper.make_attribute("scale", float(scale)))
    return node


def _scalar(name: str, dtype: int, value: int) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [], [value]))


def _u32(name: str, value: int) -> onnx.NodeProto:
    """uint32 scalar ``Constant``."""
    return _scalar(name, onnx.TensorProto.UINT32, value)


def _i64(name: str, value: int) -> onnx.NodeProto:
    """int64 scalar ``Constant``."""
    return _scalar(name, onnx.TensorProto.INT64, value)


def _hash32_nodes(x: str, out: str) -> list[onnx.NodeProto]:
    """lowbias32 of uint32 ``x`` (``simulator.rng.hash32_``): xor-shift, ·, xor-shift, ·, xor-shift."""
    nodes: list[onnx.NodeProto] = []
    cur = x
    for i, shift in enumerate(rng.HASH_SHIFTS):
        nodes += [
            _u32(f"{out}_s{i}", shift),
            helper.make_node("BitShift", [cur, f"{out}_s{i}"], [f"{out}_r{i}"], direction="RIGHT"),
            helper.make_node("BitwiseXor", [cur, f"{out}_r{i}"], [f"{out}_x{i}" if i < 2 else out]),
        ]
        if i < 2:
            nodes += [
                _u32(f"{out}_m{i}", rng.HASH_MULTIPLIERS[i]),
                helper.make_node("Mul", [f"{out}_x{i}", f"{out}_m{i}"], [f"{out}_p{i}"]),
            ]
            cur = f"{out}_p{i}"
    return nodes


def _uniform_nodes(h: str, out: str) -> list[onnx.NodeProto]:
    """(0, 1) float32 uniforms: top 24 bits of ``h``, lowest bit forced to 1, times 2⁻²⁴."""
    return [
        _u32(f"{out}_sh", rng.UNIFORM_SHIFT),
        helper.make_node("BitShift", [h, f"{out}_sh"], [f"{out}_hi"], direction="RIGHT"),
        _u32(f"{out}_one", 1),
        helper.make_node("BitwiseOr", [f"{out}_hi", f"{out}_one"], [f"{out}_odd"]),
        helper.make_node("Cast", [f"{out}_odd"], [f"{out}_f"], to=onnx.TensorProto.FLOAT),
        _c(f"{out}_scale", rng.UNIFORM_SCALE),
        helper.make_node("Mul", [f"{out}_f", f"{out}_scale"], [out]),
    ]


def _counter_key_nodes() -> list[onnx.NodeProto]:
    """Key words ``ck0, ck1, ck2`` (uint32 scalars) = run key input ``K`` XOR the node's ``noise_key``."""
    nodes = [
        _const_ints("nk_i64", "noise_key"),
        helper.make_node("Cast", ["nk_i64"], ["nk"], to=onnx.TensorProto.UINT32),
        helper.make_node("BitwiseXor", ["K", "nk"], ["ck"]),
    ]
    for i in range(3):
        nodes += [
            _i64(f"ck_i{i}", i),
            helper.make_node("Gather", ["ck", f"ck_i{i}"], [f"ck{i}"], axis=0),
        ]
    return nodes


def _counter_normal_nodes(like: str, out: str) -> list[onnx.NodeProto]:
    """Standard normals shaped like ``like`` from the counter generator (``simulator.rng.counter_normal``)."""
    return [
        *_counter_key_nodes(),
        helper.make_node("Size", [like], ["cn_n"]),
        _i64("cn_z", 0),
        _i64("cn_o", 1),
        _i64("cn_t", 2),
        helper.make_node("Add", ["cn_n", "cn_o"], ["cn_n1"]),
        helper.make_node("Div", ["cn_n1", "cn_t"], ["cn_m"]),  # ⌈n/2⌉ pairs (int64 scalars)
        helper.make_node("Range", ["cn_z", "cn_m", "cn_o"], ["cn_j64"]),
        helper.make_node("Cast", ["cn_j64"], ["cn_j"], to=onnx.TensorProto.UINT32),
        helper.make_node("Add", ["cn_j", "ck0"], ["cn_a0"]),
        *_hash32_nodes("cn_a0", "cn_a"),
        helper.make_node("BitwiseXor", ["cn_a", "ck1"], ["cn_b0"]),
        *_hash32_nodes("cn_b0", "cn_b"),
        helper.make_node("BitwiseXor", ["cn_b", "ck2"], ["cn_c0"]),
        *_hash32_nodes("cn_c0", "cn_c"),
        *_uniform_nodes("cn_b", "cn_ub"),
        *_uniform_nodes("cn_c", "cn_uc"),
        helper.make_node("Log", ["cn_ub"], ["cn_log"]),
        _c("cn_m2", -2.0),
        helper.make_node("Mul", ["cn_log", "cn_m2"], ["cn_r2"]),
        helper.make_node("Sqrt", ["cn_r2"], ["cn_r"]),
        _c("cn_2pi", rng.TWO_PI),
        helper.make_node("Mul", ["cn_uc", "cn_2pi"], ["cn_theta"]),
        helper.make_node("Cos", ["cn_theta"], ["cn_cos"]),
        helper.make_node("Sin", ["cn_theta"], ["cn_sin"]),
        helper.make_node("Mul", ["cn_r", "cn_cos"], ["cn_z0"]),
        helper.make_node("Mul", ["cn_r", "cn_sin"], ["cn_z1"]),
        helper.make_node("Concat", ["cn_z0", "cn_z1"], ["cn_zz"], axis=0),
        _c("cn_start", [0]),
        _c("cn_len", [1]),
        helper.make_node("Reshape", ["cn_n", "cn_len"], ["cn_end"]),
        helper.make_node("Slice", ["cn_zz", "cn_start", "cn_end"], ["cn_flat"]),
        helper.make_node("Shape", [like], ["cn_shape"]),
        helper.make_node("Reshape", ["cn_flat", "cn_shape"], [out]),
    ]


def _standard_normal_nodes(like: str, out: str, counter: bool, scale: float = 1.0) -> list[onnx.NodeProto]:
    """``out`` = scale·N(0, 1) shaped like ``like``: ``RandomNormalLike`` or the counter generator."""
    if not counter:
        return [_random_normal_like(like, out, scale)]
    if scale == 1.0:
        return _counter_normal_nodes(like, out)
    return [
        *_counter_normal_nodes(like, f"{out}_eps"),
        _c(f"{out}_scale", scale),
        helper.make_node("Mul", [f"{out}_eps", f"{out}_scale"], [out]),
    ]


def _noise_nodes(
    profile: ChipProfile, unit: float, counter: bool = False
) -> tuple[list[onnx.NodeProto], str]:
    """Per-MVM output noise (out_noise, w_noise) added to ``y_adc``; returns (nodes, output name).

    Constant σ (out_noise only): normals scaled by σ and one ``Add``. With w_noise, σ depends on x̂
    (and |Ŵ| = input ``A`` for ``pcm_read``), as in ``simulator.mvm._noise_sigma``. ``counter``: the
    normals come from the counter generator keyed by input ``K`` and attribute ``noise_key``.
    """
    spec = profile.mvm
    const = (spec.out_noise / unit) ** 2
    if spec.w_noise <= 0:
        if const == 0:
            return [], "y_adc"
        return [
            *_standard_normal_nodes("y_adc", "noise", counter, const**0.5),
            helper.make_node("Add", ["y_adc", "noise"], ["y_noisy"]),
        ], "y_noisy"
    nodes = [helper.make_node("Mul", ["xn", "xn"], ["xsq"])]
    if mvm_uses_abs_weights(profile):
        nodes.append(helper.make_node("MatMul", ["xsq", "A"], ["read"]))  # A = |Ŵ|/unit²
    else:
        nodes += [
            _c("axis_last2", [-1]),
            helper.make_node("ReduceSum", ["xsq", "axis_last2"], ["xsum"], keepdims=1),
            _c("inv_unit2", 1.0 / unit**2),
            helper.make_node("Mul", ["xsum", "inv_unit2"], ["read"]),
        ]
    nodes += [
        _c("wn2", spec.w_noise**2),
        helper.make_node("Mul", ["read", "wn2"], ["read_var"]),
        _c("var0", const),
        helper.make_node("Add", ["read_var", "var0"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["sigma"]),
        *_standard_normal_nodes("y_adc", "eps", counter),
        helper.make_node("Mul", ["eps", "sigma"], ["noise"]),
        helper.make_node("Add", ["y_adc", "noise"], ["y_noisy"]),
    ]
    return nodes, "y_noisy"


def mvm_function_inputs(profile: ChipProfile, counter: bool = False) -> list[str]:
    """Formal inputs of the per-MVM bodies: ``X, W, S`` [+ ``A`` (pcm_read |Ŵ|)] [+ ``K`` (run key)]."""
    return ["X", "W", "S"] + (["A"] if mvm_uses_abs_weights(profile) else []) + (["K"] if counter else [])


def _mvm_function(profile: ChipProfile, op_type: str, opset: int, counter: bool = False) -> FunctionProto:
    spec = profile.mvm
    unit = step_size(spec.adc_bits, spec.out_bound) or 1.0
    bound = spec.out_bound / unit
    tiled = op_type != MVM_OP
    x = "Xt" if tiled else "X"
    noise, y_name = _noise_nodes(profile, unit, counter)
    nodes = [
        *(_tile_x_nodes(op_type == MVM_PADDED_OP) if tiled else []),
        *_dac_nodes(x, step_size(spec.dac_bits, 1.0)),
        helper.make_node("MatMul", ["xn", "W"], ["y_adc"]),
        *noise,
        _c("lo", -bound),
        _c("hi", bound),
        helper.make_node("Clip", [y_name, "lo", "hi"], ["y_clip"]),
        helper.make_node("Round" if spec.adc_bits is not None else "Identity", ["y_clip"], ["y_q"]),
        helper.make_node("Mul", ["y_q", "alpha"], ["y_a"]),
        helper.make_node("Mul", ["y_a", "S"], ["Y" if not tiled else "y_s"]),
    ]
    if tiled:
        nodes += [
            _c("axis0", [0]),
            helper.make_node("ReduceSum", ["y_s", "axis0"], ["y_sum"], keepdims=0),
            helper.make_node("Shape", ["W"], ["out_dim"], start=-1),
            helper.make_node("Concat", ["lead", "out_dim"], ["y_shape"], axis=0),
            helper.make_node("Reshape", ["y_sum", "y_shape"], ["Y"]),
        ]
    return helper.make_function(
        DOMAIN,
        op_type,
        inputs=mvm_function_inputs(profile, counter),
        outputs=["Y"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", opset)],
        attributes=list(ATTRIBUTES),
        doc_string=f"per-MVM analog simulation for profile {profile.name} ({op_type}"
        f"{', counter noise' if counter else ''})",
    )


def mvm_functions(profile: ChipProfile, opset: int = 18, counter: bool = False) -> list[FunctionProto]:
    """Bodies simulating the per-MVM effects of ``profile`` in standard ops (cf. simulator/mvm.py).

    They run on weights prepared once per programming by ``simulator.prepare_mvm`` (the runtime
    rewrites each AnalogMatMul to one of :data:`MVM_OPS` with inputs ``X``, ``W`` = Ŵ/unit
    ``[max_in, out]`` (one tile) or ``[n_in, max_in, out]``, ``S`` = s·unit ``[1, out]`` or
    ``[n_in, 1, out]`` and, for ``pcm_read`` w_noise, ``A`` = |Ŵ|/unit²). Per call and input tile:
    α = max|x|, DAC rounding, ``x̂·W`` (ADC units), per-MVM noise (``RandomNormalLike``), clip to
    ±out_bound, ADC rounding, then ``Σ_j y_j·α_j·S_j``: the float32 operations of
    ``simulator.analog_matmul`` in the same order.

    ``counter``: the per-MVM normals come from the counter generator (``simulator.rng.counter_normal``)
    keyed by a fifth (or fourth) input ``K`` = the run key (uint32 ``[3]``) and the node's ``noise_key``
    attribute, instead of ``RandomNormalLike``: torch's counter mode then draws the same values.
    """
    return [_mvm_function(profile, op, opset, counter) for op in MVM_OPS]


# ----------------------------------------------------------------------------------------------
# Model helpers
# ----------------------------------------------------------------------------------------------


def analog_nodes(model: ModelProto) -> list[onnx.NodeProto]:
    """The AnalogMatMul nodes of the main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type == OP_TYPE]


def node_attrs(node: onnx.NodeProto) -> dict[str, object]:
    """An AnalogMatMul node's attributes as Python values (strings decoded)."""
    out: dict[str, object] = {}
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, list) and value and isinstance(value[0], bytes):
            value = [v.decode() for v in value]
        out[attr.name] = value
    return out


def attach_function(model: ModelProto, function: FunctionProto | list[FunctionProto]) -> ModelProto:
    """Install model-local function(s) of the domain (replacing previous bodies of the same name)."""
    functions = function if isinstance(function, list) else [function]
    names = {f.name for f in functions}
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in names)]
    del model.functions[:]
    model.functions.extend([*functions, *kept])
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, OP_VERSION))
    return model
