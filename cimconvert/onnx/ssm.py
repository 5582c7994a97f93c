"""Dynamic-length SSM scans for export: Mamba / FalconMamba selective scan and the Mamba2 SSD scan.

transformers' CPU paths run the recurrence as a Python loop over time (Mamba, FalconMamba) or as a
chunked SSD whose padding is computed from a Python ``int`` (Mamba2), so every exporter freezes the
sequence length. During export the module-level scan functions are swapped for versions that emit one
``ai.cimconvert::SelectiveScan`` / ``ai.cimconvert::SsdScan`` node; :func:`attach_scan_functions`
defines them as model-local functions whose body is an ONNX ``Scan`` over the time axis (state
``h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·x_t``, output ``y_t = ⟨h_t, C_t⟩``), which onnxruntime runs for
any sequence length. The projections around the scan (in_proj, x_proj, out_proj) are ordinary
modules and export as AnalogMatMul; Mamba's ``dt_proj.weight`` is read directly by HF
(``weight @ dt``), so it stays a plain MatMul on its named initializer (programmed noise applies, as
in the torch simulator, which treats it as weight-only).
"""

from __future__ import annotations

import importlib
from typing import Any

import onnx
import torch
import torch.nn.functional as F
from onnx import FunctionProto, ModelProto, TensorProto, helper

from cimconvert.onnx.analog_op import DOMAIN

#: transformers module → name of its module-level scan function, and our export replacement's kind.
_SCANS = {
    "transformers.models.mamba.modeling_mamba": ("mamba_selective_scan", "selective"),
    "transformers.models.falcon_mamba.modeling_falcon_mamba": ("mamba_selective_scan", "selective"),
    "transformers.models.mamba2.modeling_mamba2": ("mamba2_chunk_scan", "ssd"),
}
SELECTIVE = "SelectiveScan"
SSD = "SsdScan"


# ----------------------------------------------------------------------------------------------
# torch side
# ----------------------------------------------------------------------------------------------


def selective_scan_reference(
    u: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``y [B, I, L]`` of the Mamba recurrence for ``u, dt [B, I, L]``, ``a [I, N]``, ``b, c [B, N, L]``."""
    d_a = torch.exp(a[None, :, None, :] * dt[..., None])
    d_bu = dt[..., None] * b.transpose(1, 2)[:, None] * u[..., None]
    h = u.new_zeros(u.shape[0], u.shape[1], a.shape[-1])
    ys = []
    for t in range(u.shape[-1]):
        h = d_a[:, :, t] * h + d_bu[:, :, t]
        ys.append((h * c[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def ssd_scan_reference(
    x: torch.Tensor, dt: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """``y [B, L, H, P]`` of the Mamba2 recurrence (``dt [B, L, H]``, ``a [H]``, ``b, c [B, L, H, N]``)."""
    d_a = torch.exp(dt * a)[..., None, None]
    d_bx = (x * dt[..., None])[..., None] * b[..., None, :]
    h = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], b.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        h = d_a[:, t] * h + d_bx[:, t]
        ys.append((h * c[:, t, :, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


class _ScanFn(torch.autograd.Function):
    """Runs the reference recurrence; exports as one ``ai.cimconvert::<kind>`` node."""

    @staticmethod
    def forward(ctx, u, dt, a, b, c, kind):  # type: ignore[override]
        fn = selective_scan_reference if kind == SELECTIVE else ssd_scan_reference
        return fn(u, dt, a, b, c)

    @staticmethod
    def symbolic(g, u, dt, a, b, c, kind):
        out = g.op(f"{DOMAIN}::{kind}", u, dt, a, b, c)
        out.setType(u.type())
        return out


def _dt(dt: torch.Tensor, bias: torch.Tensor | None, softplus: bool, bias_index: Any) -> torch.Tensor:
    if bias is not None:
        dt = dt + bias.to(dt.dtype)[bias_index]
    return F.softplus(dt) if softplus else dt


def export_selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Drop-in for transformers' ``mamba_selective_scan`` (no cache) that exports with a dynamic length."""
    if return_last_state:
        raise ValueError("the exportable scan runs without a cache (use_cache=False)")
    dt = _dt(dt, delta_bias, delta_softplus, (..., None))
    u = hidden_states.float()
    y = _ScanFn.apply(u, dt.float(), A.float(), B.float(), C.float(), SELECTIVE)
    if D is not None:
        y = y + u * D[None, :, None]
    if z is not None:
        y = y * F.silu(z)
    return y  # fmt: skip


def export_ssd_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int = 0,
    D: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    initial_states: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] = (0.0, float("inf")),
    return_final_states: bool = False,
    **_: Any,
) -> torch.Tensor:
    """Drop-in for transformers' ``mamba2_chunk_scan`` (no cache) that exports with a dynamic length."""
    if return_final_states or initial_states is not None:
        raise ValueError("the exportable scan runs without a cache (use_cache=False)")
    dt = _dt(dt, dt_bias, dt_softplus, ...)
    if dt_limit != (0.0, float("inf")):
        dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1])
    x = hidden_states.float()
    batch, length, heads, _ = x.shape
    groups, state = B.shape[2], B.shape[3]
    rep = heads // groups
    b = (
        B.float()[:, :, :, None, :]
        .expand(batch, length, groups, rep, state)
        .reshape(batch, length, heads, state)
    )
    c = (
        C.float()[:, :, :, None, :]
        .expand(batch, length, groups, rep, state)
        .reshape(batch, length, heads, state)
    )
    y = _ScanFn.apply(x, dt.float(), A.float(), b, c, SSD)
    if D is not None:
        y = y + D[..., None] * x
    return y  # fmt: skip


def patch_mixers(patches: Any, model: Any, specs: Any, profile: Any) -> None:
    """Swap the scan functions of the SSM modules ``model`` uses (restored by ``patches.undo()``)."""
    used = {type(m).__module__ for m in model.modules()}
    for module_name, (attr, kind) in _SCANS.items():
        if module_name not in used:
            continue
        module = importlib.import_module(module_name)
        original = getattr(module, attr)
        setattr(module, attr, export_selective_scan if kind == "selective" else export_ssd_scan)
        patches.call(lambda m=module, a=attr, o=original: setattr(m, a, o))


# ----------------------------------------------------------------------------------------------
# ONNX side: local functions with a Scan body
# ----------------------------------------------------------------------------------------------


def _ints(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node(
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    )


def _scan_body(state_rank: int) -> onnx.GraphProto:
    """One time step: ``h = a·h + b``; ``y = Σ_n h·c`` (the last axis is the state)."""

    def value(name: str, rank: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, [None] * rank)

    nodes = [
        helper.make_node("Mul", ["a_t", "h_in"], ["ah"]),
        helper.make_node("Add", ["ah", "b_t"], ["h_out"]),
        helper.make_node("Mul", ["h_out", "c_t"], ["hc"]),
        _ints("last", [-1]),
        helper.make_node("ReduceSum", ["hc", "last"], ["y_t"], keepdims=0),
    ]
    inputs = [
        value("h_in", state_rank),
        value("a_t", state_rank),
        value("b_t", state_rank),
        value("c_t", state_rank),
    ]
    outputs = [value("h_out", state_rank), value("y_t", state_rank - 1)]
    return helper.make_graph(nodes, "scan_step", inputs, outputs)


def _function(name: str, nodes: list[onnx.NodeProto], opset: int, doc: str) -> FunctionProto:
    return helper.make_function(
        DOMAIN,
        name,
        ["U", "DT", "A", "B", "C"],
        ["Y"],
        nodes,
        [helper.make_opsetid("", opset)],
        doc_string=doc,
    )


def selective_scan_function(opset: int = 18) -> FunctionProto:
    """``SelectiveScan(U, DT [B,I,L], A [I,N], B, C [B,N,L]) → Y [B,I,L]`` with a Scan over L."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("Transpose", ["U"], ["uT"], perm=[2, 0, 1]),  # [L,B,I]
        helper.make_node("Transpose", ["DT"], ["dtT"], perm=[2, 0, 1]),
        helper.make_node("Transpose", ["B"], ["bT"], perm=[2, 0, 1]),  # [L,B,N]
        helper.make_node("Transpose", ["C"], ["cT"], perm=[2, 0, 1]),
        _ints("ax_last", [-1]),
        _ints("ax2", [2]),
        helper.make_node("Unsqueeze", ["dtT", "ax_last"], ["dt4"]),  # [L,B,I,1]
        helper.make_node("Mul", ["dt4", "A"], ["dtA"]),
        helper.make_node("Exp", ["dtA"], ["dA"]),  # [L,B,I,N]
        helper.make_node("Unsqueeze", ["bT", "ax2"], ["b4"]),  # [L,B,1,N]
        helper.make_node("Mul", ["dt4", "b4"], ["dB"]),
        helper.make_node("Unsqueeze", ["uT", "ax_last"], ["u4"]),
        helper.make_node("Mul", ["dB", "u4"], ["dBu"]),  # [L,B,I,N]
        helper.make_node("Unsqueeze", ["cT", "ax2"], ["c4"]),  # [L,B,1,N]
        helper.make_node("Shape", ["U"], ["bi"], start=0, end=2),
        helper.make_node("Shape", ["A"], ["n"], start=1, end=2),
        helper.make_node("Concat", ["bi", "n"], ["h_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["h_shape"], ["h0"], value=zero),
        helper.make_node(
            "Scan", ["h0", "dA", "dBu", "c4"], ["hL", "ys"], num_scan_inputs=3, body=_scan_body(3)
        ),
        helper.make_node("Transpose", ["ys"], ["Y"], perm=[1, 2, 0]),
    ]
    return _function(SELECTIVE, nodes, opset, "Mamba selective scan (no D, no gate), Scan over time")


def ssd_scan_function(opset: int = 18) -> FunctionProto:
    """``SsdScan(X [B,L,H,P], DT [B,L,H], A [H], B, C [B,L,H,N]) → Y [B,L,H,P]`` with a Scan over L."""
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])
    nodes = [
        helper.make_node("Transpose", ["U"], ["xT"], perm=[1, 0, 2, 3]),  # [L,B,H,P]
        helper.make_node("Transpose", ["DT"], ["dtT"], perm=[1, 0, 2]),  # [L,B,H]
        helper.make_node("Transpose", ["B"], ["bT"], perm=[1, 0, 2, 3]),  # [L,B,H,N]
        helper.make_node("Transpose", ["C"], ["cT"], perm=[1, 0, 2, 3]),
        helper.make_node("Mul", ["dtT", "A"], ["dtA"]),
        helper.make_node("Exp", ["dtA"], ["dA3"]),
        _ints("ax_tail", [-1, -2]),
        helper.make_node("Unsqueeze", ["dA3", "ax_tail"], ["dA"]),  # [L,B,H,1,1]
        _ints("ax_last", [-1]),
        helper.make_node("Unsqueeze", ["dtT", "ax_last"], ["dt4"]),
        helper.make_node("Mul", ["xT", "dt4"], ["xdt"]),  # [L,B,H,P]
        helper.make_node("Unsqueeze", ["xdt", "ax_last"], ["xdt5"]),  # [L,B,H,P,1]
        _ints("ax3", [3]),
        helper.make_node("Unsqueeze", ["bT", "ax3"], ["b5"]),  # [L,B,H,1,N]
        helper.make_node("Mul", ["xdt5", "b5"], ["dBx"]),  # [L,B,H,P,N]
        helper.make_node("Unsqueeze", ["cT", "ax3"], ["c5"]),
        helper.make_node("Shape", ["U"], ["b_"], start=0, end=1),
        helper.make_node("Shape", ["U"], ["hp"], start=2, end=4),
        helper.make_node("Shape", ["B"], ["n"], start=3, end=4),
        helper.make_node("Concat", ["b_", "hp", "n"], ["h_shape"], axis=0),
        helper.make_node("ConstantOfShape", ["h_shape"], ["h0"], value=zero),
        helper.make_node(
            "Scan", ["h0", "dA", "dBx", "c5"], ["hL", "ys"], num_scan_inputs=3, body=_scan_body(4)
        ),
        helper.make_node("Transpose", ["ys"], ["Y"], perm=[1, 0, 2, 3]),
    ]
    return _function(SSD, nodes, opset, "Mamba2 SSD recurrence (no D), Scan over time")


def attach_scan_functions(model: ModelProto, opset: int = 18) -> list[str]:
    """Define SelectiveScan / SsdScan as local functions when the graph uses them; returns their names."""
    used = {n.op_type for n in model.graph.node if n.domain == DOMAIN} & {SELECTIVE, SSD}
    builders = {SELECTIVE: selective_scan_function, SSD: ssd_scan_function}
    kept = [f for f in model.functions if not (f.domain == DOMAIN and f.name in used)]
    del model.functions[:]
    model.functions.extend([*kept, *(builders[name](opset) for name in sorted(used))])
    if used and not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return sorted(used)
