"""Sensitivity scans one decoder layer at a time: noise in one part of the model per stream.

:func:`cimconvert.evaluation.sensitivity.sensitivity_scan` evaluates the model once per (part, seed) with
only that part's tensors programmed. Layer by layer, a part's stream equals the clean stream up to the
first decoder layer holding one of its tensors: it is forked there from the clean activations (its own
per-MVM generator, seeded as the whole-model draw seeds it), programmed in the layers that hold its
tensors, clean elsewhere, and finished through the model's head (an analog resident tensor of the part
programmed there). A part whose tensors lie in one decoder layer (every ``layer`` and ``block`` group)
draws its per-MVM noise in the whole-model order whatever the batching; the ``all`` part follows it when
the windows form one batch (as :mod:`.evaluate`). Live streams hold their activations until the head:
about ``parts × seeds`` times the activations of the evaluation text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from cimconvert.analog.chip_noise import mvm_stream
from cimconvert.errors import CimError
from cimconvert.evaluation.perplexity import window_batches
from cimconvert.layerwise.evaluate import stream_perplexity, window_nll
from cimconvert.layerwise.passes import (
    LayerInputs,
    Stream,
    capture_inputs,
    reporting_memory,
    resident_targets,
    run_draws,
    start_streams,
)
from cimconvert.layerwise.skeleton import LayerwiseModel, analog_of_layer
from cimconvert.profiles import ChipProfile
from cimconvert.progress import progress_bar


@dataclass
class _Draw:
    """One (part, seed): the part's targets, the decoder layer its stream forks at, and the stream."""

    targets: Sequence[Any]
    seed: int
    start: int
    stream: Stream | None = None


def _first_layer(lw: LayerwiseModel, targets: Sequence[Any]) -> int:
    """The first decoder layer holding one of ``targets``; 0 when one is resident (a tied analog head
    perturbs the embeddings, so such a stream starts at the input)."""
    if resident_targets(lw, targets):
        return 0
    return min(i for i in (lw.adapter.layer_index(str(t.name)) for t in targets) if i is not None)


def _fork(lw: LayerwiseModel, draw: _Draw, clean: Stream, inputs: Sequence[LayerInputs],
          profile: ChipProfile) -> Stream:  # fmt: skip
    """The draw's stream with the clean stream's current activations (embeddings recomputed under noise
    when the part holds an analog resident tensor, at layer 0)."""
    if resident_targets(lw, draw.targets):
        return start_streams(lw, [draw.seed], inputs, draw.targets, profile)[0]
    return Stream(draw.seed, list(clean.hidden), mvm_stream(draw.seed, lw.device))


def _layer(lw: LayerwiseModel, index: int, clean: Stream, live: Sequence[_Draw],
           inputs: Sequence[LayerInputs], profile: ChipProfile) -> None:  # fmt: skip
    """The clean stream and every live draw through decoder layer ``index``, each draw programming its
    part's tensors of this layer (read again from the shards after it)."""
    prefix = lw.layer_prefix(index)
    targets = {id(draw.stream): analog_of_layer(draw.targets, prefix) for draw in live}
    lw.load_layer(index)
    streams = [clean, *(draw.stream for draw in live if draw.stream is not None)]
    run_draws(lw, index, streams, inputs, profile, lambda stream: targets.get(id(stream), []),
              reload=lambda names: lw.load_layer(index, names))  # fmt: skip
    lw.free_layer(index)


@torch.no_grad()
def scan_layerwise(lw: LayerwiseModel, tokens: torch.Tensor, parts: Sequence[Sequence[Any]],
                   seeds: Sequence[int], profile: ChipProfile, seq_len: int = 256, batch_size: int = 8,
                   progress: bool = False) -> tuple[float, list[float]]:  # fmt: skip
    """(clean perplexity, perplexity per (part, seed) in part-major order), one decoder layer at a time."""
    batches = window_batches(tokens, seq_len, None, batch_size)
    inputs = capture_inputs(lw, [batch for batch, _ in batches])
    clean = Stream.start(None, inputs, lw.device)
    draws = [_Draw(targets, seed, _first_layer(lw, targets)) for targets in parts for seed in seeds]
    for index in progress_bar(range(lw.num_layers), desc="layers", unit="layer", enabled=progress):
        for draw in draws:
            if draw.start == index:
                draw.stream = _fork(lw, draw, clean, inputs, profile)
        live = [draw for draw in draws if draw.stream is not None]
        with reporting_memory(lw, index, inputs, len(live) + 1):
            _layer(lw, index, clean, live, inputs, profile)
    values = []
    for draw in draws:
        assert draw.stream is not None
        resident = resident_targets(lw, draw.targets)
        values.append(stream_perplexity(lw, draw.stream, inputs, resident, profile, window_nll(batches)))
    return stream_perplexity(lw, clean, inputs, [], profile, window_nll(batches)), values


def layerwise_perplexities(lw: LayerwiseModel, profile: ChipProfile, progress: bool = False) -> Any:
    """The ``perplexities`` runner of ``sensitivity_scan`` for ``lw`` (``(model, tokens, parts, seeds,
    seq_len, batch_size)`` → clean, values)."""

    def run(tokens: torch.Tensor, parts: Sequence[Sequence[Any]], seeds: Sequence[int], seq_len: int,
            batch_size: int) -> tuple[float, list[float]]:  # fmt: skip
        return scan_layerwise(lw, tokens, parts, seeds, profile, seq_len, batch_size, progress)

    return run


def refuse_scan_after_changes(options: dict[str, Any], step: str, flag: str) -> None:
    """CimError when ``step``'s quick scan (run before the pass) would follow a step that changes weights
    (``options["model_changed"]``, set by the layer-by-layer recipe runner): the scan would not see them."""
    if options.get("model_changed"):
        raise CimError(f"layer by layer, {step}'s quick scan runs before the pass and would not see the "
                       f"earlier steps' changes: pass {flag} FILE, put {step} first, or convert with "
                       "--whole-model")


__all__ = ["layerwise_perplexities", "refuse_scan_after_changes", "scan_layerwise"]
