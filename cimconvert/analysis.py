"""The ``analyze`` command: the per-layer / per-block noise sensitivity scan of a model or bundle, written
to files.

The scan itself (noise in one group of analog tensors at a time, over several seeds, against the clean
model) is :mod:`cimconvert.evaluation.sensitivity`, which HPD's ``--hpd-layers auto`` uses too;
:func:`write_scan` saves ``sensitivity.json`` (read by ``--hpd-layers auto --hpd-scan``),
``sensitivity.md`` and ``sensitivity.png``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cimconvert.datasets import load_text, tokenize
from cimconvert.devices import describe, resolve_device, resolve_dtype
from cimconvert.distributed import is_main_rank
from cimconvert.errors import CimError
from cimconvert.evaluation.loading import load_for_eval
from cimconvert.evaluation.sensitivity import FIRST_SEED, GRANULARITIES, group_targets, sensitivity_scan
from cimconvert.finite import dumps
from cimconvert.layerwise.memory import layerwise_source, open_layerwise
from cimconvert.layerwise.scan import layerwise_perplexities
from cimconvert.methods.hpd import hpd_placement

__all__ = [
    "FIRST_SEED",
    "GRANULARITIES",
    "analyze",
    "format_table",
    "group_targets",
    "plot_scan",
    "sensitivity_scan",
    "write_scan",
]


# -------------------------------------------------------------------------------------- outputs
def format_table(scan: dict[str, Any]) -> str:
    """A Markdown table: one row per layer/block, plus the all-noise reference."""
    lines = [
        f"Sensitivity under `{scan['profile']}` ({scan['granularity']} granularity, "
        f"{len(scan['seeds'])} seeds, {scan['tokens']} tokens): clean PPL {scan['clean_ppl']:.3f}",
        "",
        "| layer | kind | PPL (mean ± std) | ΔPPL % (mean ± std) |",
        "|---|---|---|---|",
    ]
    for row in [*scan["rows"], {"name": "all analog tensors", "kind": "-", **scan["all"]}]:
        lines.append(
            f"| {row['name']} | {row['kind']} | {row['ppl_mean']:.3f} ± {row['ppl_std']:.3f} | "
            f"{row['delta_pct_mean']:+.3f} ± {row['delta_pct_std']:.3f} |"
        )
    return "\n".join(lines)


def plot_scan(scan: dict[str, Any], path: str | Path) -> Path:
    """Bar chart of ΔPPL % per row (error bars: std over seeds), coloured by kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = scan["rows"]
    kinds = sorted({r["kind"] for r in rows})
    colours = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(kinds)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(rows) + 2), 4.2))
    ax.bar(range(len(rows)), [r["delta_pct_mean"] for r in rows], yerr=[r["delta_pct_std"] for r in rows],
           color=[colours[r["kind"]] for r in rows], capsize=2)  # fmt: skip
    ax.set_xticks(range(len(rows)), [_short(r["name"]) for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("PPL change vs clean (%)")
    ax.set_title(f"Noise in one {scan['granularity']} at a time — {scan['profile']} "
                 f"(all: {scan['all']['delta_pct_mean']:+.1f}%)", fontsize=9)  # fmt: skip
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[k]) for k in kinds]
    ax.legend(handles, kinds, fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _short(name: str) -> str:
    """``backbone.layers.7.mixer.out_proj`` → ``7.out_proj``."""
    parts = name.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return f"{parts[digits[0]]}.{parts[-1]}" if digits and digits[0] != len(parts) - 1 else parts[-1]


def scan_paths(out: str | Path) -> dict[str, Path]:
    """The files :func:`write_scan` writes into folder ``out``, by kind (json, md, png)."""
    return {k: Path(out) / f"sensitivity.{k}" for k in ("json", "md", "png")}


def write_scan(scan: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write ``sensitivity.json``, ``.md`` and ``.png`` into folder ``out``; returns their paths."""
    text = dumps(scan, indent=2)  # a NaN/Inf figure fails here, before anything is written
    paths = scan_paths(out)
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(text, encoding="utf-8")
    paths["md"].write_text(format_table(scan) + "\n", encoding="utf-8")
    plot_scan(scan, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------- entry point
def analyze(
    model: str,
    profile: str | None,
    seeds: int = 5,
    seed: int = FIRST_SEED,
    granularity: str = "layer",
    out: str | Path | None = None,
    dataset: str = "heldout",
    max_tokens: int = 4096,
    seq_len: int = 256,
    batch_size: int = 8,
    analog: Sequence[str] = (),
    digital: Sequence[str] = (),
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    layerwise: bool | str = "auto",
) -> dict[str, Any]:
    """Sensitivity scan of MODEL (HF folder, hub id or bundle) under ``profile``; writes JSON/MD/PNG.

    ``out`` defaults to ``./<model>-sensitivity-<profile>/``. Returns the scan plus the written paths.
    ``device`` / ``dtype`` / ``layerwise`` as in :func:`cimconvert.api.evaluate` (layer by layer: the same
    numbers, :mod:`cimconvert.layerwise.scan`). Under a ``torchrun`` launch the (layer, seed) draws are
    shared out over the ranks and only rank 0 writes the files.
    """
    if seeds < 1:
        raise CimError("--seeds must be at least 1")
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    source, by_layer = layerwise_source(model, profile, layerwise)
    runner = None
    if by_layer:
        assert source is not None and profile is not None
        lw, chip, tokenizer = open_layerwise(source, profile, where)
        net, runner = lw.model, layerwise_perplexities(lw, chip, progress)
    else:
        net, tokenizer, targets, chip = load_for_eval(model, profile, where, torch_dtype, source=source)
    if source is not None or analog or digital:  # a what-if placement (a bundle's own is read back)
        targets = hpd_placement(net, chip, analog, digital).analog()
    tokens = tokenize(tokenizer, load_text(dataset), max_tokens)
    scan = sensitivity_scan(net, tokens, targets, chip, [seed + i for i in range(seeds)], granularity,
                            seq_len=seq_len, batch_size=batch_size, progress=progress,
                            perplexities=runner)  # fmt: skip
    scan.update({"model": model, "dataset": dataset, "layer_by_layer": by_layer,
                 **describe(where, torch_dtype)})
    folder = (
        Path(out)
        if out is not None
        else Path.cwd() / f"{Path(model.rstrip('/')).name}-sensitivity-{chip.name}"
    )
    if is_main_rank():  # the other ranks of a launch computed their share and write nothing
        scan["files"] = write_scan(scan, folder)
    else:
        scan["files"] = {k: str(v) for k, v in scan_paths(folder).items()}
    return scan
