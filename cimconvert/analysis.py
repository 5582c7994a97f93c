"""Per-layer / per-block noise sensitivity: chip noise in one part of the model at a time.

For every analog tensor (``granularity="layer"``) or every decoder block (``"block"``: all analog tensors
of that block together; top-level tensors such as an analog LM head form their own group) the model is
evaluated with chip noise programmed into that group only, over several seeds; the row reports the
perplexity and its change against the clean model (mean ± std over seeds). An ``all`` row (noise in
every analog tensor) is the reference. :func:`write_scan` saves ``sensitivity.json`` (read by
``--hpd-layers auto``), ``sensitivity.md`` and ``sensitivity.png``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import noisy_perplexities
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.profiles import ChipProfile

GRANULARITIES = ("layer", "block")
FIRST_SEED = 1000


def _module_of(model: nn.Module, tensor: str) -> nn.Module | None:
    try:
        return model.get_submodule(tensor.rpartition(".")[0])
    except AttributeError:
        return None


def _splittable(model: nn.Module, tensor: str) -> bool:
    """Whether HPD can split the module owning ``tensor`` (a called linear layer)."""
    from cimconvert.methods.hpd.layers import UNSPLITTABLE, is_linear

    module_path = tensor.rpartition(".")[0]
    module = _module_of(model, tensor)
    return module is not None and is_linear(module) and module_path.rpartition(".")[2] not in UNSPLITTABLE


def group_targets(model: nn.Module, targets: Sequence[Any], granularity: str) -> list[dict[str, Any]]:
    """Groups of analog targets to perturb one at a time: ``{name, block, kind, targets, splittable}``."""
    from cimconvert.arch import get_adapter

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
                      "splittable": _splittable(model, target.name)},
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
) -> dict[str, Any]:
    """Noise in one group at a time (see the module docstring); rows sorted in model order."""
    if not targets:
        raise CimError(
            f"profile {profile.name} places no tensor of this model on analog tiles; nothing to scan"
        )

    def ppl_fn(m: nn.Module, t: torch.Tensor) -> float:
        return perplexity(m, t, seq_len=seq_len, batch_size=batch_size)

    start = time.perf_counter()
    clean = ppl_fn(model, tokens)
    groups = group_targets(model, targets, granularity)
    rows = []
    for group in tqdm(groups, desc=f"sensitivity ({profile.name})", disable=not progress, unit="group"):
        values = noisy_perplexities(model, tokens, group["targets"], profile, seeds, ppl_fn)
        rows.append({
            "name": group["name"], "block": group["block"], "kind": group["kind"],
            "granularity": granularity, "splittable": group["splittable"],
            "tensors": [t.name for t in group["targets"]], **_stats(clean, values),
        })  # fmt: skip
    everything = _stats(clean, noisy_perplexities(model, tokens, targets, profile, seeds, ppl_fn))
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


def quick_scan(
    model: nn.Module, profile: ChipProfile, seed: int = 0, progress: bool = False, max_tokens: int = 2048
) -> dict[str, Any]:
    """A 2-seed layer scan on the shipped calibration text (for ``--hpd-layers auto`` without a JSON).

    Needs the model's tokenizer in ``model.config._name_or_path``.
    """
    from transformers import AutoTokenizer

    from cimconvert.api import tokenize
    from cimconvert.data import load_text
    from cimconvert.methods.hpd import hpd_placement

    folder = getattr(model.config, "_name_or_path", "")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        raise CimError(
            f"--hpd-layers auto: no tokenizer for a quick scan in '{folder}'; pass --hpd-scan"
        ) from None
    tokens = tokenize(tokenizer, load_text("calib"), max_tokens)
    targets = hpd_placement(model, profile).analog()
    seeds = [FIRST_SEED + seed, FIRST_SEED + seed + 1]
    return sensitivity_scan(model, tokens, targets, profile, seeds, "layer", progress=progress)


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


def write_scan(scan: dict[str, Any], out: str | Path) -> dict[str, str]:
    """Write ``sensitivity.json``, ``.md`` and ``.png`` into folder ``out``; returns their paths."""
    from cimconvert.finite import dumps

    text = dumps(scan, indent=2)  # a NaN/Inf figure fails here, before anything is written
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {k: folder / f"sensitivity.{k}" for k in ("json", "md", "png")}
    paths["json"].write_text(text, encoding="utf-8")
    paths["md"].write_text(format_table(scan) + "\n", encoding="utf-8")
    plot_scan(scan, paths["png"])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------- entry point
def analyze(
    model: str,
    profile: str | None,
    seeds: int = 3,
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
) -> dict[str, Any]:
    """Sensitivity scan of MODEL (HF folder, hub id or bundle) under ``profile``; writes JSON/MD/PNG.

    ``out`` defaults to ``./<model>-sensitivity-<profile>/``. Returns the scan plus the written paths.
    """
    from cimconvert.api import is_bundle, load_for_eval, tokenize
    from cimconvert.bundle.reader import manifest_overrides, read_manifest
    from cimconvert.data import load_text
    from cimconvert.methods.hpd import hpd_placement

    if seeds < 1:
        raise CimError("--seeds must be at least 1")
    net, tokenizer, _, chip = load_for_eval(model, profile)
    if is_bundle(model) and not (analog or digital):
        overrides = manifest_overrides(read_manifest(Path(model)))
        analog, digital = overrides["analog"], overrides["digital"]
    targets = hpd_placement(net, chip, analog, digital).analog()
    tokens = tokenize(tokenizer, load_text(dataset), max_tokens)
    scan = sensitivity_scan(net, tokens, targets, chip, [seed + i for i in range(seeds)], granularity,
                            seq_len=seq_len, batch_size=batch_size, progress=progress)  # fmt: skip
    scan.update({"model": model, "dataset": dataset})
    folder = (
        Path(out)
        if out is not None
        else Path.cwd() / f"{Path(model.rstrip('/')).name}-sensitivity-{chip.name}"
    )
    scan["files"] = write_scan(scan, folder)
    return scan
