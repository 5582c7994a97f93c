"""The one experts implementation through which fused 3-D experts reach an analog kernel.

transformers 5 runs fused expert modules through a function chosen by name from
``ALL_EXPERTS_FUNCTIONS`` (the config's ``_experts_implementation``). :data:`EXPERTS_IMPLEMENTATION` is
registered there once, when this module is imported; a config is pointed at it while an
:class:`~cimconvert.analog.patch.AnalogPatch` is open. Each bound experts module carries an
:class:`ExpertsBinding` (kernel, analog parameters, dispatch); modules without a binding fall back to
the implementation their config had before.

Dispatch (which tokens meet which expert) is chosen here and nowhere else: ``sparse`` groups the
routed tokens by expert (:func:`cimconvert.arch.experts.dispatch_experts`, as transformers' eager
function); ``static`` loops over every expert with ``NonZero``-selected tokens (what the ONNX exporter
traces, so the graph holds every expert whatever the trace input routes).

Digital input channels (the ``outlier_channels`` method on fused experts): an experts module may carry,
per fused tensor, the input channels of each expert that run digitally (:func:`set_digital_inputs`,
``[experts, k]``). The fused parameter keeps the full matrix, so a clean forward is unchanged; an analog
projection then runs the kernel on the input with those channels zeroed and adds the exact matmul of
those channels (:meth:`ExpertsBinding.project`), and programming sees only the analog columns
(:func:`analog_columns`). Observers (:func:`observe`) see each routed projection's input and output
(calibration statistics, output-correction fits).
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from cimconvert.arch.experts import Projection, dispatch_experts

#: Attribute of an experts module holding {fused tensor attribute: digital input channels ``[experts, k]``}.
DIGITAL_INPUTS_ATTR = "cim_digital_inputs"
#: Suffix of the buffer holding a fused tensor's digital columns ``[experts, out, k]`` during ONNX export.
DIGITAL_COLUMNS_SUFFIX = "::cim_digital_columns"

#: Name of the experts implementation registered in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``.
EXPERTS_IMPLEMENTATION = "cimconvert_analog"

Dispatch = Literal["sparse", "static"]


class ExpertKernel(Protocol):
    """The part of an analog kernel that runs one expert's projection."""

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W[expert]ᵀ`` of the analog fused tensor ``name`` (no bias)."""
        ...


def dispatch_all_experts(
    module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor, project: Projection
) -> Tensor:
    """Static loop over all experts, sparse token selection (exportable, routing-independent graph).

    Each expert gathers the tokens routed to it (``NonZero`` of ``top_k_index == e``), so a traced
    graph holds every expert and is correct for any routing pattern and any number of tokens.
    """
    has_gate = getattr(module, "has_gate", True)
    first = "gate_up_proj" if has_gate else "up_proj"
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for expert in range(int(module.num_experts)):
        hit = top_k_index == expert
        weight = (top_k_weights * hit.to(top_k_weights.dtype)).sum(-1)
        tokens = torch.nonzero(hit.to(torch.int64).sum(-1) > 0).squeeze(-1)
        h = project(first, expert, hidden_states.index_select(0, tokens))
        h = module._apply_gate(h) if has_gate else module.act_fn(h)
        h = project("down_proj", expert, h)
        if getattr(module, "has_post_expert_norm", False):
            h = module.post_expert_norm(h)
        contribution = (h * weight.index_select(0, tokens)[:, None]).float()
        out = out.index_add(0, tokens, contribution)
    return out.to(hidden_states.dtype)


#: The token dispatch of each mode (the one place that names the routed-experts loops).
DISPATCHERS: dict[Dispatch, Callable[..., torch.Tensor]] = {
    "sparse": dispatch_experts,
    "static": dispatch_all_experts,
}


@dataclass
class ExpertsBinding:
    """One fused experts module routed through ``kernel`` (``analog``: its analog parameter names)."""

    kernel: ExpertKernel | None
    prefix: str
    calls: Counter[str]
    dispatch: Dispatch = "sparse"
    analog: set[str] = field(default_factory=set)

    def project(self, module: nn.Module, pname: str, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's projection ``pname``: through the kernel if analog, exact otherwise (+ bias).

        With digital input channels, the kernel sees the input with those channels zeroed and their
        exact matmul is added (the split is exact without noise).
        """
        if pname in self.analog and self.kernel is not None:
            name = self.prefix + pname
            self.calls[name] += 1
            digital = digital_inputs(module, pname)
            if digital is None:
                y = self.kernel.expert(name, module, expert, x)
            else:
                index = digital[expert]
                y = self.kernel.expert(name, module, expert, x.index_fill(-1, index, 0.0))
                y = y + _digital_part(module, pname, expert, x.index_select(-1, index), index)
        else:
            y = expert_matmul(module, getattr(module, pname)[expert], x)
        for observer in _OBSERVERS.get(module, ()):
            observer(pname, expert, x, y)
        if getattr(module, "has_bias", False):
            y = y + getattr(module, f"{pname}_bias")[expert]
        return y


def expert_matmul(module: nn.Module, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Exact ``x`` times one expert's matrix ``w`` in the experts module's storage layout (no bias)."""
    return x @ w if getattr(module, "is_transposed", False) else nn.functional.linear(x, w)


def _digital_part(module: nn.Module, pname: str, expert: int, x: torch.Tensor, index: Tensor) -> Tensor:
    """Exact matmul of the digital input channels ``x`` (their matrix columns, or the export buffer)."""
    columns = getattr(module, pname + DIGITAL_COLUMNS_SUFFIX, None)
    if columns is not None:
        return nn.functional.linear(x, columns[expert])
    w = getattr(module, pname)[expert]
    columns = w.index_select(0 if getattr(module, "is_transposed", False) else 1, index)
    return expert_matmul(module, columns, x)


def digital_inputs(module: nn.Module, pname: str) -> Tensor | None:
    """The digital input channels ``[experts, k]`` of the fused tensor ``pname`` (None: all analog)."""
    return getattr(module, DIGITAL_INPUTS_ATTR, {}).get(pname)


def set_digital_inputs(module: nn.Module, pname: str, index: Tensor) -> None:
    """Run input channels ``index`` (``[experts, k]``, sorted per expert) of ``pname`` digitally."""
    param = getattr(module, pname)
    if index.dim() != 2 or index.shape[0] != param.shape[0]:
        raise ValueError(f"digital inputs of '{pname}' must be [experts={param.shape[0]}, k]")
    table = dict(getattr(module, DIGITAL_INPUTS_ATTR, {}))
    table[pname] = index.to(device=param.device, dtype=torch.long)
    setattr(module, DIGITAL_INPUTS_ATTR, table)


def input_dim(layout: str) -> int:
    """The dimension of a fused ``[experts, ., .]`` tensor that indexes inputs (``out_in``: 2, else 1)."""
    return 2 if layout == "out_in" else 1


def column_mask(weight: Tensor, index: Tensor, layout: str) -> Tensor:
    """Boolean mask of ``weight``'s shape, True on the digital input channels ``index`` of each expert."""
    experts, inputs = weight.shape[0], weight.shape[input_dim(layout)]
    mask = torch.zeros(experts, inputs, dtype=torch.bool, device=weight.device)
    mask.scatter_(1, index.to(weight.device), True)
    return mask[:, None, :] if layout == "out_in" else mask[:, :, None]


def analog_columns(weight: Tensor, index: Tensor, layout: str) -> Tensor:
    """A copy of the fused ``weight`` with the digital input channels zeroed (what the crossbar stores)."""
    return weight.masked_fill(column_mask(weight, index, layout), 0.0)


def digital_columns(weight: Tensor, index: Tensor, layout: str) -> Tensor:
    """The digital columns of each expert as ``[experts, out, k]`` (``x_digital @ columnsᵀ``)."""
    w = weight if layout == "out_in" else weight.transpose(1, 2)
    return torch.gather(w, 2, index[:, None, :].expand(-1, w.shape[1], -1).to(w.device))


Observer = Callable[[str, int, Tensor, Tensor], None]
#: experts module → callbacks ``(pname, expert, x, y)`` run after each routed projection.
_OBSERVERS: weakref.WeakKeyDictionary[nn.Module, list[Observer]] = weakref.WeakKeyDictionary()


def observe(module: nn.Module, observer: Observer) -> Callable[[], None]:
    """Call ``observer(pname, expert, x, y)`` after each routed projection of ``module``; returns the
    function that removes it."""
    _OBSERVERS.setdefault(module, []).append(observer)

    def remove() -> None:
        observers = _OBSERVERS.get(module, [])
        if observer in observers:
            observers.remove(observer)

    return remove


#: experts module → its binding, while a patch is open.
_BOUND: weakref.WeakKeyDictionary[nn.Module, ExpertsBinding] = weakref.WeakKeyDictionary()
#: id(config) → the implementation unbound modules of that config fall back to (None: eager).
_FALLBACK: dict[int, str | None] = {}


def bind(module: nn.Module, binding: ExpertsBinding) -> None:
    """Route ``module``'s experts through ``binding`` (until :func:`unbind`)."""
    _BOUND[module] = binding


def unbind(module: nn.Module) -> None:
    """Remove ``module``'s binding."""
    _BOUND.pop(module, None)


def binding_of(module: nn.Module) -> ExpertsBinding | None:
    """The binding of ``module`` (None when unbound)."""
    return _BOUND.get(module)


def switch_config(config: Any, keep_previous: bool) -> str | None:
    """Point ``config`` at :data:`EXPERTS_IMPLEMENTATION`; returns the implementation it had.

    Unbound experts modules of that config then run the previous implementation (``keep_previous``)
    or transformers' eager function.
    """
    previous = getattr(config, "_experts_implementation_internal", None)
    _FALLBACK[id(config)] = previous if keep_previous else None
    config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
    return previous


def restore_config(config: Any, previous: str | None) -> None:
    """Undo :func:`switch_config`."""
    config._experts_implementation_internal = previous
    _FALLBACK.pop(id(config), None)


def _fallback(module: nn.Module) -> Callable[..., torch.Tensor]:
    previous = _FALLBACK.get(id(module.config))
    eager = getattr(type(module).forward, "__wrapped__", None)
    if previous in (None, "eager", EXPERTS_IMPLEMENTATION) or previous not in ALL_EXPERTS_FUNCTIONS:
        if eager is None:
            raise RuntimeError(f"no eager experts forward for {type(module).__name__}")
        return eager
    return ALL_EXPERTS_FUNCTIONS[previous]


def analog_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts implementation (``ALL_EXPERTS_FUNCTIONS`` signature): bound modules through their kernel."""
    binding = _BOUND.get(self)
    if binding is None:
        return _fallback(self)(self, hidden_states, top_k_index, top_k_weights)
    return DISPATCHERS[binding.dispatch](
        self, hidden_states, top_k_index, top_k_weights,
        lambda pname, expert, x: binding.project(self, pname, expert, x),
    )  # fmt: skip


ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPLEMENTATION] = analog_experts_forward
