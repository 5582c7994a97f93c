"""Extended straight-through estimation (arXiv 2508.11940): full chip model forward, identity backward.

Each step, every analog weight W is programmed by the complete, non-differentiable simulator
(``simulator.program_weight``: conductance mapping, stuck faults, programming noise, drift, 1/f read
noise, drift compensation) with a fresh draw seeded from (seed, step, tensor name), giving H(W). The
step runs with ``W̃ = H(W) + (W − W.detach())``: its value is exactly H(W), its gradient is the
identity, so ∂L/∂W = ∂L/∂W̃. No graph is built for the noise sampling.

When the profile has per-MVM effects (DAC/ADC quantisation, clipping, out_noise, w_noise), every matmul
that owns an analog weight runs ``simulator.analog_matmul`` on the programmed weights inside
:class:`AnalogMatmulSTE`, whose backward is that of ``y = x·W̃ᵀ`` (grad_x = g·W̃, grad_W = gᵀ·x) — the
straight-through rule for the quantisers and the noise. :class:`SteKernel` is plugged into the one
analog-execution layer (:class:`cimconvert.analog.patch.AnalogPatch`), which routes ``nn.Linear`` /
GPT-2 ``Conv1D`` and transformers-5 fused experts to it for the step; Mamba's ``dt_proj.weight``
(read directly by HF code) gets the weight-level chain only, as in ``cimconvert.analog.chip_noise``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cimconvert.analog.patch import AnalogPatch
from cimconvert.analog.routes import Route, route_of
from cimconvert.finetune.base import Target, generator, iter_targets, named_parameters, step_seed
from cimconvert.profiles import ChipProfile
from cimconvert.simulator import MvmWeights, analog_matmul, prepare_mvm, program_weight
from cimconvert.simulator.program import Layout, clean_scales, out_in_view
from cimconvert.simulator.rng import stable_seed


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
# The kernel
# ----------------------------------------------------------------------------------------------


@dataclass
class SteKernel:
    """Analog kernel of one training step: the straight-through simulated matmul.

    ``weights``: the step's programmed weights prepared for the per-MVM simulation; ``layouts``: each
    tensor's layout (the module's own weight gives the identity gradient).
    """

    gen: torch.Generator
    weights: dict[str, MvmWeights] = field(default_factory=dict)
    layouts: dict[str, Layout] = field(default_factory=dict)

    def linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Straight-through analog ``x @ Wᵀ`` of a Linear/Conv1D weight."""
        w = out_in_view(module.weight, self.layouts[name])
        return AnalogMatmulSTE.apply(x, w, self.weights[name], self.gen)

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Straight-through analog projection of one expert of a fused tensor."""
        w = out_in_view(getattr(module, name.rpartition(".")[2])[expert], self.layouts[name])
        return AnalogMatmulSTE.apply(x, w, self.weights[name].expert(expert), self.gen)


# ----------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------


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
        #: how each analog matmul is simulated: "linear", "experts" or "weight" (weight-level only)
        self.routes: dict[str, Route] = {t.name: route_of(model, t.name) for t in self.targets}
        #: simulated (straight-through) matmul calls per analog tensor, over all steps
        self.calls: Counter[str] = Counter()

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
        kernel = SteKernel(generator(step_seed(self.seed, step, "mvm")))
        patch = AnalogPatch(self.model, kernel, self.calls, keep_fallback=False)
        try:
            if self.mvm:
                self._attach(patch, kernel, programmed)
            yield weights
        finally:
            patch.close()

    def _attach(self, patch: AnalogPatch, kernel: SteKernel, programmed: dict[str, torch.Tensor]) -> None:
        """Route every analog matmul of the step through the straight-through simulation."""
        for target, param in iter_targets(self.targets, self.params):
            if self.routes[target.name] == "weight":
                continue
            kernel.weights[target.name] = self._prepare(param, programmed[target.name], target.layout)
            kernel.layouts[target.name] = target.layout
            patch.route(target.name)

    def _prepare(self, param: torch.Tensor, programmed: torch.Tensor, layout: Layout) -> MvmWeights:
        """Per-MVM weights from H(W) with the digital scales fixed at mapping time (from W)."""
        with torch.no_grad():
            scales = clean_scales(param, layout, self.profile)
            return prepare_mvm(programmed, self.profile, layout, scales=scales)
