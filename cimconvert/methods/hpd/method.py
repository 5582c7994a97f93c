"""HPD as a cimconvert method: options, ``apply``, the manifest transform and its bundle loader."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cimconvert.errors import BundleError, CimError
from cimconvert.methods.base import MethodOption, MethodResult, ProgressFn
from cimconvert.methods.hpd.layers import read_scan, resolve_layers
from cimconvert.methods.hpd.split import ANALOG, DIGITAL, FACTORS, HpdLinear, build_split
from cimconvert.methods.hpd.stats import row_dynamic_range, spectrum_stats
from cimconvert.profiles import ChipProfile

#: ``type`` of the manifest transform entry (and key in ``TRANSFORM_LOADERS``).
TRANSFORM_TYPE = "hpd_split"
DEFAULT_FACTOR = "us_v"


# ------------------------------------------------------------------------------------------ apply
def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at module path ``name``."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


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
    from cimconvert.methods.hpd.layers import check_layer
    from cimconvert.methods.hpd.split import weight_matrix

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
    report = {
        "method": "hpd",
        "factor": factor,
        "factor_meaning": FACTORS[factor],
        "layers": rows,
        "digital_macs_per_token": sum(r["digital_macs_per_token"] for r in rows),
        "digital_extra_bytes": sum(r["digital_extra_bytes"] for r in rows),
        "analog_bytes_change": sum(r["analog_bytes_change"] for r in rows),
    }
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
        MethodOption("hpd_rank", int, None, "HPD: keep only the top-r singular triplets [full rank, exact]"),
        MethodOption("hpd_scan", str, None, "HPD: sensitivity JSON from `cimconvert analyze` (for auto)"),
        MethodOption("hpd_auto_top", int, 1, "HPD: number of layers 'auto' takes from the scan"),
    )

    def apply(
        self,
        model: nn.Module,
        adapter: Any,
        profile: ChipProfile,
        options: dict[str, Any],
        progress: bool = True,
        placement: Any = None,
    ) -> MethodResult:
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
        return {**read_scan(options["hpd_scan"]), "source": str(options["hpd_scan"])}
    from cimconvert.analysis import quick_scan

    return quick_scan(model, profile, seed=int(options.get("seed") or 0), progress=progress)


# ------------------------------------------------------------------------------------- placement
def hpd_placement(
    model: nn.Module, profile: ChipProfile, analog: Sequence[str] = (), digital: Sequence[str] = ()
) -> Any:
    """``plan_model`` in which a pattern naming a split module (e.g. ``lm_head``) selects its analog factor.

    The adapters classify ``<module>.analog.weight`` like the weight it replaced (so it follows the
    profile's defaults) and keep ``<module>.digital.weight`` digital.
    """
    from cimconvert.placement import plan_model

    splits = [name for name, mod in model.named_modules() if isinstance(mod, HpdLinear)]

    def expand(patterns: Sequence[str]) -> list[str]:
        out: list[str] = []
        for pattern in patterns:
            hits = [s for s in splits if _names(pattern, s)]
            out += [f"{s}.{ANALOG}.weight" for s in hits] or [pattern]
        return out

    return plan_model(model, profile, expand(analog), expand(digital))


def _names(pattern: str, module: str) -> bool:
    """Whether an override pattern (exact, or ``re:``/plain regex) names a split module."""
    import re

    if pattern == module:
        return True
    try:
        return re.fullmatch(pattern.removeprefix("re:"), module) is not None
    except re.error:
        return False


def _shard_of(bundle_dir: Path, key: str) -> Path:
    index = bundle_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        if key in weight_map:
            return bundle_dir / weight_map[key]
    for file in sorted(bundle_dir.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(file), "pt") as handle:
            if key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return file
    raise BundleError(f"HPD transform: tensor '{key}' is not in the bundle {bundle_dir}")


def _read_tensor(bundle_dir: Path, key: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(_shard_of(bundle_dir, key)), "pt") as handle:
        return handle.get_tensor(key)


def expected_key_changes(params: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(keys the standard class will report missing, keys it will report unexpected) for one split."""
    added = [params["digital"], params["analog"]]
    if params.get("bias"):
        added.append(f"{params['module']}.{ANALOG}.bias")
    return list(params["replaces"]), added


def load_hpd_split(model: nn.Module, entry: Any, bundle_dir: str | Path) -> None:
    """``TRANSFORM_LOADERS['hpd_split']``: rebuild the split module and load its factors from the bundle."""
    params = entry.params if hasattr(entry, "params") else entry["params"]
    folder = Path(bundle_dir)
    name = params["module"]
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise BundleError(f"HPD transform: the loaded model has no module '{name}'") from None
    ref = next(iter(old.parameters()), None)
    split = HpdLinear(
        params["in_features"],
        params["out_features"],
        params["rank"],
        bool(params["bias"]),
        dtype=ref.dtype if ref is not None else None,
        device=ref.device if ref is not None else None,
    )
    tensors = {"digital.weight": params["digital"], "analog.weight": params["analog"]}
    if params["bias"]:
        tensors["analog.bias"] = f"{name}.{ANALOG}.bias"
    state = {local: _read_tensor(folder, key) for local, key in tensors.items()}
    try:
        split.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BundleError(f"HPD transform on '{name}': {str(exc).splitlines()[0]}") from None
    if params.get("untied_lm_head"):
        model.config.tie_word_embeddings = False
    replace_module(model, name, split.eval())
