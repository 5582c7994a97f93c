"""Layer-by-layer execution for models larger than memory (docs/INTERNALS.md, README "Large models").

:mod:`.skeleton` (the model on ``meta``, one decoder layer loaded from the shards at a time),
:mod:`.passes` (cached activations through one layer for several noise draws; out-of-memory reports),
:mod:`.evaluate` (Monte-Carlo perplexity), :mod:`.memory` (when it engages: ``auto``).
"""

from cimconvert.layerwise.evaluate import evaluate_layerwise
from cimconvert.layerwise.passes import LayerMemoryError, capture_inputs, run_layers, start_streams
from cimconvert.layerwise.skeleton import LayerwiseModel

__all__ = [
    "LayerMemoryError",
    "LayerwiseModel",
    "capture_inputs",
    "evaluate_layerwise",
    "run_layers",
    "start_streams",
]
