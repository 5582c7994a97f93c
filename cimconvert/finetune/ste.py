"""Extended straight-through estimation (arXiv 2508.11940): full chip model forward, identity backward.

Each step, every analog weight W is programmed by the complete, non-differentiable simulator
(``simulator.program_weight``: conductance mapping, stuck faults, programming noise, drift, 1/f read
noise, drift compensation) with a fresh draw seeded from (seed, step, tensor name), giving H(W). The
step runs with ``W̃ = H(W) + (W − W.detach())``: its value is exactly H(W), its gradient is the
identity, so ∂L/∂W = ∂L/∂W̃. No graph is built for the noise sampling.

When the profile has per-MVM effects (DAC/ADC quantisation, clipping, out_noise, w_noise), every matmul
that owns an analog weight runs ``simulator.analog_matmul`` on the programmed weights inside
:class:`AnalogMatmulSTE`, whose backward is that of ``y = x·W̃ᵀ`` (grad_x = g·W̃, grad_W = gᵀ·x) — the
straight-through rule for the quantisers and the noise. ``nn.Linear`` / GPT-2 ``Conv1D`` are routed by
forward hooks, transformers-5 fused experts by an experts implementation; Mamba's ``dt_proj.weight``
(read directly by HF code) gets the weight-level chain only, as in ``cimconvert.noise``.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from cimconvert.arch.experts import dispatch_experts
from cimconvert.finetune.base import Target, generator, iter_targets, named_parameters, step_seed, to_out_in
from cimconvert.noise import EXPERT_PARAMS, WEIGHT_ONLY_MODULES
from cimconvert.profiles import ChipProfile
from cimconvert.simulator import (
    MvmWeights,
    analog_matmul,
    prepare_mvm,
    program_weight,
    tile_grid,
    weight_scales,
)
from cimconvert.simulator.program import Layout
from cimconvert.simulator.rng import stable_seed

#: Name of the experts implementation registered in ``ALL_EXPERTS_FUNCTIONS`` while STE trains.
STE_EXPERTS = "cimconvert_ste"


class AnalogMatmulSTE(torch.autograd.Function):
    """``y = analog_matmul(x, programmed W)`` forward; backward of ``y = x·W̃ᵀ`` (straight-through).

    ``w`` is the effective weight ``[out, in]`` (value H(W), identity gradient to W); ``mw`` holds the
    same programmed weights prepared for the per-MVM simulation.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, w: torch.Tensor, mw: MvmWeights, gen: torch.Generator | None
    ) -> torch.Tensor:
        """Simulated analog matmul (no graph)."""
        ctx.save_for_backward(x, w)
        return analog_matmul(x.detach(), mw, gen)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:  # type: ignore[override]
        """grad_x = g·W̃, grad_W = gᵀ·x (flattened over the leading dims)."""
        x, w = ctx.saved_tensors
        grad_x = grad.matmul(w.to(grad.dtype)).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            g2 = grad.reshape(-1, grad.shape[-1])
            grad_w = g2.t().matmul(x.reshape(-1, x.shape[-1]).to(g2.dtype)).to(w.dtype)
        return grad_x, grad_w, None, None


def effective_weight(w: torch.Tensor, programmed: torch.Tensor) -> torch.Tensor:
    """``programmed + (w − w.detach())``: value ``programmed`` exactly, gradient identity to ``w``."""
    return programmed + (w - w.detach())


# ----------------------------------------------------------------------------------------------
# nn.Linear / Conv1D hooks
# ----------------------------------------------------------------------------------------------


class _LinearSTE:
    """Forward pre/post hooks: the module multiplies an empty batch; the hook returns the analog result."""

    def __init__(
        self, name: str, mw: MvmWeights, gen: torch.Generator, layout: Layout, calls: Counter[str]
    ) -> None:
        self.name = name
        self.mw = mw
        self.gen = gen
        self.layout = layout
        self.calls = calls
        self._stack: list[torch.Tensor | None] = []

    def pre(self, module: nn.Module, args: tuple[Any, ...]) -> Any:
        """Stash the input and hand the module an empty batch (its own matmul costs nothing)."""
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            self._stack.append(None)
            return None
        self._stack.append(x)
        return (x[..., :0, :], *args[1:])

    def post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        """Replace the (empty) output by the straight-through analog matmul, bias added digitally."""
        x = self._stack.pop() if self._stack else None
        if x is None:
            return output
        self.calls[self.name] += 1
        w = to_out_in(module.weight, self.layout)
        y = AnalogMatmulSTE.apply(x, w, self.mw, self.gen)
        bias = getattr(module, "bias", None)
        return y if bias is None else y + bias


# ----------------------------------------------------------------------------------------------
# Fused experts
# ----------------------------------------------------------------------------------------------


@dataclass
class _ExpertsSTE:
    """Programmed weights of one fused-experts module for the current step."""

    weights: dict[str, MvmWeights] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)
    gen: torch.Generator | None = None
    calls: Counter[str] = field(default_factory=Counter)
    prefix: str = ""


_EXPERTS: weakref.WeakKeyDictionary[nn.Module, _ExpertsSTE] = weakref.WeakKeyDictionary()


def _expert_proj(
    module: nn.Module, state: _ExpertsSTE, pname: str, expert: int, x: torch.Tensor
) -> torch.Tensor:
    """One expert's projection: straight-through analog matmul if analog, exact otherwise."""
    w = getattr(module, pname)[expert]
    mw = state.weights.get(pname)
    if mw is not None:
        state.calls[state.prefix + pname] += 1
        y = AnalogMatmulSTE.apply(x, to_out_in(w, state.layouts[pname]), mw.expert(expert), state.gen)
    else:
        y = x @ w if getattr(module, "is_transposed", False) else nn.functional.linear(x, w)
    if getattr(module, "has_bias", False):
        y = y + getattr(module, f"{pname}_bias")[expert]
    return y


def ste_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts implementation (``ALL_EXPERTS_FUNCTIONS`` signature), differentiable, STE per expert."""
    state = _EXPERTS.get(self)
    if state is None:
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)
    return dispatch_experts(
        self, hidden_states, top_k_index, top_k_weights,
        lambda name, expert, x: _expert_proj(self, state, name, expert, x),
    )


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


@dataclass
class _StepRouting:
    """Hooks and experts state attached for one step (removed when the step's context closes)."""

    hooks: list[RemovableHandle] = field(default_factory=list)
    experts: list[nn.Module] = field(default_factory=list)
    configs: list[tuple[Any, Any]] = field(default_factory=list)

    def close(self) -> None:
        """Remove everything attached."""
        for hook in self.hooks:
            hook.remove()
        for module in self.experts:
            _EXPERTS.pop(module, None)
        for config, previous in reversed(self.configs):
            config._experts_implementation_internal = previous
        self.hooks.clear()
        self.experts.clear()
        self.configs.clear()


class SteNoise:
    """Extended STE: per step, H(W) from the full simulator forward, identity backward.

    ``mvm=False`` skips the per-MVM simulation even when the profile has it (weight-level chain only).
    """

    name = "ste"

    def __init__(
        self, model: nn.Module, targets: Sequence[Target], profile: ChipProfile, seed: int, mvm: bool = True
    ) -> None:
        self.model = model
        self.targets = list(targets)
        self.profile = profile
        self.seed = seed
        self.params = named_parameters(model, self.targets)
        self.mvm = bool(mvm and profile.mvm.active)
        self.routes = {t.name: self._route(t.name) for t in self.targets}
        #: simulated (straight-through) matmul calls per analog tensor, over all steps
        self.calls: Counter[str] = Counter()
        if ALL_EXPERTS_FUNCTIONS.get(STE_EXPERTS) is not ste_experts_forward:
            ALL_EXPERTS_FUNCTIONS[STE_EXPERTS] = ste_experts_forward

    def _route(self, name: str) -> str:
        """How the matmul of ``name`` is simulated: "linear", "experts" or "weight" (weight-level only)."""
        module_path, _, attr = name.rpartition(".")
        owner = self.model.get_submodule(module_path) if module_path else self.model
        last = module_path.rpartition(".")[2]
        if isinstance(owner, (nn.Linear, Conv1D)) and attr == "weight" and last not in WEIGHT_ONLY_MODULES:
            return "linear"
        if attr in EXPERT_PARAMS and self.params[name].dim() == 3 and hasattr(owner, "config"):
            return "experts"
        return "weight"

    def describe(self) -> dict[str, Any]:
        """Method summary (JSON-serialisable)."""
        routes = list(self.routes.values())
        return {
            "method": self.name,
            "forward": "full chip simulator (program_weight"
            + (" + per-MVM analog_matmul)" if self.mvm else ")"),
            "backward": "identity (straight-through)",
            "analog_tensors": len(self.targets),
            "mvm_simulated": sum(r != "weight" for r in routes) if self.mvm else 0,
            "weight_only": sum(r == "weight" for r in routes) if self.mvm else len(routes),
        }

    @torch.no_grad()
    def programmed(self, step: int) -> dict[str, torch.Tensor]:
        """H(W) of every analog tensor for ``step`` (fresh draw per step, seeded from (seed, step, name))."""
        base = step_seed(self.seed, step, "prog")
        return {
            t.name: program_weight(p.detach(), self.profile, generator(stable_seed(base, t.name)), t.layout)
            for t, p in iter_targets(self.targets, self.params)
        }

    @contextmanager
    def perturbed(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """Effective weights W̃ of ``step``; per-MVM routing attached while the context is open."""
        programmed = self.programmed(step)
        weights = {name: effective_weight(self.params[name], h) for name, h in programmed.items()}
        routing = _StepRouting()
        try:
            if self.mvm:
                self._attach(routing, programmed, generator(step_seed(self.seed, step, "mvm")))
            yield weights
        finally:
            routing.close()

    def _attach(
        self, routing: _StepRouting, programmed: dict[str, torch.Tensor], gen: torch.Generator
    ) -> None:
        """Route every analog matmul of the step through the straight-through simulation."""
        for target, param in iter_targets(self.targets, self.params):
            route = self.routes[target.name]
            if route == "weight":
                continue
            mw = self._prepare(param, programmed[target.name], target.layout)
            module_path, _, attr = target.name.rpartition(".")
            owner = self.model.get_submodule(module_path) if module_path else self.model
            if route == "linear":
                sim = _LinearSTE(target.name, mw, gen, target.layout, self.calls)
                routing.hooks.append(owner.register_forward_pre_hook(sim.pre))
                routing.hooks.append(owner.register_forward_hook(sim.post))
            else:
                self._attach_experts(routing, owner, module_path, attr, mw, target.layout, gen)

    def _prepare(self, param: torch.Tensor, programmed: torch.Tensor, layout: Layout) -> MvmWeights:
        """Per-MVM weights from H(W) with the digital scales fixed at mapping time (from W)."""
        with torch.no_grad():
            w3 = to_out_in(param.detach(), layout).float()
            w3 = w3 if w3.dim() == 3 else w3.unsqueeze(0)
            scales = weight_scales(w3, self.profile.mapping, tile_grid(w3.shape, self.profile.mapping))
            return prepare_mvm(programmed, self.profile, layout, scales=scales)

    def _attach_experts(
        self,
        routing: _StepRouting,
        owner: nn.Module,
        module_path: str,
        attr: str,
        mw: MvmWeights,
        layout: Layout,
        gen: torch.Generator,
    ) -> None:
        state = _EXPERTS.get(owner)
        if state is None:
            state = _ExpertsSTE(gen=gen, calls=self.calls, prefix=f"{module_path}.")
            _EXPERTS[owner] = state
            routing.experts.append(owner)
            config = owner.config
            if not any(c is config for c, _ in routing.configs):
                routing.configs.append((config, getattr(config, "_experts_implementation_internal", None)))
                config._experts_implementation_internal = STE_EXPERTS
        state.weights[attr] = mw
        state.layouts[attr] = layout
