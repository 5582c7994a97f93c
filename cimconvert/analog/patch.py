"""Route a model's analog matmuls through a pluggable kernel, and undo it exactly.

An :class:`AnalogPatch` is the one mechanism by which the simulator (programmed weights + per-MVM
noise), noise-aware fine-tuning (straight-through forward) and the ONNX exporter (AnalogMatMul marker
op) take over a model's analog matmuls. The consumer supplies an :class:`AnalogKernel`; the patch
finds each tensor's route (:func:`~cimconvert.analog.routes.route_of`) and

* ``linear`` (``nn.Linear`` / GPT-2 ``Conv1D``): replaces the module's ``forward`` (an instance
  attribute) by ``kernel.linear(name, module, x)`` plus the bias, added digitally;
* ``experts`` (fused 3-D experts): binds the module to the one experts implementation
  (:mod:`cimconvert.analog.experts`) and points its config there; each analog projection calls
  ``kernel.expert(name, module, expert, x)``;
* ``weight``: nothing to route (weight-level effects only; the caller decides what that means).

:meth:`AnalogPatch.close` removes every forward, binding and config switch, last first.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from cimconvert.analog import experts as experts_impl
from cimconvert.analog.experts import Dispatch, ExpertsBinding
from cimconvert.analog.routes import Route, is_fused_experts, owner_of, route_of


class AnalogKernel(Protocol):
    """What runs an analog matmul: clean, simulated, straight-through or an export marker."""

    def linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` of the analog weight ``name`` of a Linear/Conv1D ``module`` (no bias)."""
        ...

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W[expert]ᵀ`` of the analog fused tensor ``name`` of an experts ``module`` (no bias)."""
        ...


class CleanKernel:
    """The exact digital matmul of the module's current weight (the reference a kernel is checked against)."""

    def linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` (``Conv1D`` weights are stored ``[in, out]``)."""
        if isinstance(module, Conv1D):
            return x @ module.weight
        return nn.functional.linear(x, module.weight)

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """``x @ W[expert]ᵀ`` of the fused tensor ``name``."""
        return experts_impl.expert_matmul(module, getattr(module, name.rpartition(".")[2])[expert], x)


def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The activation a Linear/Conv1D forward was called with (positional, ``input=`` or ``x=``)."""
    if args:
        return args[0]
    return kwargs.get("input", kwargs.get("x"))


class AnalogPatch:
    """A model's analog matmuls routed through ``kernel`` until :meth:`close` (a context manager).

    ``calls``: routed matmul calls per tensor (shared with the caller when given). ``dispatch``:
    token dispatch of fused experts (``sparse`` to run, ``static`` to export). ``keep_fallback``:
    unbound experts modules of a switched config keep the implementation they had (else eager).
    """

    def __init__(
        self,
        model: nn.Module,
        kernel: AnalogKernel,
        calls: Counter[str] | None = None,
        dispatch: Dispatch = "sparse",
        keep_fallback: bool = True,
    ) -> None:
        self.model = model
        self.kernel = kernel
        self.calls: Counter[str] = Counter() if calls is None else calls
        self.dispatch = dispatch
        self.keep_fallback = keep_fallback
        self._undo: list[Callable[[], None]] = []
        self._configs: list[int] = []
        self._bindings: dict[int, ExpertsBinding] = {}

    def route(self, name: str) -> Route:
        """Route the matmul owning parameter ``name`` through the kernel; returns the route taken."""
        route = route_of(self.model, name)
        owner, module_path, attr = owner_of(self.model, name)
        if route == "linear":
            self._route_linear(owner, name)
        elif route == "experts":
            self.bind_experts(owner, module_path).analog.add(attr)
        return route

    def bind_experts(self, module: nn.Module, module_path: str) -> ExpertsBinding:
        """Bind a fused experts ``module`` (once) and switch its config; returns its binding."""
        binding = self._bindings.get(id(module))
        if binding is not None:
            return binding
        binding = ExpertsBinding(self.kernel, f"{module_path}.", self.calls, self.dispatch)
        self._bindings[id(module)] = binding
        outer = experts_impl.binding_of(module)
        experts_impl.bind(module, binding)
        self._undo.append(lambda: experts_impl.bind(module, outer) if outer else experts_impl.unbind(module))
        self._switch(module.config)
        return binding

    def bind_all_experts(self) -> None:
        """Bind every fused experts module (digital ones run exact matmuls through the same dispatch)."""
        for path, module in self.model.named_modules():
            if is_fused_experts(module):
                self.bind_experts(module, path)

    def _switch(self, config: Any) -> None:
        if id(config) in self._configs:
            return
        self._configs.append(id(config))
        previous = experts_impl.switch_config(config, self.keep_fallback)
        self._undo.append(lambda: experts_impl.restore_config(config, previous))

    def _route_linear(self, module: nn.Module, name: str) -> None:
        kernel, calls = self.kernel, self.calls
        original = module.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            x = _input(args, kwargs)
            if not isinstance(x, torch.Tensor):
                return original(*args, **kwargs)
            calls[name] += 1
            y = kernel.linear(name, module, x)
            bias = getattr(module, "bias", None)
            return y if bias is None else y + bias

        had = "forward" in module.__dict__
        module.__dict__["forward"] = forward
        self._undo.append(lambda: self._restore_forward(module, had, original))

    @staticmethod
    def _restore_forward(module: nn.Module, had: bool, original: Callable[..., Any]) -> None:
        if had:
            module.__dict__["forward"] = original
        else:
            module.__dict__.pop("forward", None)

    def close(self) -> None:
        """Undo every forward, binding and config switch, last first."""
        while self._undo:
            self._undo.pop()()
        self._configs.clear()
        self._bindings.clear()

    def __enter__(self) -> AnalogPatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
