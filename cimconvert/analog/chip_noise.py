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

import hashlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from cimconvert.arch.experts import dispatch_experts
from cimconvert.errors import ModelInputError
from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator import (
    MvmWeights,
    analog_matmul,
    prepare_mvm,
    program_weight,
    tile_grid,
    weight_scales,
)
from cimconvert.simulator.program import Layout, to_out_in
from cimconvert.simulator.rng import CounterClock, CounterNoise, NoiseSource, node_key

#: Name of the experts implementation registered in ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``.
EXPERTS_IMPLEMENTATION = "cimconvert_analog"
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
#: Modules whose weight HF reads directly (never called): weight-level noise only.
WEIGHT_ONLY_MODULES = ("dt_proj",)


class AnalogTarget(Protocol):
    """What :func:`apply_chip_noise` needs from a target (e.g. ``placement.TensorInfo``)."""

    name: str
    layout: str


def stable_seed(seed: int, name: str) -> int:
    """63-bit generator seed from (seed, name) via sha256 (stable across runs and processes)."""
    digest = hashlib.sha256(f"cimconvert:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def tensor_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """The programming-noise generator of one tensor: independent of which other tensors are analog."""
    return torch.Generator(device=device).manual_seed(stable_seed(seed, name))


@dataclass
class _ExpertsState:
    """Prepared analog weights of one fused experts module (per parameter name)."""

    weights: dict[str, MvmWeights]
    generator: torch.Generator
    calls: Counter[str]
    prefix: str
    clock: CounterClock | None = None

    def source(self, pname: str, expert: int) -> NoiseSource:
        """Per-MVM noise source of one expert's projection (the shared generator, or its counter key)."""
        if self.clock is None:
            return self.generator
        return CounterNoise(self.clock, node_key(f"{self.prefix}{pname}", expert))


#: experts module → its analog state, while a handle is active.
_EXPERTS: weakref.WeakKeyDictionary[nn.Module, _ExpertsState] = weakref.WeakKeyDictionary()
#: id(config) → experts implementation that was active before a handle switched it.
_PREVIOUS_IMPL: dict[int, str | None] = {}


@dataclass
class NoiseHandle:
    """A model with chip noise applied; a context manager, and ``restore()`` undoes everything.

    ``perturbed``: analog tensors written with programmed values; ``mvm_simulated``: tensors whose
    matmuls run the per-MVM simulation; ``weight_only``: analog tensors with weight-level noise only;
    ``mvm_calls``: simulated matmul calls per tensor since the handle was created; ``mvm_weights``:
    the prepared per-MVM weights of each simulated tensor (what its hooks use); ``clock``: the forward
    counter in counter noise mode (None otherwise).
    """

    seed: int
    profile_name: str
    profile_hash: str
    perturbed: list[str] = field(default_factory=list)
    mvm_simulated: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    mvm_calls: Counter[str] = field(default_factory=Counter)
    mvm_weights: dict[str, MvmWeights] = field(default_factory=dict, repr=False)
    clock: CounterClock | None = None
    _params: dict[str, nn.Parameter] = field(default_factory=dict, repr=False)
    _clean: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _hooks: list[RemovableHandle] = field(default_factory=list, repr=False)
    _experts: list[nn.Module] = field(default_factory=list, repr=False)
    _configs: list[tuple[Any, str | None]] = field(default_factory=list, repr=False)
    active: bool = True

    def restore(self) -> None:
        """Put the clean weights back (bit-exact), remove hooks and the experts implementation."""
        if not self.active:
            return
        with torch.no_grad():
            for name, clean in self._clean.items():
                self._params[name].copy_(clean)
        for hook in self._hooks:
            hook.remove()
        for module in self._experts:
            _EXPERTS.pop(module, None)
        for config, previous in reversed(self._configs):
            config._experts_implementation_internal = previous
            _PREVIOUS_IMPL.pop(id(config), None)
        self._clean.clear()
        self.mvm_weights.clear()
        self._hooks.clear()
        self._experts.clear()
        self._configs.clear()
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


# ----------------------------------------------------------------------------------------------
# Linear / Conv1D hooks
# ----------------------------------------------------------------------------------------------


class _LinearMvm:
    """Pre/post forward hooks that replace a Linear/Conv1D matmul by the analog simulation."""

    def __init__(self, name: str, mw: MvmWeights, generator: NoiseSource, calls: Counter[str]) -> None:
        self.name = name
        self.mw = mw
        self.generator = generator
        self.calls = calls
        self._inputs: list[torch.Tensor] = []

    @staticmethod
    def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor | None, str | None]:
        if args:
            return args[0], None
        for key in ("input", "x"):
            if key in kwargs:
                return kwargs[key], key
        return None, None

    def pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Stash the input and give the module an empty batch so its own matmul is free."""
        x, key = self._input(args, kwargs)
        if x is None or x.dim() < 2:
            return None
        self._inputs.append(x)
        empty = x[..., :0, :]
        if key is None:
            return (empty, *args[1:]), kwargs
        return args, {**kwargs, key: empty}

    def post(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Return the simulated output (bias added digitally)."""
        x = self._inputs.pop() if self._inputs else self._input(args, kwargs)[0]
        if x is None:
            return output
        self.calls[self.name] += 1
        y = analog_matmul(x, self.mw, self.generator)
        bias = getattr(module, "bias", None)
        if bias is None:
            return y
        return y.add_(bias) if y.dtype == bias.dtype else y + bias


def _hook_linear(
    module: nn.Module, name: str, mw: MvmWeights, generator: NoiseSource, calls: Counter[str]
) -> list[RemovableHandle]:
    sim = _LinearMvm(name, mw, generator, calls)
    return [
        module.register_forward_pre_hook(sim.pre, with_kwargs=True),
        module.register_forward_hook(sim.post, with_kwargs=True),
    ]


# ----------------------------------------------------------------------------------------------
# Fused experts
# ----------------------------------------------------------------------------------------------


def _expert_linear(
    module: nn.Module, state: _ExpertsState, pname: str, expert: int, x: torch.Tensor
) -> torch.Tensor:
    """One expert's projection ``pname``: analog simulation if that tensor is analog, else exact."""
    weights = state.weights.get(pname)
    if weights is not None:
        state.calls[f"{state.prefix}{pname}"] += 1
        y = analog_matmul(x, weights.expert(expert), state.source(pname, expert))
    else:
        w = getattr(module, pname)[expert]
        y = x @ w if getattr(module, "is_transposed", False) else nn.functional.linear(x, w)
    if getattr(module, "has_bias", False):
        y = y + getattr(module, f"{pname}_bias")[expert]
    return y


def _fallback_experts(module: nn.Module) -> Callable[..., torch.Tensor]:
    previous = _PREVIOUS_IMPL.get(id(module.config))
    eager = getattr(type(module).forward, "__wrapped__", None)
    if previous in (None, "eager", EXPERTS_IMPLEMENTATION) or previous not in ALL_EXPERTS_FUNCTIONS:
        if eager is None:
            raise RuntimeError(f"no eager experts forward for {type(module).__name__}")
        return eager
    return ALL_EXPERTS_FUNCTIONS[previous]


def analog_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Experts implementation: each hit expert's matmuls through the analog simulation.

    Signature of ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS`` entries. Modules without
    analog state (digital experts sharing the config) use the implementation active before.
    """
    state = _EXPERTS.get(self)
    if state is None:
        return _fallback_experts(self)(self, hidden_states, top_k_index, top_k_weights)
    return dispatch_experts(
        self, hidden_states, top_k_index, top_k_weights,
        lambda name, expert, x: _expert_linear(self, state, name, expert, x),
    )


def _switch_experts(handle: NoiseHandle, module: nn.Module) -> None:
    """Point the module's config at the analog experts implementation (once per config)."""
    config = module.config
    if any(c is config for c, _ in handle._configs):
        return
    previous = getattr(config, "_experts_implementation_internal", None)
    handle._configs.append((config, previous))
    _PREVIOUS_IMPL[id(config)] = previous
    config._experts_implementation_internal = EXPERTS_IMPLEMENTATION


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


def _clean_scales(clean: torch.Tensor, profile: ChipProfile, layout: Layout) -> torch.Tensor:
    """Digital output scales fixed at mapping time (from the clean weights)."""
    w3 = to_out_in(clean, layout)
    return weight_scales(w3, profile.mapping, tile_grid(w3.shape, profile.mapping))


def _attach_mvm(
    handle: NoiseHandle,
    model: nn.Module,
    name: str,
    mw: MvmWeights,
    generator: torch.Generator,
    experts_state: dict[int, _ExpertsState],
    clock: CounterClock | None = None,
) -> None:
    """Route the matmul that owns ``name`` through the simulation (or record it as weight-only).

    Per-MVM noise comes from ``generator`` or, with a ``clock`` (counter mode), from the counter
    generator keyed by (clock, ``name``, expert).
    """
    module_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_path) if module_path else model
    last = module_path.rpartition(".")[2]
    if isinstance(owner, (nn.Linear, Conv1D)) and attr == "weight" and last not in WEIGHT_ONLY_MODULES:
        source: NoiseSource = generator if clock is None else CounterNoise(clock, node_key(name, -1))
        handle._hooks.extend(_hook_linear(owner, name, mw, source, handle.mvm_calls))
    elif attr in EXPERT_PARAMS and mw.weight_t.dim() == 4 and hasattr(owner, "config"):
        state = experts_state.get(id(owner))
        if state is None:
            state = _ExpertsState({}, generator, handle.mvm_calls, f"{module_path}.", clock)
            experts_state[id(owner)] = state
            _EXPERTS[owner] = state
            handle._experts.append(owner)
            _switch_experts(handle, owner)
        state.weights[attr] = mw
    else:
        handle.weight_only.append(name)
        return
    handle.mvm_simulated.append(name)
    handle.mvm_weights[name] = mw


def _unique_targets(targets: Iterable[AnalogTarget]) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    for target in targets:
        seen.setdefault(str(target.name), str(target.layout))
    return list(seen.items())


def _tick_hook(clock: CounterClock) -> Callable[..., None]:
    """Forward pre-hook of the root model: one counter step per forward (counter mode)."""

    def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
        clock.tick()

    return hook


#: Per-MVM noise modes: ``native`` (one torch.Generator per handle), ``counter`` (counter generator).
MVM_NOISE_MODES = ("native", "counter")


@torch.no_grad()
def apply_chip_noise(
    model: nn.Module,
    targets: Iterable[AnalogTarget],
    profile: ChipProfile,
    seed: int,
    mvm_noise: str = "native",
) -> NoiseHandle:
    """Program the analog ``targets`` of ``model`` in place under ``profile``; returns the handle.

    ``targets``: objects with ``.name`` (a name in ``model.named_parameters()``) and ``.layout``
    (``out_in`` or ``in_out``), e.g. ``Placement.analog()``. Each tensor draws from its own generator
    seeded from sha256(seed, name). Per-MVM noise (``mvm_noise``): ``native`` — one generator seeded
    once from the seed; ``counter`` — ``simulator.rng.counter_normal`` keyed by (seed, index of the
    ``model`` forward, tensor, expert), the draws onnxruntime's counter-mode bodies make too.
    """
    if mvm_noise not in MVM_NOISE_MODES:
        raise ValueError(f"mvm_noise must be one of {MVM_NOISE_MODES}, not {mvm_noise!r}")
    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not analog_experts_forward:
        ALL_EXPERTS_FUNCTIONS[EXPERTS_IMPLEMENTATION] = analog_experts_forward
    handle = NoiseHandle(seed=seed, profile_name=profile.name, profile_hash=profile.content_hash())
    params = dict(model.named_parameters())
    checked = [
        (name, layout, _check_target(name, layout, params)) for name, layout in _unique_targets(targets)
    ]
    if profile.is_ideal or not checked:
        handle.active = False
        return handle
    device = checked[0][2].device
    mvm_generator = tensor_generator(seed, "<per-mvm>", device)
    clock = CounterClock(seed) if mvm_noise == "counter" and profile.mvm.active else None
    handle.clock = clock
    experts_state: dict[int, _ExpertsState] = {}
    try:
        if clock is not None:
            handle._hooks.append(model.register_forward_pre_hook(_tick_hook(clock)))
        for name, layout, param in checked:
            clean = param.detach().to("cpu", copy=True)
            handle._params[name] = param
            handle._clean[name] = clean
            noisy = program_weight(
                param.detach(), profile, tensor_generator(seed, name, param.device), layout
            )
            param.copy_(noisy)
            handle.perturbed.append(name)
            if profile.mvm.active:
                scales = _clean_scales(clean.to(param.device), profile, layout)  # type: ignore[arg-type]
                mw = prepare_mvm(noisy, profile, layout, scales)  # type: ignore[arg-type]
                _attach_mvm(handle, model, name, mw, mvm_generator, experts_state, clock)
            else:
                handle.weight_only.append(name)
    except BaseException:
        handle.restore()
        raise
    return handle
