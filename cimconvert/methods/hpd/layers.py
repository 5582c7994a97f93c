"""Which linear layers HPD decomposes: the default, explicit names, ``lm_head`` and ``auto`` (a scan)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from cimconvert.errors import CimError
from cimconvert.transforms.hpd_split import UNSPLITTABLE, HpdLinear, is_linear


def default_layers(model: nn.Module, adapter: Any) -> list[str]:
    """The last SSM block's ``mixer.out_proj``; CimError for a model without SSM output projections."""
    outs = adapter.ssm_out_projs(model)
    if not outs:
        raise CimError(
            f"--method hpd: a {adapter.model_type} model has no SSM out_proj to decompose; "
            "name the layers with --hpd-layers (e.g. lm_head or a module path)"
        )
    return [outs[-1][0]]


def check_layer(model: nn.Module, name: str) -> nn.Module:
    """The module ``name`` of ``model``, checked to be a splittable linear layer."""
    name = name.removesuffix(".weight")
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise CimError(f"--hpd-layers: the model has no module '{name}'") from None
    if isinstance(module, HpdLinear):
        raise CimError(f"--hpd-layers: '{name}' is already decomposed")
    if not is_linear(module):
        raise CimError(f"--hpd-layers: '{name}' is a {type(module).__name__}, not a linear layer")
    if name.rpartition(".")[2] in UNSPLITTABLE:
        raise CimError(
            f"--hpd-layers: '{name}' is read as a raw weight by the model code; it cannot be split"
        )
    return module


def layers_from_scan(scan: dict[str, Any], top: int) -> list[str]:
    """The ``top`` layers with the largest mean perplexity increase in a sensitivity-scan JSON."""
    rows = [r for r in scan.get("rows", []) if r.get("splittable", r.get("granularity") == "layer")]
    if not rows:
        raise CimError("--hpd-layers auto: the sensitivity scan has no splittable layer rows")
    rows.sort(key=lambda r: r["delta_pct_mean"], reverse=True)
    return [r["name"] for r in rows[:top]]


def read_scan(path: str | Path) -> dict[str, Any]:
    """A sensitivity-scan JSON written by ``cimconvert analyze`` (one-line errors)."""
    file = Path(path)
    if file.is_dir():
        file = file / "sensitivity.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CimError(f"--hpd-scan: file not found: {file}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CimError(f"--hpd-scan: cannot read {file} ({exc.__class__.__name__})") from None


def resolve_layers(
    model: nn.Module,
    adapter: Any,
    requested: Sequence[str],
    scan: dict[str, Any] | None = None,
    top: int = 1,
) -> list[str]:
    """Module paths to decompose, in order, de-duplicated and checked.

    ``requested``: empty → :func:`default_layers`; ``lm_head`` → the adapter's LM head; ``auto`` →
    the ``top`` most sensitive layers of ``scan`` (the caller runs a scan when it has none); any
    other entry is a module path (a trailing ``.weight`` is accepted).
    """
    names: list[str] = []
    for item in requested or ["<default>"]:
        if item == "<default>":
            names += default_layers(model, adapter)
        elif item == "lm_head":
            names.append(adapter.lm_head)
        elif item == "auto":
            if scan is None:
                raise CimError("--hpd-layers auto needs a sensitivity scan (--hpd-scan FILE)")
            names += layers_from_scan(scan, top)
        else:
            names.append(item.removesuffix(".weight"))
    unique = list(dict.fromkeys(names))
    for name in unique:
        check_layer(model, name)
    return unique
