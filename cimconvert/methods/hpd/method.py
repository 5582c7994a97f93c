"""HPD as a cimconvert method: options, ``apply``, the quick scan of ``auto``, manifest transform entries."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

from cimconvert.errors import CimError
from cimconvert.evaluation.sensitivity import FIRST_SEED, quick_layer_scan, read_scan
from cimconvert.methods.base import MethodOption, MethodResult, ProgressFn
from cimconvert.methods.hpd.layers import check_layer, resolve_layers
from cimconvert.methods.hpd.split import FACTORS, build_split, weight_matrix
from cimconvert.methods.hpd.stats import row_dynamic_range, spectrum_stats
from cimconvert.placement import plan_model
from cimconvert.profiles import ChipProfile
from cimconvert.transforms.hpd_split import ANALOG, DIGITAL, TRANSFORM_TYPE, HpdLinear, replace_module

DEFAULT_FACTOR = "us_v"


# ------------------------------------------------------------------------------------------ apply
def _untie_if_lm_head(model: nn.Module, adapter: Any, name: str) -> bool:
    """A decomposed LM head is no longer the embedding: switch tying off in the config."""
    if name != adapter.lm_head or not getattr(model.config, "tie_word_embeddings", False):
        return False
    model.config.tie_word_embeddings = False
    return True


def split_layer(
    model: nn.Module, adapter: Any, name: str, factor: str = DEFAULT_FACTOR, rank: int | None = None
) -> dict[str, Any]:
    """Replace linear layer ``name`` by its :class:`HpdLinear` split (in place); returns its report row."""
    module = check_layer(model, name)
    weight, _ = weight_matrix(module)
    split, factors = build_split(module, factor, rank)
    untied = _untie_if_lm_head(model, adapter, name)
    replace_module(model, name, split)
    recon = (factors.analog @ factors.digital - weight.detach().double()).abs().max()
    out_f, in_f = weight.shape
    itemsize = weight.element_size()
    row = {
        "layer": name,
        "factor": factor,
        "shape": [out_f, in_f],
        "rank": split.rank,
        "analog_shape": [out_f, split.rank],
        "digital_shape": [split.rank, in_f],
        "max_abs_reconstruction_error": float(recon),
        "digital_macs_per_token": split.rank * in_f,
        "digital_extra_bytes": split.rank * in_f * itemsize,
        "analog_bytes_change": (out_f * split.rank - out_f * in_f) * itemsize,
        "untied_lm_head": untied,
        "dynamic_range_w": row_dynamic_range(weight),
        "dynamic_range_analog": row_dynamic_range(factors.analog),
    }
    if factors.singular_values is not None:
        row["spectrum"] = spectrum_stats(factors.singular_values)
    return row


def transform_entry(name: str, split: HpdLinear, row: dict[str, Any]) -> dict[str, Any]:
    """The manifest ``transforms[]`` entry of one split layer (targets = the tensors it produced)."""
    targets = [f"{name}.{DIGITAL}.weight", f"{name}.{ANALOG}.weight"]
    replaces = [f"{name}.weight"]
    if split.analog.bias is not None:
        targets.append(f"{name}.{ANALOG}.bias")
        replaces.append(f"{name}.bias")
    return {
        "id": f"hpd:{name}",
        "type": TRANSFORM_TYPE,
        "params": {
            "module": name,
            "factor": row["factor"],
            "rank": split.rank,
            "in_features": split.in_features,
            "out_features": split.out_features,
            "bias": split.analog.bias is not None,
            "digital": targets[0],
            "analog": targets[1],
            "replaces": replaces,
            "order": "y = analog(digital(x))",
            "untied_lm_head": row["untied_lm_head"],
        },
        "targets": targets,
    }


def apply_hpd(
    model: nn.Module,
    adapter: Any,
    layers: Sequence[str],
    factor: str = DEFAULT_FACTOR,
    rank: int | None = None,
    progress: ProgressFn | None = None,
) -> MethodResult:
    """Split each of ``layers`` (module paths, already resolved) in place; transforms and report."""
    if factor not in FACTORS:
        raise CimError(f"unknown hpd_factor '{factor}' (choose from {', '.join(FACTORS)})")
    rows, transforms = [], []
    for name in layers:
        if progress:
            progress(f"HPD: splitting {name} ({FACTORS[factor]})")
        row = split_layer(model, adapter, name, factor, rank)
        rows.append(row)
        transforms.append(transform_entry(name, model.get_submodule(name), row))
    return hpd_result(rows, transforms, factor)


def hpd_result(rows: list[dict[str, Any]], transforms: list[dict[str, Any]], factor: str) -> MethodResult:
    """The method result of split layers (their report rows and transform entries, in order)."""
    report = {
        "method": "hpd",
        "factor": factor,
        "factor_meaning": FACTORS[factor],
        "layers": rows,
        "digital_macs_per_token": sum(r["digital_macs_per_token"] for r in rows),
        "digital_extra_bytes": sum(r["digital_extra_bytes"] for r in rows),
        "analog_bytes_change": sum(r["analog_bytes_change"] for r in rows),
    }
    names = ", ".join(r["layer"] for r in rows[:3]) + (", ..." if len(rows) > 3 else "")
    report["summary"] = (f"split {len(rows)} layer(s) ({names}) into {FACTORS[factor]}: "
                         f"+{report['digital_macs_per_token']:,} digital MACs/token")  # fmt: skip
    return MethodResult(
        transforms=transforms,
        seeds={},
        report=report,
        analog=[t["params"]["analog"] for t in transforms],
        digital=[t["params"]["digital"] for t in transforms],
    )


class HpdMethod:
    """Hybrid Projection Decomposition: SVD of the noise-sensitive projection(s), U·Σ analog, Vᵀ digital."""

    name = "hpd"
    families: tuple[str, ...] = ("ssm", "dense", "moe")
    options = (
        MethodOption(
            "hpd_layers",
            str,
            (),
            "HPD: layers to decompose [the last SSM block's mixer.out_proj]: module paths, 'lm_head', "
            "or 'auto' (most sensitive layers of --hpd-scan)",
            multiple=True,
        ),
        MethodOption(
            "hpd_factor",
            str,
            DEFAULT_FACTOR,
            "HPD: us_v = U·Σ analog + Vᵀ digital (paper); sqrt = U·√Σ + √Σ·Vᵀ; u = U + Σ·Vᵀ; "
            "hadamard = fixed Hadamard rotation baseline",
            choices=tuple(FACTORS),
        ),
        MethodOption(
            "hpd_rank", int, None, "HPD: keep only the top-r singular triplets [full rank, exact]", minimum=1
        ),
        MethodOption("hpd_scan", str, None, "HPD: sensitivity JSON from `cimconvert analyze` (for auto)"),
        MethodOption("hpd_auto_top", int, 1, "HPD: number of layers 'auto' takes from the scan", minimum=1),
    )

    def apply(self, model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Any = None) -> MethodResult:  # fmt: skip
        """Resolve the layers (running a quick scan for ``auto`` without ``hpd_scan``) and split them.

        ``placement`` is not used: the quick scan ranks the layers of the profile's default placement.
        """
        requested = list(options.get("hpd_layers") or ())
        scan = _scan_for(model, adapter, profile, options, progress) if "auto" in requested else None
        layers = resolve_layers(model, adapter, requested, scan, int(options.get("hpd_auto_top") or 1))
        printer = print if progress else None
        result = apply_hpd(
            model,
            adapter,
            layers,
            options.get("hpd_factor") or DEFAULT_FACTOR,
            options.get("hpd_rank"),
            printer,
        )
        if scan is not None:
            result.report["scan"] = {"profile": scan.get("profile"), "source": scan.get("source", "quick")}
        return result


def _scan_for(
    model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """The scan for ``auto``: the given JSON, else a quick 2-seed scan on the calibration text."""
    if options.get("hpd_scan"):
        return {**read_scan(options["hpd_scan"], "--hpd-scan"), "source": str(options["hpd_scan"])}
    return quick_scan(model, profile, seed=int(options.get("seed") or 0), progress=progress)


# ------------------------------------------------------------------------------------- placement
def hpd_placement(
    model: nn.Module, profile: ChipProfile, analog: Sequence[str] = (), digital: Sequence[str] = ()
) -> Any:
    """``plan_model`` in which a pattern naming a split module (e.g. ``lm_head``) selects its analog factor.

    The adapters classify ``<module>.analog.weight`` like the weight it replaced (so it follows the
    profile's defaults) and keep ``<module>.digital.weight`` digital.
    """
    splits = [name for name, mod in model.named_modules() if isinstance(mod, HpdLinear)]

    def expand(patterns: Sequence[str]) -> list[str]:
        out: list[str] = []
        for pattern in patterns:
            hits = [s for s in splits if _names(pattern, s)]
            out += [f"{s}.{ANALOG}.weight" for s in hits] or [pattern]
        return out

    return plan_model(model, profile, expand(analog), expand(digital))


def quick_scan(
    model: nn.Module, profile: ChipProfile, seed: int = 0, progress: bool = False, max_tokens: int = 2048,
    perplexities: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """A 2-seed layer scan on the shipped calibration text (for ``--hpd-layers auto`` without a JSON).

    Needs the model's tokenizer in ``model.config._name_or_path``. ``perplexities``: the scan's runner
    (layer by layer; see ``sensitivity_scan``).
    """
    targets = hpd_placement(model, profile).analog()
    seeds = [FIRST_SEED + seed, FIRST_SEED + seed + 1]
    missing = "--hpd-layers auto: no tokenizer for a quick scan in '{folder}'; pass --hpd-scan"
    return quick_layer_scan(model, targets, profile, seeds, max_tokens, missing, progress=progress,
                            perplexities=perplexities)  # fmt: skip


def _names(pattern: str, module: str) -> bool:
    """Whether an override pattern (exact, or ``re:``/plain regex) names a split module."""
    if pattern == module:
        return True
    try:
        return re.fullmatch(pattern.removeprefix("re:"), module) is not None
    except re.error:
        return False
