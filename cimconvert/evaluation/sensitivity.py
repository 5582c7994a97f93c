"""Per-layer / per-block noise sensitivity: chip noise in one part of the model at a time.

For every analog tensor (``granularity="layer"``) or every decoder block (``"block"``: all analog tensors
of that block together; top-level tensors such as an analog LM head form their own group) the model is
evaluated with chip noise programmed into that group only, over several seeds; the row reports the
perplexity and its change against the clean model (mean ± std over seeds). An ``all`` row (noise in
every analog tensor) is the reference.

Used by the ``analyze`` command (:mod:`cimconvert.analysis`, which writes the scan to files) and by the
methods that rank layers by it (HPD's ``--hpd-layers auto``, the digital budget): they read a written scan
with :func:`read_scan` or run :func:`quick_layer_scan` on the shipped calibration text, so it sits below all.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from cimconvert.arch import get_adapter
from cimconvert.datasets import load_text, tokenize
from cimconvert.devices import model_device
from cimconvert.distributed import spread
from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import noisy_perplexity, run_fingerprint
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.hpd_split import splittable

GRANULARITIES = ("layer", "block")
FIRST_SEED = 1000


def group_targets(model: nn.Module, targets: Sequence[Any], granularity: str) -> list[dict[str, Any]]:
    """Groups of analog targets to perturb one at a time: ``{name, block, kind, targets, splittable}``."""
    if granularity not in GRANULARITIES:
        raise CimError(f"granularity must be one of {', '.join(GRANULARITIES)} (got '{granularity}')")
    adapter = get_adapter(model.config)
    groups: dict[str, dict[str, Any]] = {}
    for target in targets:
        block = adapter.layer_index(target.name)
        if granularity == "layer":
            key = target.name.removesuffix(".weight")
            entry = groups.setdefault(
                key, {"name": key, "block": block, "kind": target.kind, "targets": [],
                      "splittable": splittable(model, target.name)},
            )  # fmt: skip
        else:
            key = (
                f"{adapter.layers_path}.{block}" if block is not None else target.name.removesuffix(".weight")
            )
            entry = groups.setdefault(
                key, {"name": key, "block": block, "kind": "block" if block is not None else target.kind,
                      "targets": [], "splittable": False},
            )  # fmt: skip
        entry["targets"].append(target)
    return list(groups.values())


def _stats(clean: float, values: list[float]) -> dict[str, Any]:
    deltas = [100.0 * (v / clean - 1.0) for v in values]
    return {
        "ppl_mean": statistics.fmean(values),
        "ppl_std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "delta_pct_mean": statistics.fmean(deltas),
        "delta_pct_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
        "per_seed": values,
    }


def sensitivity_scan(
    model: nn.Module,
    tokens: torch.Tensor,
    targets: Sequence[Any],
    profile: ChipProfile,
    seeds: Sequence[int],
    granularity: str = "layer",
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = False,
    perplexities: Callable[..., tuple[float, list[float]]] | None = None,
) -> dict[str, Any]:
    """Noise in one group at a time (see the module docstring); rows sorted in model order.

    ``perplexities(tokens, parts, seeds, seq_len, batch_size)`` → (clean, one value per (part, seed) in
    part-major order) replaces the whole-model evaluation (``cimconvert.layerwise.scan``: layer by layer).
    """
    if not targets:
        raise CimError(
            f"profile {profile.name} places no tensor of this model on analog tiles; nothing to scan"
        )

    start = time.perf_counter()
    groups = group_targets(model, targets, granularity)
    parts = [group["targets"] for group in groups] + [list(targets)]  # the last: noise everywhere
    run = perplexities or _whole_model(model, targets, profile, granularity, progress)
    clean, values = run(tokens, parts, seeds, seq_len, batch_size)
    per_part = [values[i * len(seeds) : (i + 1) * len(seeds)] for i in range(len(parts))]
    rows = [
        {"name": group["name"], "block": group["block"], "kind": group["kind"], "granularity": granularity,
         "splittable": group["splittable"], "tensors": [t.name for t in group["targets"]],
         **_stats(clean, part)}
        for group, part in zip(groups, per_part, strict=False)
    ]  # fmt: skip
    everything = _stats(clean, per_part[-1])
    return {
        "profile": profile.name,
        "profile_hash": profile.content_hash(),
        "granularity": granularity,
        "seeds": list(seeds),
        "tokens": int(tokens.numel()),
        "seq_len": seq_len,
        "clean_ppl": clean,
        "all": everything,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def _whole_model(model: nn.Module, targets: Sequence[Any], profile: ChipProfile, granularity: str,
                 progress: bool) -> Callable[..., tuple[float, list[float]]]:  # fmt: skip
    """The ``perplexities`` runner on the whole in-memory model: the clean pass and one noisy evaluation
    per (part, seed), shared out over the ranks of a ``torchrun`` launch."""

    def run_all(tokens: torch.Tensor, parts: Sequence[Sequence[Any]], seeds: Sequence[int], seq_len: int,
                batch_size: int) -> tuple[float, list[float]]:  # fmt: skip
        def ppl_fn(m: nn.Module, t: torch.Tensor) -> float:
            return perplexity(m, t, seq_len=seq_len, batch_size=batch_size)

        def run(task: tuple[int, int] | None) -> float:
            if task is None:
                return ppl_fn(model, tokens)
            part, seed = task
            return noisy_perplexity(model, tokens, parts[part], profile, seed, ppl_fn)

        tasks: list[tuple[int, int] | None] = [None, *((p, s) for p in range(len(parts)) for s in seeds)]
        agree = run_fingerprint(model, tokens, targets, profile, list(seeds), granularity, seq_len,
                                batch_size)  # fmt: skip
        desc = f"sensitivity ({profile.name})" if progress else None
        clean, *values = spread(tasks, run, model_device(model), agree, progress=desc)
        return clean, values

    return run_all


# ------------------------------------------------------------------------- scans for the methods
def read_scan(path: str | Path, flag: str) -> dict[str, Any]:
    """A sensitivity-scan JSON written by ``cimconvert analyze`` (a folder means its ``sensitivity.json``).

    ``flag`` names the option that gave ``path`` in the one-line errors (e.g. ``--hpd-scan``).
    """
    file = Path(path)
    if file.is_dir():
        file = file / "sensitivity.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CimError(f"{flag}: file not found: {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CimError(f"{flag}: cannot read {file} ({exc.__class__.__name__})") from None


def quick_layer_scan(
    model: nn.Module,
    targets: Sequence[Any],
    profile: ChipProfile,
    seeds: Sequence[int],
    max_tokens: int,
    missing: str,
    progress: bool = False,
    perplexities: Callable[..., tuple[float, list[float]]] | None = None,
) -> dict[str, Any]:
    """A layer scan of ``targets`` on the shipped calibration text ``calib`` (for a method given no scan).

    Needs the model's tokenizer in ``model.config._name_or_path``; without one the CimError is ``missing``
    (a one-line template with ``{folder}`` that says which option to pass instead). ``perplexities``: as in
    :func:`sensitivity_scan` (a layer-by-layer runner).
    """
    folder = getattr(model.config, "_name_or_path", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        raise CimError(missing.format(folder=folder)) from None
    tokens = tokenize(tokenizer, load_text("calib"), max_tokens)
    return sensitivity_scan(model, tokens, targets, profile, seeds, "layer", progress=progress,
                            perplexities=perplexities)
