"""Deployment figures of a bundle: arrays used, per-token operation counts and cost estimates.

Everything is computed from the manifest (placement, tile grids, transforms, profile) and the bundle's
``config.json`` (top-k of MoE models, tied embeddings); the multiply-accumulate counting is
:func:`cimconvert.placement.tensor_macs_per_token`, applied to the on-disk tensors of the manifest (one
tensor count everywhere: safetensors keys, so a fused in-memory expert tensor counts once per expert).

Per token, each analog tensor runs ``active`` matrices (1; routed experts: top_k / E of them), and one
matrix ``[out, in]`` split into a tile grid of ``n_in × n_out`` tiles costs ``out·in`` analog MACs,
``n_in·n_out`` tile reads, ``out·n_in`` ADC conversions (every tile digitises its outputs; partial sums
over the input tiles are added digitally) and ``in·n_out`` DAC conversions (every tile drives its inputs).
Digital MACs are those of the weight matmuls kept digital (routers, lm_head, tensors a step kept digital),
the lm_head tied to the embedding, the SSM convolution and the digital halves transforms add (outlier
split, HPD factor); attention-score products, the SSM scan, norms and activations are not weight matmuls
and are not counted. Estimates multiply the counts by the profile's published ``costs``; a cost that no
source gives stays unknown (None) and so does every total that needs it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from cimconvert.arch import ArchAdapter, get_adapter, load_config
from cimconvert.bundle.manifest import Manifest, TensorEntry, TransformEntry
from cimconvert.errors import BundleError
from cimconvert.placement import tensor_macs_per_token
from cimconvert.profiles.schema import COST_FIELDS, CostFigure, CostSpec
from cimconvert.transforms.experts_inputs import TRANSFORM_TYPE as EXPERTS_INPUTS_TYPE

#: How the report counts tensors (REPORT.md and ``inspect --json`` use this count only).
TENSOR_COUNT = "on-disk tensors (safetensors keys; a fused in-memory expert tensor counts once per expert)"

#: What the operation counts leave out.
NOT_COUNTED = (
    "attention-score and attention-value products (they grow with the context), the SSM scan, norms, "
    "activations and the digital sums of tile partial outputs"
)


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def _analog_counts(entries: list[TensorEntry], adapter: ArchAdapter, config: Any) -> dict[str, float]:
    """Analog MACs, tile reads, ADC and DAC conversions per token of the analog ``entries``."""
    counts = {"analog_macs": 0.0, "tile_reads": 0.0, "adc_conversions": 0.0, "dac_conversions": 0.0}
    for entry in entries:
        info = entry.placement_info()
        matrix = info.matrix_shape
        if matrix is None or entry.tile_grid is None or matrix[0] * matrix[1] == 0:
            continue
        out_f, in_f = matrix
        macs = tensor_macs_per_token(info, adapter, config)
        active = macs / (out_f * in_f)  # matrices run per token (routed experts: a fraction)
        n_in, n_out = len(entry.tile_grid.in_sizes), len(entry.tile_grid.out_sizes)
        counts["analog_macs"] += macs
        counts["tile_reads"] += active * n_in * n_out
        counts["adc_conversions"] += active * out_f * n_in
        counts["dac_conversions"] += active * in_f * n_out
    return counts


def _tied_embedding(manifest: Manifest, adapter: ArchAdapter, config: Any) -> TensorEntry | None:
    """The embedding the output projection reuses, when lm_head is tied and stored nowhere else."""
    if not adapter.tied_embeddings(config) or any(t.kind == "lm_head" for t in manifest.tensors):
        return None
    token_embedding = f"{adapter.embeddings[0]}.weight"
    for entry in manifest.tensors:
        named = entry.name == token_embedding or entry.name.endswith("." + token_embedding)
        if entry.kind == "embedding" and named:
            return entry
    return None


def _digital_source(entry: TensorEntry, transform_types: dict[str, str]) -> str | None:
    """Which row of the digital MAC table a digital tensor belongs to (None: not a MAC-costing weight)."""
    if entry.transform is not None and entry.name.endswith("weight") and len(entry.shape) == 2:
        return transform_types.get(entry.transform, entry.transform)
    if entry.kind == "conv":
        return "ssm convolution"
    if entry.layout in ("out_in", "in_out"):
        return f"digital {entry.kind}"
    return None


def _digital_macs(entry: TensorEntry, adapter: ArchAdapter, config: Any) -> float:
    """Digital MACs per token of one digital tensor: its matmul cost, or one MAC per weight."""
    info = entry.placement_info()
    return tensor_macs_per_token(info, adapter, config) if info.matrix_shape else float(_numel(entry.shape))


def _fused_outputs(manifest: Manifest, adapter: ArchAdapter) -> dict[str, int]:
    """Outputs of all experts of each in-memory fused tensor, summed over the on-disk tensors that load
    into it (per-expert keys, or one ``[E, out, in]`` key); one pass over the manifest."""
    outputs: dict[str, int] = {}
    for tensor in manifest.tensors:
        matrix = tensor.placement_info().matrix_shape
        if matrix is not None:
            name = adapter.memory_name(tensor.name)
            experts = tensor.shape[0] if len(tensor.shape) == 3 else 1
            outputs[name] = outputs.get(name, 0) + matrix[0] * experts
    return outputs


def _experts_inputs_macs(
    entry: TransformEntry, manifest: Manifest, adapter: ArchAdapter, config: Any
) -> float:
    """Digital MACs per token of an ``experts_digital_inputs`` transform: each fused experts tensor keeps,
    per expert ``e``, ``k_e`` input channels digital (``k_e · out`` MACs), and a token runs top_k of E."""
    total = 0.0
    fused_outputs = _fused_outputs(manifest, adapter)
    for item in entry.params.get("tensors") or []:
        per_expert = item.get("digital_index") or []
        if per_expert:
            out_features = fused_outputs.get(item["tensor"], 0) / len(per_expert)
            channels = sum(len(index) for index in per_expert)
            total += channels * out_features * adapter.top_k(config) / len(per_expert)
    return total


#: Transforms whose digital work is described by their params, not by tensors they store: type → MACs.
PARAM_OVERHEADS: dict[str, Callable[[TransformEntry, Manifest, ArchAdapter, Any], float]] = {
    EXPERTS_INPUTS_TYPE: _experts_inputs_macs,
}


def digital_macs_by_source(manifest: Manifest, adapter: ArchAdapter, config: Any) -> dict[str, float]:
    """Digital MACs per token grouped by where they come from: ``digital <kind>`` (matmuls kept
    digital), ``lm_head (tied to the embedding)``, ``ssm convolution`` and each transform type (the
    tensors it produced, or what its params describe: :data:`PARAM_OVERHEADS`)."""
    transform_types = {t.id: t.type for t in manifest.transforms}
    sources: dict[str, float] = defaultdict(float)
    for transform in manifest.transforms:
        overhead = PARAM_OVERHEADS.get(transform.type)
        if overhead is not None:
            sources[transform.type] += overhead(transform, manifest, adapter, config)
    for entry in manifest.tensors:
        if entry.unit != "digital":
            continue
        source = _digital_source(entry, transform_types)
        if source is not None:
            sources[source] += _digital_macs(entry, adapter, config)
    tied = _tied_embedding(manifest, adapter, config)
    if tied is not None:
        sources["lm_head (tied to the embedding)"] += float(_numel(tied.shape))
    return dict(sorted(sources.items()))


def transform_overheads(manifest: Manifest, by_source: dict[str, float]) -> list[dict[str, Any]]:
    """One row per transform type: how many manifest entries, and the digital MACs per token it adds."""
    rows: dict[str, dict[str, Any]] = {}
    for transform in manifest.transforms:
        row = rows.setdefault(transform.type, {"type": transform.type, "entries": 0, "targets": 0})
        row["entries"] += 1
        row["targets"] += len(transform.targets)
    for row in rows.values():
        row["digital_macs_per_token"] = by_source.get(row["type"], 0.0)
    return list(rows.values())


def array_usage(manifest: Manifest) -> dict[str, Any]:
    """Tiles used, weights stored on them and the utilisation (weights / tile capacity)."""
    mapping = manifest.profile.profile.get("mapping", {})
    rows, cols = int(mapping.get("tile_rows", 0)), int(mapping.get("tile_cols", 0))
    analog = [t for t in manifest.tensors if t.unit == "analog"]
    tiles = sum(t.tiles for t in analog)
    weights = sum(_numel(t.shape) for t in analog)
    capacity = tiles * rows * cols
    return {"tiles": tiles, "tile_rows": rows, "tile_cols": cols, "weights_stored": weights,
            "capacity": capacity, "utilisation": weights / capacity if capacity else None}  # fmt: skip


def _figure(costs: CostSpec, name: str) -> float | None:
    figure: CostFigure | None = getattr(costs, name)
    return None if figure is None else figure.value


def _component(pj: float | None, included: bool) -> dict[str, Any]:
    """One energy component: its pJ per token and whether it is known, unknown or in the analog figure."""
    if included:
        return {"pj": None, "status": "included in analog"}
    return {"pj": pj, "status": "unknown" if pj is None else "known"}


def _cost_figures(costs: CostSpec) -> dict[str, Any]:
    """The profile's cost figures as JSON (value, source, note; None: unknown)."""
    figures: dict[str, Any] = {}
    for name in COST_FIELDS:
        figure: CostFigure | None = getattr(costs, name)
        figures[name] = None if figure is None else figure.model_dump()
    return {**figures, "converters_in_analog_energy": costs.converters_in_analog_energy}


def _energy(per_token: dict[str, float], costs: CostSpec) -> dict[str, Any]:
    """Energy per token in pJ by component (``value`` None: unknown) and the total (None unless every
    component is known or included in another)."""
    per_mac, per_read = _figure(costs, "analog_mac_energy_pj"), _figure(costs, "tile_read_energy_pj")
    if per_mac is not None:
        analog = per_mac * per_token["analog_macs"]
    else:
        analog = None if per_read is None else per_read * per_token["tile_reads"]
    parts = {"analog": analog}
    for part, count, field in (("adc", "adc_conversions", "adc_energy_pj"),
                               ("dac", "dac_conversions", "dac_energy_pj")):  # fmt: skip
        value = _figure(costs, field)
        parts[part] = None if value is None else value * per_token[count]
    digital = _figure(costs, "digital_mac_energy_pj")
    parts["digital"] = None if digital is None else digital * per_token["digital_macs"]
    included = {"adc", "dac"} if costs.converters_in_analog_energy else set()
    components = {part: _component(value, part in included) for part, value in parts.items()}
    known = all(c["status"] != "unknown" for c in components.values())
    total = sum(c["pj"] or 0.0 for c in components.values()) if known else None
    return {"components": components, "total_pj": total}


def _missing(costs: CostSpec) -> list[str]:
    """The cost fields the estimates need and the profile lacks (an alternative it has is not missing)."""
    needed = [name for name in COST_FIELDS if getattr(costs, name) is None]
    if costs.analog_mac_energy_pj is not None or costs.tile_read_energy_pj is not None:
        needed = [n for n in needed if n not in ("analog_mac_energy_pj", "tile_read_energy_pj")]
    if costs.converters_in_analog_energy:
        needed = [n for n in needed if n not in ("adc_energy_pj", "dac_energy_pj")]
    return needed


def estimate(per_token: dict[str, float], tiles: int, costs: CostSpec) -> dict[str, Any]:
    """Energy, analog latency and array area from the profile's published costs (None: unknown)."""
    latency = _figure(costs, "tile_read_latency_ns")
    area = _figure(costs, "tile_area_mm2")
    return {
        "energy_per_token": _energy(per_token, costs),
        "analog_latency_ns_per_token_serial": None if latency is None else latency * per_token["tile_reads"],
        "array_area_mm2": None if area is None else area * tiles,
        "unknown": _missing(costs),
    }


def manifest_costs(manifest: Manifest) -> CostSpec:
    """The cost figures of the profile a bundle records (none for a bundle written before costs);
    BundleError (one line) when the manifest's figures are malformed."""
    try:
        return CostSpec.model_validate(manifest.profile.profile.get("costs") or {})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(part) for part in err["loc"]) or "costs"
        raise BundleError(f"manifest profile field 'costs.{field}': {err['msg']}") from None


def deployment_figures(
    manifest: Manifest, config: dict[str, Any], costs: CostSpec | None = None
) -> dict[str, Any]:
    """Everything the deployment report shows, JSON-ready (docs/JSON.md, ``inspect --json``
    ``deployment``): arrays, per-token counts, digital MACs by source, transform overheads, estimates and
    the cost figures with their sources (``costs``: the bundle's profile's unless given).
    ``config``: the bundle's ``config.json`` as a dict (ModelInputError when it is not a valid config)."""
    costs = costs if costs is not None else manifest_costs(manifest)
    config = load_config(config)  # the transformers config: it maps aliased keys (num_experts, ...)
    adapter = get_adapter(manifest.source.model_type)
    analog = [t for t in manifest.tensors if t.unit == "analog"]
    by_source = digital_macs_by_source(manifest, adapter, config)
    per_token = {**_analog_counts(analog, adapter, config), "digital_macs": sum(by_source.values())}
    arrays = array_usage(manifest)
    return {
        "tensor_count": TENSOR_COUNT,
        "arrays": arrays,
        "per_token": per_token,
        "digital_macs_by_source": by_source,
        "transforms": transform_overheads(manifest, by_source),
        "estimate": estimate(per_token, arrays["tiles"], costs),
        "costs": _cost_figures(costs),
        "not_counted": NOT_COUNTED,
    }
