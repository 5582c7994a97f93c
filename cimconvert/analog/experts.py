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
        """One expert's projection ``pname``: through the kernel if analog, exact otherwise (+ bias)."""
        if pname in self.analog and self.kernel is not None:
            name = self.prefix + pname
            self.calls[name] += 1
            y = self.kernel.expert(name, module, expert, x)
        else:
            w = getattr(module, pname)[expert]
            y = x @ w if getattr(module, "is_transposed", False) else nn.functional.linear(x, w)
        if getattr(module, "has_bias", False):
            y = y + getattr(module, f"{pname}_bias")[expert]
        return y


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
