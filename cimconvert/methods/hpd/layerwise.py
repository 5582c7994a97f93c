"""HPD one decoder layer at a time (:mod:`cimconvert.layerwise.steps`): data-free, so no stream runs.

The layers are resolved on the skeleton as :meth:`~cimconvert.methods.hpd.method.HpdMethod.apply`
resolves them (the default last SSM ``out_proj``, module paths, ``auto`` from an ``--hpd-scan`` JSON); each
is split when its decoder layer is loaded; ``auto`` without a scan JSON runs the quick scan layer by
layer first (:mod:`cimconvert.layerwise.scan`). Decoder layers only: ``lm_head`` (outside them) is
refused.
"""

from __future__ import annotations

from typing import Any

from cimconvert.errors import CimError
from cimconvert.evaluation.sensitivity import read_scan
from cimconvert.layerwise.scan import layerwise_perplexities, refuse_scan_after_changes
from cimconvert.layerwise.skeleton import LayerwiseModel
from cimconvert.layerwise.steps import BaseLayerStep
from cimconvert.methods.base import MethodResult
from cimconvert.methods.hpd.layers import resolve_layers
from cimconvert.methods.hpd.method import DEFAULT_FACTOR, hpd_result, quick_scan, split_layer, transform_entry
from cimconvert.methods.hpd.split import FACTORS
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile


class HpdLayerStep(BaseLayerStep):
    """HPD as a layer step (:class:`cimconvert.layerwise.steps.LayerStep`): splits, no streams."""

    name = "hpd"
    changes_weights = True

    def __init__(self, adapter: Any, layers: list[str], factor: str, rank: int | None,
                 scan: dict[str, Any] | None = None) -> None:  # fmt: skip
        """``scan``: the report's ``scan`` entry when ``auto`` read a scan JSON."""
        self.adapter, self.layers, self.factor, self.rank, self.scan = adapter, layers, factor, rank, scan
        self.done: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}

    def transform(self, lw: LayerwiseModel, index: int) -> tuple[list[str], list[str]]:
        """Split the requested layers of decoder layer ``index``; returns the factors' names."""
        analog, digital = [], []
        for name in (n for n in self.layers if n.startswith(lw.layer_prefix(index))):
            row = split_layer(lw.model, self.adapter, name, self.factor, self.rank)
            entry = transform_entry(name, lw.model.get_submodule(name), row)
            self.done[name] = (row, entry)
            analog.append(entry["params"]["analog"])
            digital.append(entry["params"]["digital"])
        return analog, digital

    def finish(self, ppl: dict[int | None, float]) -> MethodResult:
        """The method's entries and report, in the resolved order of the layers."""
        rows = [self.done[name][0] for name in self.layers]
        result = hpd_result(rows, [self.done[name][1] for name in self.layers], self.factor)
        if self.scan is not None:
            result.report["scan"] = self.scan
        return result


def hpd_layer_step(lw: LayerwiseModel, profile: ChipProfile, options: dict[str, Any],
                   placement: Placement | None = None) -> HpdLayerStep:  # fmt: skip
    """HPD's layer step for ``lw``: the layers resolved on the skeleton, each inside a decoder layer."""
    factor = options.get("hpd_factor") or DEFAULT_FACTOR
    if factor not in FACTORS:
        raise CimError(f"unknown hpd_factor '{factor}' (choose from {', '.join(FACTORS)})")
    requested = list(options.get("hpd_layers") or ())
    scan = None
    if "auto" in requested and options.get("hpd_scan"):
        scan = {**read_scan(options["hpd_scan"], "--hpd-scan"), "source": str(options["hpd_scan"])}
    elif "auto" in requested:
        refuse_scan_after_changes(options, "hpd", "--hpd-scan")
        runner = layerwise_perplexities(lw, profile)
        scan = {**quick_scan(lw.model, profile, seed=int(options.get("seed") or 0), perplexities=runner),
                "source": "quick"}
    layers = resolve_layers(lw.model, lw.adapter, requested, scan, int(options.get("hpd_auto_top") or 1))
    outside = [name for name in layers if lw.adapter.layer_index(f"{name}.weight") is None]
    if outside:
        raise CimError(f"layer by layer, hpd splits layers inside the decoder layers only, not "
                       f"'{outside[0]}'; convert with --whole-model")
    noted = None if scan is None else {"profile": scan.get("profile"), "source": scan["source"]}
    return HpdLayerStep(lw.adapter, layers, factor, options.get("hpd_rank"), noted)


__all__ = ["HpdLayerStep", "hpd_layer_step"]
