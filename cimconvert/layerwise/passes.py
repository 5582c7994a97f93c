"""Cached activations through one decoder layer at a time, for several noise draws at once.

The model's own forward prepares what its decoder layers get (embeddings, rotary position embeddings,
causal masks): :func:`capture_inputs` runs it with every decoder layer replaced by a stub that records
its arguments and stops the forward after the last layer. :func:`run_layers` then materialises each
layer once and runs every :class:`Stream` (the clean pass and one per noise draw) through it, batch by
batch, keeping the outputs; :func:`head_logits` finishes a batch through the model's own final norm and
lm_head with a stub returning the stream's last hidden state. An out-of-memory error inside a layer pass
is reported as :class:`LayerMemoryError` (which layer, how much it needed).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from cimconvert.analog.chip_noise import apply_chip_noise, mvm_stream
from cimconvert.errors import CimError
from cimconvert.layerwise.skeleton import LayerwiseModel, analog_of_layer
from cimconvert.profiles import ChipProfile
from cimconvert.progress import progress_bar

GIB = float(1 << 30)

StubFn = Callable[[int, torch.Tensor, tuple[Any, ...], dict[str, Any]], torch.Tensor]


class _StopForward(Exception):
    """Raised by the last stub while capturing: the rest of the forward is not needed."""


class _LayerStub(nn.Module):
    """Stands in for decoder layer ``index``: hands its call to ``fn``."""

    def __init__(self, index: int, fn: StubFn) -> None:
        super().__init__()
        self.index = index
        self.fn = fn

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """What ``fn`` returns for this layer's call."""
        return self.fn(self.index, hidden_states, args, kwargs)


@contextmanager
def stubbed_layers(layers: nn.ModuleList, fn: StubFn) -> Iterator[None]:
    """Replace every decoder layer of ``layers`` by a stub calling ``fn`` until the block exits."""
    originals = list(layers)
    for index in range(len(originals)):
        layers[index] = _LayerStub(index, fn)
    try:
        yield
    finally:
        for index, layer in enumerate(originals):
            layers[index] = layer


@dataclass
class LayerInputs:
    """One batch as the model's forward hands it to the decoder layers.

    ``input_ids``: the batch; ``hidden``: the input of layer 0 (the embeddings); ``calls[i]``: the other
    positional and keyword arguments of layer ``i`` (masks, position embeddings, ...).
    """

    input_ids: torch.Tensor
    hidden: torch.Tensor
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=list)


@torch.no_grad()
def capture_inputs(lw: LayerwiseModel, batches: Sequence[torch.Tensor]) -> list[LayerInputs]:
    """What every decoder layer receives for each batch (the embeddings are computed once here)."""
    captured: list[LayerInputs] = []
    last = lw.num_layers - 1

    def record(index: int, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> torch.Tensor:  # fmt: skip
        entry = captured[-1]
        if index == 0:
            entry.hidden = hidden
        entry.calls.append((args, kwargs))
        if index == last:
            raise _StopForward
        return hidden

    with stubbed_layers(lw.layers, record):
        for batch in batches:
            ids = batch.to(lw.device)
            captured.append(LayerInputs(ids, ids))
            with suppress(_StopForward):
                lw.model(input_ids=ids, use_cache=False)
    return captured


@dataclass
class Stream:
    """One pass through the layers: the clean model (``seed`` None) or one chip-noise draw.

    ``hidden[b]``: the current activations of batch ``b``; ``generator``: the draw's per-MVM stream
    (continued from layer to layer, as in one whole-model forward).
    """

    seed: int | None
    hidden: list[torch.Tensor]
    generator: torch.Generator | None = None

    @classmethod
    def start(cls, seed: int | None, inputs: Sequence[LayerInputs], device: torch.device) -> Stream:
        """A stream at the input of layer 0."""
        generator = mvm_stream(seed, device) if seed is not None else None
        return cls(seed, [entry.hidden for entry in inputs], generator)


class LayerMemoryError(CimError):
    """Out of memory inside a layer pass: names the layer and the memory it needed."""


def _is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (CPU or accelerator)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text


def _requested_bytes(exc: BaseException) -> int:
    """The size of the failed allocation when the message names it (torch's CPU allocator does), else 0."""
    match = re.search(r"allocate (?:memory: you tried to allocate )?(\d+) bytes", str(exc))
    return int(match.group(1)) if match else 0


def memory_error(lw: LayerwiseModel, index: int, inputs: Sequence[LayerInputs],
                 streams: int, exc: BaseException) -> LayerMemoryError:  # fmt: skip
    """The one-line report of an out-of-memory error in decoder layer ``index``."""
    weights = lw.layer_bytes(index)
    activations = sum(entry.hidden.numel() * entry.hidden.element_size() for entry in inputs) * streams
    failed = _requested_bytes(exc)
    needed = weights + activations + failed
    detail = f", the failed allocation {failed / GIB:.2f} GiB" if failed else ""
    return LayerMemoryError(
        f"out of memory in decoder layer {index} of {lw.num_layers}: it needs about {needed / GIB:.2f} GiB "
        f"(weights {weights / GIB:.2f} GiB in float32, activations {activations / GIB:.2f} GiB{detail}); "
        "free memory or use fewer or shorter sequences"
    )


@contextmanager
def reporting_memory(
    lw: LayerwiseModel, index: int, inputs: Sequence[LayerInputs], streams: int
) -> Iterator[None]:
    """Turn an allocation failure inside the block into :class:`LayerMemoryError` for layer ``index``."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not _is_out_of_memory(exc):
            raise
        raise memory_error(lw, index, inputs, streams, exc) from None


def _layer_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder layer returned (a tensor, or the first item of a tuple)."""
    return output[0] if isinstance(output, tuple) else output


def run_stream(layer: nn.Module, index: int, stream: Stream, inputs: Sequence[LayerInputs]) -> None:
    """Every batch of ``stream`` through decoder layer ``index`` (outputs replace the inputs)."""
    for b, entry in enumerate(inputs):
        args, kwargs = entry.calls[index]
        stream.hidden[b] = _layer_output(layer(stream.hidden[b], *args, **kwargs))


def noisy_draw(
    lw: LayerwiseModel, targets: Sequence[Any], profile: ChipProfile, stream: Stream, keep_clean: bool = False
) -> Any:
    """Program ``targets`` for ``stream``'s draw (nothing for the clean stream); a context manager.

    ``keep_clean``: restore the clean weights on exit (resident tensors); else the caller reloads them.
    """
    if stream.seed is None or not targets:
        return nullcontext()
    return apply_chip_noise(lw.model, targets, profile, stream.seed, mvm_generator=stream.generator,
                            keep_clean=keep_clean)  # fmt: skip


def resident_targets(lw: LayerwiseModel, targets: Sequence[Any]) -> list[Any]:
    """The analog targets outside the decoder layers (an analog lm_head, possibly tied to the embedding)."""
    names = lw.resident_names()
    return [t for t in targets if str(t.name) in names]


def start_streams(
    lw: LayerwiseModel, seeds: Sequence[int | None], inputs: Sequence[LayerInputs], targets: Sequence[Any],
    profile: ChipProfile,
) -> list[Stream]:  # fmt: skip
    """One stream per seed (None: clean) at the input of layer 0.

    With analog resident tensors a draw's embeddings are recomputed with them programmed (an analog
    lm_head tied to the embedding perturbs the embedding too, as in the whole-model forward).
    """
    resident = resident_targets(lw, targets)
    streams = []
    for seed in seeds:
        stream = Stream.start(seed, inputs, lw.device)
        if seed is not None and resident:
            with noisy_draw(lw, resident, profile, stream, keep_clean=True):
                stream.hidden = [e.hidden for e in capture_inputs(lw, [e.input_ids for e in inputs])]
        streams.append(stream)
    return streams


Reload = Callable[[list[str]], Any]


def run_draws(
    lw: LayerwiseModel, index: int, streams: Sequence[Stream], inputs: Sequence[LayerInputs],
    profile: ChipProfile, targets_of: Callable[[Stream], Sequence[Any]], reload: Reload | None,
    observe: Callable[[Stream], AbstractContextManager[Any]] | None = None, restore: bool = False,
) -> None:  # fmt: skip
    """Every stream of ``streams`` through the loaded decoder layer ``index``; a noise draw programs
    ``targets_of(stream)`` in place for its pass (the clean stream, or no targets: nothing is programmed).

    ``reload(names)`` puts the programmed tensors back before the next draw (and after the last one when
    ``restore``): from the shards, or from a transformed layer's working copy; None keeps a clean copy in
    memory instead (``keep_clean=True``). ``observe(stream)`` is entered around each pass, outside the
    noise patch.
    """
    layer = lw.layers[index]
    programmed: list[str] = []
    for stream in streams:
        if programmed and reload is not None:
            reload(programmed)
        watched = observe(stream) if observe is not None else nullcontext()
        # the observer opens first (a noise patch opened inside it takes the observed matmuls over): the
        # draw is programmed only once the observer is open
        keep_clean = reload is None
        with watched, noisy_draw(lw, targets_of(stream), profile, stream, keep_clean=keep_clean) as handle:
            run_stream(layer, index, stream, inputs)
            programmed = list(getattr(handle, "perturbed", None) or []) if reload is not None else []
    if programmed and restore and reload is not None:
        reload(programmed)


@torch.no_grad()
def run_layers(
    lw: LayerwiseModel,
    inputs: Sequence[LayerInputs],
    streams: Sequence[Stream],
    targets: Sequence[Any],
    profile: ChipProfile,
    progress: bool = False,
) -> None:
    """Run every stream through every decoder layer; each layer is read once, its programmed tensors again
    for each later draw.

    ``targets``: the analog tensors (in-memory names); a layer's are programmed per noise draw with that
    draw's seed, exactly as the whole-model path programs them. The layer is freed before the next one is
    loaded.
    """
    for index in progress_bar(range(lw.num_layers), desc="layers", unit="layer", enabled=progress):
        layer_targets = analog_of_layer(targets, lw.layer_prefix(index))
        with reporting_memory(lw, index, inputs, len(streams)):
            lw.load_layer(index)
            run_draws(lw, index, streams, inputs, profile, lambda stream, t=layer_targets: t,
                      reload=lambda names, index=index: lw.load_layer(index, names))  # fmt: skip
            lw.free_layer(index)


@torch.no_grad()
def head_logits(lw: LayerwiseModel, entry: LayerInputs, final: torch.Tensor) -> torch.Tensor:
    """Logits of one batch whose last decoder layer output is ``final`` (the model's own norm and head)."""
    last = lw.num_layers - 1

    def finish(index: int, hidden: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> torch.Tensor:  # fmt: skip
        return final if index == last else hidden

    with stubbed_layers(lw.layers, finish):
        return lw.model(input_ids=entry.input_ids, use_cache=False).logits


__all__ = [
    "LayerInputs",
    "LayerMemoryError",
    "Stream",
    "capture_inputs",
    "head_logits",
    "memory_error",
    "noisy_draw",
    "reporting_memory",
    "resident_targets",
    "run_draws",
    "run_layers",
    "run_stream",
    "start_streams",
    "stubbed_layers",
]
