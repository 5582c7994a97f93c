"""The simulator kernel: a chip profile applied to an in-memory Hugging Face model.

:func:`apply_chip_noise` programs every analog tensor once (``simulator.program_weight``) and writes
the result into the parameter in place, keeping a CPU copy of the clean values; no module is swapped.
When the profile has per-MVM effects (DAC/ADC, out_noise, w_noise), the matmuls that own an analog
weight are routed (:class:`~cimconvert.analog.patch.AnalogPatch`) through :class:`MvmKernel`, which runs
``simulator.analog_matmul`` on the prepared programmed weights — Linear/Conv1D forwards and fused
experts alike; tensors on the ``weight`` route (Mamba's ``dt_proj``) get weight-level noise only.
:class:`NoiseHandle` restores the clean weights bit-exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cimconvert.analog.experts import EXPERTS_IMPLEMENTATION, analog_columns, column_mask, digital_inputs
from cimconvert.analog.patch import AnalogPatch
from cimconvert.analog.routes import EXPERT_PARAMS, owner_of
from cimconvert.errors import ModelInputError
from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator import MvmWeights, analog_matmul, prepare_mvm, program_weight
from cimconvert.simulator.program import clean_scales
from cimconvert.simulator.rng import (
    CounterClock,
    CounterNoise,
    NoiseSource,
    node_key,
    tensor_generator,
)

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "EXPERT_PARAMS",
    "MVM_NOISE_MODES",
    "AnalogTarget",
    "MvmKernel",
    "NoiseHandle",
    "apply_chip_noise",
    "mvm_stream",
]


class AnalogTarget(Protocol):
    """What :func:`apply_chip_noise` needs from a target (e.g. ``placement.TensorInfo``)."""

    name: str
    layout: str


@dataclass
class MvmKernel:
    """Analog kernel of the simulator: ``analog_matmul`` on prepared programmed weights.

    Per-MVM noise comes from ``generator`` or, with a ``clock`` (counter mode), from the counter
    generator keyed by (clock, tensor, expert; -1 for a 2-D weight).
    """

    generator: torch.Generator
    clock: CounterClock | None = None
    weights: dict[str, MvmWeights] = field(default_factory=dict)
    _sources: dict[str, NoiseSource] = field(default_factory=dict)

    def add(self, name: str, mw: MvmWeights) -> None:
        """Prepared weights of the analog tensor ``name``."""
        self.weights[name] = mw
        self._sources[name] = self.source(name, -1)

    def source(self, name: str, expert: int) -> NoiseSource:
        """Per-MVM noise source of one matmul (the shared generator, or its counter key)."""
        if self.clock is None:
            return self.generator
        return CounterNoise(self.clock, node_key(name, expert))

    def linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Simulated ``x @ Wᵀ`` of a Linear/Conv1D weight."""
        return analog_matmul(x, self.weights[name], self._sources[name])

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Simulated projection of one expert of a fused tensor."""
        return analog_matmul(x, self.weights[name].expert(expert), self.source(name, expert))


@dataclass
class NoiseHandle:
    """A model with chip noise applied; a context manager, and ``restore()`` undoes everything.

    ``perturbed``: analog tensors written with programmed values; ``mvm_simulated``: tensors whose
    matmuls run the per-MVM simulation; ``weight_only``: analog tensors with weight-level noise only;
    ``mvm_calls``: simulated matmul calls per tensor since the handle was created; ``mvm_weights``:
    the prepared per-MVM weights of each simulated tensor (what its kernel uses); ``crossbar``: the
    programmed values of fused tensors with digital input channels as the crossbar holds them (their
    parameter keeps the exact digital columns); ``clock``: the forward counter in counter noise mode
    (None otherwise).
    """

    seed: int
    profile_name: str
    profile_hash: str
    perturbed: list[str] = field(default_factory=list)
    mvm_simulated: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    mvm_calls: Counter[str] = field(default_factory=Counter)
    mvm_weights: dict[str, MvmWeights] = field(default_factory=dict, repr=False)
    crossbar: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    clock: CounterClock | None = None
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    _clean: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _patch: AnalogPatch | None = field(default=None, repr=False)
    active: bool = True

    def programmed_weights(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every parameter of ``model`` as programmed: analog tensors as the crossbar holds them."""
        return {**dict(model.named_parameters()), **self.crossbar}

    def drop_mvm(self) -> None:
        """Stop the per-MVM simulation (matmuls run digitally on the programmed weights again)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._patch is not None:
            self._patch.close()
            self._patch = None

    def restore(self) -> None:
        """Put the clean weights back (bit-exact), stop the per-MVM simulation."""
        if not self.active:
            return
        with torch.no_grad():
            for name, clean in self._clean.items():
                self._params[name].copy_(clean)
        self.drop_mvm()
        self._clean.clear()
        self.mvm_weights.clear()
        self.crossbar.clear()
        self.active = False

    def summary(self) -> dict[str, Any]:
        """What was applied, for manifests and logs."""
        return {
            "seed": self.seed,
            "profile": self.profile_name,
            "profile_hash": self.profile_hash,
            "perturbed": list(self.perturbed),
            "mvm_simulated": list(self.mvm_simulated),
            "weight_only": list(self.weight_only),
        }

    def __enter__(self) -> NoiseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


def _attach_mvm(
    handle: NoiseHandle, patch: AnalogPatch, kernel: MvmKernel, name: str, mw: MvmWeights
) -> None:
    """Route the matmul that owns ``name`` through the simulation (or record it as weight-only)."""
    if patch.route(name) == "weight":
        handle.weight_only.append(name)
        return
    kernel.add(name, mw)
    handle.mvm_simulated.append(name)
    handle.mvm_weights[name] = mw


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------


def _check_target(name: str, layout: str, params: dict[str, nn.Parameter]) -> nn.Parameter:
    if name not in params:
        raise ModelInputError(f"analog tensor '{name}' is not a parameter of the model")
    if layout not in ("out_in", "in_out"):
        raise ModelInputError(f"analog tensor '{name}' has layout '{layout}' (expected out_in or in_out)")
    param = params[name]
    if param.dim() not in (2, 3):
        raise ModelInputError(f"analog tensor '{name}' has shape {tuple(param.shape)} (expected 2-D or 3-D)")
    return param


def _unique_targets(targets: Iterable[AnalogTarget]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for target in targets:
        seen.setdefault(str(target.name), str(target.layout))
    return list(seen.items())


def _digital_inputs(model: nn.Module, name: str) -> torch.Tensor | None:
    """The digital input channels of the fused experts tensor ``name`` (None for every other tensor)."""
    owner, _, attr = owner_of(model, name)
    return digital_inputs(owner, attr) if attr in EXPERT_PARAMS else None


def _tick_hook(clock: CounterClock) -> Callable[..., None]:
    """Forward pre-hook of the root model: one counter step per forward (counter mode)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        clock.tick()

    return hook


def mvm_stream(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The native per-MVM generator of noise draw ``seed`` (one per draw, shared by all its matmuls)."""
    return tensor_generator(seed, "<per-mvm>", device)


#: Per-MVM noise modes: ``native`` (one torch.Generator per handle), ``counter`` (counter generator).
MVM_NOISE_MODES = ("native", "counter")


@torch.no_grad()
def apply_chip_noise(
    model: nn.Module,
    targets: Iterable[AnalogTarget],
    profile: ChipProfile,
    seed: int,
    mvm_noise: str = "native",
    mvm_generator: torch.Generator | None = None,
    keep_clean: bool = True,
) -> NoiseHandle:
    """Program the analog ``targets`` of ``model`` in place under ``profile``; returns the handle.

    ``targets``: objects with ``.name`` (a name in ``model.named_parameters()``) and ``.layout``
    (``out_in`` or ``in_out``), e.g. ``Placement.analog()``. Each tensor draws from its own CPU generator
    seeded from sha256(seed, name), whatever the weights' device (the same draws on CPU and GPU). Per-MVM
    noise (``mvm_noise``): ``native`` — one generator on the weights' device seeded once from the seed
    (a GPU draws other numbers than the CPU: same distribution); ``counter`` —
    ``simulator.rng.counter_normal`` keyed by (seed, index of the ``model`` forward, tensor, expert), computed
    on the weights' device: the draws onnxruntime's counter-mode bodies make too.

    Layer-by-layer execution (:mod:`cimconvert.layerwise`) programs one decoder layer per call:
    ``mvm_generator`` continues the native per-MVM stream of the earlier layers (one generator per noise
    draw, from :func:`mvm_stream`), and ``keep_clean=False`` keeps no clean copy (``restore()`` then only
    stops the per-MVM simulation; the caller reloads the weights) and no ``crossbar`` copy of fused experts
    with digital input channels (``programmed_weights`` then returns the parameters only).
    """
    if mvm_noise not in MVM_NOISE_MODES:
        raise ValueError(f"mvm_noise must be one of {MVM_NOISE_MODES}, not {mvm_noise!r}")
    handle = NoiseHandle(seed=seed, profile_name=profile.name, profile_hash=profile.content_hash())
    params = dict(model.named_parameters())
    checked = [
        (name, layout, _check_target(name, layout, params)) for name, layout in _unique_targets(targets)
    ]
    if profile.is_ideal or not checked:
        handle.active = False
        return handle
    device = checked[0][2].device  # per-MVM draws are made where the activations are (fast on a GPU)
    if mvm_generator is None:
        mvm_generator = mvm_stream(seed, device)
    clock = CounterClock(seed) if mvm_noise == "counter" and profile.mvm.active else None
    handle.clock = clock
    kernel = MvmKernel(mvm_generator, clock)
    handle._patch = AnalogPatch(model, kernel, calls=handle.mvm_calls)
    try:
        if clock is not None:
            handle._hooks.append(model.register_forward_pre_hook(_tick_hook(clock)))
        for name, layout, param in checked:
            if keep_clean:
                handle._params[name] = param
                handle._clean[name] = param.detach().to("cpu", copy=True)
            digital = _digital_inputs(model, name)
            stored = param.detach() if digital is None else analog_columns(param.detach(), digital, layout)
            noisy = program_weight(stored, profile, tensor_generator(seed, name), layout)
            scales = clean_scales(stored, layout, profile) if profile.mvm.active else None  # type: ignore[arg-type]
            programmed = noisy
            if digital is not None:  # digital input channels keep their exact values
                programmed = torch.where(column_mask(param, digital, layout), param.detach(), noisy)
                if keep_clean:  # the lean mode keeps no crossbar copy either (programmed_weights unused)
                    handle.crossbar[name] = noisy
            if keep_clean:
                param.copy_(programmed)
            else:  # the clean storage is not kept: take the programmed tensor's (no second copy)
                param.data = programmed
            handle.perturbed.append(name)
            if scales is not None:
                mw = prepare_mvm(noisy, profile, layout, scales)  # type: ignore[arg-type]
                _attach_mvm(handle, handle._patch, kernel, name, mw)
            else:
                handle.weight_only.append(name)
    except BaseException:
        handle.restore()
        raise
    return handle
