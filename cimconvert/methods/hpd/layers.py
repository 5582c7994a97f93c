"""Which linear layers HPD decomposes: the default, explicit names, ``lm_head`` and ``auto`` (a scan)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from cimconvert.arch import get_adapter
from cimconvert.errors import CimError
from cimconvert.transforms.hpd_split import HpdLinear, is_linear


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
    if get_adapter(model.config).is_weight_only(name):  # read directly, never called: no split
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
