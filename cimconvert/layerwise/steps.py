"""Recipe steps one decoder layer at a time: every step of a recipe in one pass over the layers.

A :class:`LayerStep` has its own calibration batches and streams (:class:`~.passes.Stream`). At each
layer, in recipe order, a step's *fit* streams run through the layer as the earlier steps left it (the
step observes them: activation maxima, output gains, router statistics), then the step transforms the
layer (:meth:`LayerStep.transform`: splits, folded gains), then its *check* streams run through the layer
as it left it. So step ``k``'s streams see at every layer what the whole-model recipe's step ``k`` sees:
the model after steps ``< k``. The placement each step's noisy streams program is re-read after every
transform (:func:`cimconvert.placement.replan_model` with the step's names so far), as
:func:`cimconvert.recipe.run_recipe` does after every step. Once a step has transformed the layer, a
draw's programmed tensors are read back from a working copy spilled to a scratch folder (a clean copy in
memory without one); before that, they are read from the checkpoint again (as :func:`~.passes.run_layers`
does). ``save(index, named)`` runs before the layer is freed (the transformed checkpoint,
:mod:`cimconvert.layerwise.save`). A step whose effect exists only once the whole pass is done (ROMER's
routing fit) must be the recipe's last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from cimconvert.errors import CimError
from cimconvert.evaluation.perplexity import next_token_nll
from cimconvert.layerwise.evaluate import stream_perplexity
from cimconvert.layerwise.passes import (
    LayerInputs,
    Reload,
    Stream,
    capture_inputs,
    reporting_memory,
    resident_targets,
    run_draws,
    start_streams,
)
from cimconvert.layerwise.skeleton import LayerwiseModel, analog_of_layer
from cimconvert.placement import Placement, replan_model
from cimconvert.profiles import ChipProfile
from cimconvert.progress import progress_bar


class LayerStep(Protocol):
    """One recipe step run layer by layer (see the module docstring; :class:`BaseLayerStep` gives the
    defaults of a step that needs no stream or transform).

    ``batches``: its calibration batches; ``fit_seeds``: the streams it observes before transforming a
    layer (``None``: the clean model); ``check_seeds``: streams through the transformed layers;
    ``wants_ppl``: :meth:`finish` gets every stream's calibration perplexity; ``changes_weights``: the
    bundle needs the transformed checkpoint; ``last_only``: its effect exists only after the pass.
    """

    name: str
    batches: Sequence[torch.Tensor]
    fit_seeds: Sequence[int | None]
    check_seeds: Sequence[int]
    wants_ppl: bool
    changes_weights: bool
    last_only: bool

    def targets(self, lw: LayerwiseModel, placement: Placement) -> list[Any]:
        """The analog tensors its noisy streams program (whole model) under ``placement``."""
        ...

    def begin_layer(self, lw: LayerwiseModel, index: int, placement: Placement) -> None:
        """Prepare for decoder layer ``index`` (loaded, as the earlier steps left it)."""
        ...

    def observe(self, index: int, stream: Stream) -> AbstractContextManager[Any]:
        """Entered around ``stream``'s pass through decoder layer ``index`` (outside the noise patch)."""
        ...

    def transform(self, lw: LayerwiseModel, index: int) -> tuple[list[str], list[str]]:
        """Transform decoder layer ``index`` in place; returns (analog, digital) parameter names it made."""
        ...

    def finish(self, ppl: dict[int | None, float]) -> Any:
        """The step's ``MethodResult`` (``ppl``: calibration perplexity per stream seed, if wanted)."""
        ...


class BaseLayerStep:
    """Defaults of a :class:`LayerStep`: no streams, nothing programmed, observed or transformed."""

    name = ""
    batches: Sequence[torch.Tensor] = ()
    fit_seeds: Sequence[int | None] = ()
    check_seeds: Sequence[int] = ()
    wants_ppl = False
    changes_weights = False
    last_only = False

    def targets(self, lw: LayerwiseModel, placement: Placement) -> list[Any]:
        """No noisy stream: nothing to program."""
        return []

    def begin_layer(self, lw: LayerwiseModel, index: int, placement: Placement) -> None:
        """Nothing to prepare."""

    def observe(self, index: int, stream: Stream) -> AbstractContextManager[Any]:
        """Nothing to observe."""
        return nullcontext()

    def transform(self, lw: LayerwiseModel, index: int) -> tuple[list[str], list[str]]:
        """The layer stays as it is."""
        return [], []


class FixedStep(BaseLayerStep):
    """A step whose result is known before the pass (a placement step, a budget chosen from a scan, ROMER
    on a noise-free profile): no stream, no transform; its ``analog``/``digital`` patterns join the
    placement at the first layer, for every later step and layer."""

    def __init__(self, result: Any, name: str) -> None:
        self.result, self.name = result, name

    def transform(self, lw: LayerwiseModel, index: int) -> tuple[list[str], list[str]]:
        """The result's patterns, once (at the first layer)."""
        return (list(self.result.analog), list(self.result.digital)) if index == 0 else ([], [])

    def finish(self, ppl: dict[int | None, float]) -> Any:
        """The result."""
        return self.result


@dataclass
class _Running:
    """A step during the pass: its cached inputs, streams and the names its transforms made so far."""

    step: LayerStep
    inputs: list[LayerInputs]
    fit: list[Stream]
    check: list[Stream]
    analog: list[str] = field(default_factory=list)
    digital: list[str] = field(default_factory=list)


def check_step_order(steps: Sequence[LayerStep]) -> None:
    """CimError when a step whose effect exists only after the pass (ROMER) is not the last."""
    for step in steps[:-1]:
        if step.last_only:
            raise CimError(f"layer by layer, {step.name} must be the recipe's last step (the later steps "
                           "would need its fitted routing while the layers run); convert with --whole-model")


def _start(lw: LayerwiseModel, step: LayerStep, placement: Placement, profile: ChipProfile) -> _Running:
    inputs = capture_inputs(lw, step.batches)
    targets = step.targets(lw, placement)
    fit = start_streams(lw, step.fit_seeds, inputs, targets, profile)
    check = start_streams(lw, step.check_seeds, inputs, targets, profile)
    return _Running(step, inputs, fit, check)


def _pass(lw: LayerwiseModel, index: int, run: _Running, streams: Sequence[Stream], targets: Sequence[Any],
          profile: ChipProfile, reload: Reload | None, restore: bool) -> None:  # fmt: skip
    """``streams`` of ``run``'s step through decoder layer ``index``, observed by the step."""
    run_draws(lw, index, streams, run.inputs, profile, lambda stream: targets, reload,
              observe=lambda stream: run.step.observe(index, stream), restore=restore)  # fmt: skip


def _reloader(lw: LayerwiseModel, index: int, targets: Sequence[Any], pristine: bool,
              scratch: Path | None) -> Reload | None:  # fmt: skip
    """How the programmed tensors come back after a draw: read from the checkpoint while the layer is as on
    disk, else from a working copy spilled to ``scratch`` (None without one: a clean copy in memory)."""
    if pristine:
        return lambda names: lw.load_layer(index, names)
    if scratch is None or not targets:
        return None
    path = scratch / f"working-{index:05d}.safetensors"
    lw.spill([str(t.name) for t in targets], path)
    return lambda names: lw.unspill(path, names)


def _layer(lw: LayerwiseModel, index: int, running: Sequence[_Running], placement: Placement,
           profile: ChipProfile, scratch: Path | None, saving: bool) -> None:  # fmt: skip
    """Every step at decoder layer ``index``: fit streams, transform, replan, check streams."""
    lw.load_layer(index)
    prefix = lw.layer_prefix(index)
    now, pristine = placement, True
    for k, run in enumerate(running):
        run.step.begin_layer(lw, index, now)
        later = saving or k < len(running) - 1  # the layer is needed unprogrammed after this step
        targets = analog_of_layer(run.step.targets(lw, now), prefix)
        noisy = [s for s in run.fit if s.seed is not None]
        reload = _reloader(lw, index, targets, pristine, scratch) if noisy else None
        restore = later or bool(run.check) or run.step.changes_weights  # the transform needs it clean
        _pass(lw, index, run, run.fit, targets, profile, reload, restore)
        analog, digital = run.step.transform(lw, index)
        pristine = pristine and not run.step.changes_weights
        run.analog += analog
        run.digital += digital
        if run.analog or run.digital:
            now = replan_model(lw.model, now, profile, run.analog, run.digital)
        if run.check:
            targets = analog_of_layer(run.step.targets(lw, now), prefix)
            reload = _reloader(lw, index, targets, pristine, scratch)
            _pass(lw, index, run, run.check, targets, profile, reload, later)
    if scratch is not None:
        for working in scratch.glob(f"working-{index:05d}.safetensors"):
            working.unlink()


def _row_nll(inputs: Sequence[LayerInputs]) -> Any:
    """The ``add`` of ``stream_perplexity`` for calibration rows (each row its own window, as
    ``methods.output_correction.calibration_ppl`` scores them)."""

    def add(running: tuple[float, int], b: int, logits: torch.Tensor) -> tuple[float, int]:
        nll, scored = next_token_nll(logits, inputs[b].input_ids)
        return running[0] + nll, running[1] + scored

    return add


@torch.no_grad()
def run_layer_steps(
    lw: LayerwiseModel,
    profile: ChipProfile,
    steps: Sequence[LayerStep],
    placement: Placement,
    progress: bool = False,
    save: Callable[[int, set[str]], None] | None = None,
    scratch: Path | None = None,
) -> tuple[list[Any], Placement]:
    """Run ``steps`` in one pass over the decoder layers (see the module docstring).

    Returns each step's result and the placement after the last step (in-memory names), replanned with
    every step's ``analog``/``digital`` names in order, as ``run_recipe`` leaves it. ``scratch``: a folder
    for the working copies of transformed layers (programmed tensors are read back from there instead of a
    clean copy in memory).
    """
    check_step_order(steps)
    running = [_start(lw, step, placement, profile) for step in steps]
    streams = sum(len(run.fit) + len(run.check) for run in running)
    inputs = [entry for run in running for entry in run.inputs]
    for index in progress_bar(range(lw.num_layers), desc="layers", unit="layer", enabled=progress):
        with reporting_memory(lw, index, inputs, max(streams, 1)):
            _layer(lw, index, running, placement, profile, scratch, save is not None)
            if save is not None:
                save(index, {name for run in running for name in (*run.analog, *run.digital)})
            lw.free_layer(index)
    results, final = [], placement
    for run in running:
        ppl: dict[int | None, float] = {}
        if run.step.wants_ppl:
            resident = resident_targets(lw, run.step.targets(lw, final))
            add = _row_nll(run.inputs)
            for stream in (*run.fit, *run.check):
                ppl[stream.seed] = stream_perplexity(lw, stream, run.inputs, resident, profile, add)
        result = run.step.finish(ppl)
        results.append(result)
        if result.analog or result.digital:
            final = replan_model(lw.model, final, profile, result.analog, result.digital)
    return results, final


__all__ = ["BaseLayerStep", "FixedStep", "LayerStep", "check_step_order", "run_layer_steps"]
