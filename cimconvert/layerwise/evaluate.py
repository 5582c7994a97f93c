"""Monte-Carlo perplexity one decoder layer at a time: the clean pass and every noise draw together.

Same windows, batches, programmed weights and NLL arithmetic as
:func:`cimconvert.evaluation.monte_carlo.evaluate_model`, so the numbers are the same: each layer is
loaded once per programmed draw, every stream's cached activations go through it, and the model's own
final norm and lm_head finish each batch (an analog lm_head programmed with the draw's seed).
Per-MVM noise (DAC/ADC, out_noise) continues one generator per draw from layer to layer; it follows
the whole-model order exactly when all windows form one batch (with several batches the whole-model
path interleaves the draws batch by batch: the per-MVM draws then differ, with the same distribution).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import NoisyEvalResult
from cimconvert.evaluation.perplexity import add_batch_nll, nll_perplexity, window_batches
from cimconvert.layerwise.passes import (
    Stream,
    capture_inputs,
    head_logits,
    noisy_draw,
    resident_targets,
    run_layers,
    start_streams,
)
from cimconvert.layerwise.skeleton import LayerwiseModel
from cimconvert.profiles import ChipProfile

Running = tuple[float, int]


def stream_perplexity(
    lw: LayerwiseModel, stream: Stream, inputs: Sequence[Any], targets: Sequence[Any], profile: ChipProfile,
    add: Callable[[Running, int, torch.Tensor], Running],
) -> float:  # fmt: skip
    """Perplexity of one stream from its last hidden states (resident analog tensors programmed):
    ``add(running, b, logits)`` folds batch ``b``'s logits into the (NLL sum, scored tokens) pair."""
    running = (0.0, 0)
    with noisy_draw(lw, targets, profile, stream, keep_clean=True):
        for b, (entry, final) in enumerate(zip(inputs, stream.hidden, strict=True)):
            running = add(running, b, head_logits(lw, entry, final))
    return nll_perplexity(running)


def window_nll(batches: Sequence[Any]) -> Callable[[Running, int, torch.Tensor], Running]:
    """The ``add`` of :func:`stream_perplexity` for evaluation windows (``window_batches``' spans)."""
    return lambda running, b, logits: add_batch_nll(running, logits, batches[b][0], batches[b][1])


@torch.no_grad()
def evaluate_layerwise(
    lw: LayerwiseModel, tokens: torch.Tensor, targets: Sequence[Any], profile: ChipProfile,
    seeds: Sequence[int], seq_len: int = 256, stride: int | None = None, batch_size: int = 8,
    progress: bool = False,
) -> NoisyEvalResult:  # fmt: skip
    """Clean perplexity plus one per noise seed, one decoder layer in memory at a time (see module doc)."""
    if lw.num_layers < 1:
        raise CimError("layer-by-layer evaluation needs at least one decoder layer")
    batches = window_batches(tokens, seq_len, stride, batch_size)
    inputs = capture_inputs(lw, [batch for batch, _ in batches])
    streams = start_streams(lw, [None, *seeds], inputs, targets, profile)
    run_layers(lw, inputs, streams, targets, profile, progress=progress)
    resident = resident_targets(lw, targets)
    ppls = [stream_perplexity(lw, s, inputs, resident, profile, window_nll(batches)) for s in streams]
    return NoisyEvalResult(
        profile=profile.name,
        profile_hash=profile.content_hash(),
        seeds=list(seeds),
        clean_ppl=ppls[0],
        per_seed=ppls[1:],
        analog_tensors=len(targets),
    )


__all__ = ["evaluate_layerwise", "stream_perplexity", "window_nll"]
