"""REPORT.md: a human-readable deployment report of a bundle, rendered from its manifest and config.

It counts tensors one way only, on disk (:data:`cimconvert.bundle.costs.TENSOR_COUNT`), and shows the
figures of :func:`cimconvert.bundle.costs.deployment_figures` (arrays, per-token counts, transform
overheads, cost estimates with their sources), what each recipe step did (:func:`step_outcomes`: its
summary, the perplexities its calibration measured, its warnings) and the transforms and seeds.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from cimconvert.bundle.costs import TENSOR_COUNT
from cimconvert.bundle.manifest import Manifest
from cimconvert.placement import human_bytes
from cimconvert.profiles.schema import COST_FIELDS

#: Method-report keys shown elsewhere in the report, or counted in memory (the report counts on disk).
_NOT_DETAILS = frozenset({"method", "summary", "warnings", "skipped", "analog_tensors"})

_UNKNOWN = "unknown (no published figure in the profile)"
_PARTIAL = "unknown (a component is unknown)"


def _kind_rows(manifest: Manifest) -> list[str]:
    rows: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for entry in manifest.tensors:
        row = rows[(entry.kind, entry.unit)]
        row[0] += 1
        row[1] += entry.tiles
        row[2] += entry.nbytes
    lines = ["| kind | unit | tensors | tiles | bytes |", "|---|---|---:|---:|---:|"]
    for (kind, unit), (count, tiles, nbytes) in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        lines.append(f"| {kind} | {unit} | {count} | {tiles} | {human_bytes(nbytes)} |")
    return lines


def _table(title: str, rows: list[dict], indent: str = "   ") -> list[str]:
    """A Markdown table of a report's list of flat rows (columns: the first row's keys), under a list item."""
    if not rows:
        return [f"{indent}- {title}: none"]
    columns = list(rows[0])
    head = [
        f"{indent}- {title}:",
        "",
        f"{indent}| " + " | ".join(columns) + " |",
        indent + "|---" * len(columns) + "|",
    ]
    body = [f"{indent}| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return [*head, *body, ""]


# ------------------------------------------------------------------ what each step did
def _measured_ppl(report: dict[str, Any]) -> dict[str, float]:
    """The perplexities a step's calibration measured: report keys naming a ``ppl`` (output_correction's
    ``calibration_ppl_clean`` / ``_noisy_before`` / ``_noisy_after``), also one level down as
    ``outer.key`` (the digital budget's ``scan.clean_ppl``)."""
    flat = {k: v for k, v in report.items() if not isinstance(v, dict)}
    for outer, inner in report.items():
        if isinstance(inner, dict):
            flat.update({f"{outer}.{k}": v for k, v in inner.items()})
    return {k: float(v) for k, v in flat.items() if "ppl" in k and isinstance(v, int | float)}


def _fallback_summary(step: str, report: dict[str, Any]) -> str:
    """What a step did, for a report that records no ``summary`` (bundles written before summaries)."""
    if report.get("skipped"):
        return str(report["skipped"])
    return f"{step}: no summary recorded (measurements in manifest.json extra.method_report)"


def step_outcomes(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per recipe step: index, step, seed, ``summary`` (what it did and why), ``measured_ppl``
    (perplexities its calibration measured; empty when it measured none) and ``warnings``."""
    steps = manifest.recipe.steps if manifest.recipe is not None else []
    reports = manifest.extra.get("method_report") or {}
    outcomes = []
    for index, step in enumerate(steps, 1):
        report = reports.get(f"{index}:{step.step}") or {}
        outcomes.append({
            "index": index,
            "step": step.step,
            "seed": step.seed,
            "summary": report.get("summary") or _fallback_summary(step.step, report),
            "measured_ppl": _measured_ppl(report),
            "warnings": [str(w) for w in report.get("warnings") or []],
        })  # fmt: skip
    return outcomes


def _method_rows(manifest: Manifest) -> list[str]:
    """The recipe's steps: what each did, the perplexities it measured, its warnings, then the scalar
    figures of its report and a table for each report key it lists under ``tables``."""
    outcomes = step_outcomes(manifest)
    if not outcomes:
        return []
    reports = manifest.extra.get("method_report") or {}
    lines = ["", "## Recipe", ""]
    for outcome in outcomes:
        head = f"{outcome['index']}. `{outcome['step']}` (seed {outcome['seed']})"
        lines.append(f"{head}: {outcome['summary']}")
        if outcome["measured_ppl"]:
            measured = ", ".join(f"{k} {v:.2f}" for k, v in outcome["measured_ppl"].items())
            lines.append(f"   - measured perplexity: {measured}")
        lines += [f"   - **warning**: {w}" for w in outcome["warnings"]]
        report = reports.get(f"{outcome['index']}:{outcome['step']}") or {}
        shown = _NOT_DETAILS | set(outcome["measured_ppl"])
        scalars = {k: v for k, v in report.items() if isinstance(v, int | float | str) and k not in shown}
        lines += [f"   - {k}: {v}" for k, v in scalars.items()]
        for key in report.get("tables") or []:
            lines += _table(key, list(report.get(key) or []))
    return lines


def _warnings(manifest: Manifest) -> list[str]:
    outcomes = step_outcomes(manifest)
    warnings = [f"step {o['index']} `{o['step']}`: {w}" for o in outcomes for w in o["warnings"]]
    if not warnings:
        return []
    return ["", "## Warnings", "", *[f"- {w}" for w in warnings]]


# ------------------------------------------------------------------ deployment figures
def _count(value: float) -> str:
    """A per-token count: whole numbers with thousands separators, fractions with one decimal."""
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def _scaled(value: float, units: tuple[tuple[str, float], ...]) -> str:
    """``value`` in the largest unit of ``units`` (name, factor; smallest first) that keeps it >= 1."""
    name, factor = units[0]
    for unit, scale in units:
        if abs(value) >= scale:
            name, factor = unit, scale
    return f"{value / factor:,.3g} {name}"


_ENERGY = (("pJ", 1.0), ("nJ", 1e3), ("µJ", 1e6), ("mJ", 1e9), ("J", 1e12))
_TIME = (("ns", 1.0), ("µs", 1e3), ("ms", 1e6), ("s", 1e9))


def _deployment_rows(figures: dict[str, Any]) -> list[str]:
    arrays, per_token = figures["arrays"], figures["per_token"]
    utilisation = arrays["utilisation"]
    used = f"{100 * utilisation:.1f} %" if utilisation is not None else "n/a (no analog tiles)"
    lines = [
        "", "## Deployment", "",
        f"- arrays used: {arrays['tiles']} tiles of {arrays['tile_rows']}×{arrays['tile_cols']}; "
        f"{arrays['weights_stored']:,} weights stored in {arrays['capacity']:,} cells: utilisation {used}",
        f"- per token: {_count(per_token['analog_macs'])} analog MACs in {_count(per_token['tile_reads'])} "
        f"tile reads, {_count(per_token['adc_conversions'])} ADC and {_count(per_token['dac_conversions'])} "
        f"DAC conversions; {_count(per_token['digital_macs'])} digital MACs",
        f"- not counted: {figures['not_counted']}",
        "", "| digital MACs/token from | MACs |", "|---|---:|",
        *[f"| {source} | {_count(macs)} |" for source, macs in figures["digital_macs_by_source"].items()],
    ]  # fmt: skip
    if figures["transforms"]:
        lines += ["", "| transform | entries | targets | digital overhead (MACs/token) |",
                  "|---|---:|---:|---:|"]  # fmt: skip
        lines += [f"| {t['type']} | {t['entries']} | {t['targets']} | {_count(t['digital_macs_per_token'])} |"
                  for t in figures["transforms"]]  # fmt: skip
    return lines


def _energy_row(part: str, component: dict[str, Any]) -> str:
    if component["status"] == "included in analog":
        return f"| energy: {part} | included in the analog figure |"
    if component["pj"] is None:
        return f"| energy: {part} | {_UNKNOWN} |"
    return f"| energy: {part} | {_scaled(component['pj'], _ENERGY)} |"


def _estimate_rows(figures: dict[str, Any], profile: str) -> list[str]:
    estimate = figures["estimate"]
    energy = estimate["energy_per_token"]
    total = energy["total_pj"]
    latency, area = estimate["analog_latency_ns_per_token_serial"], estimate["array_area_mm2"]
    lines = [
        "", f"## Cost estimate (profile `{profile}`)", "",
        "| quantity | estimate |", "|---|---|",
        *[_energy_row(part, c) for part, c in energy["components"].items()],
        f"| energy per token: total | {_scaled(total, _ENERGY) if total is not None else _PARTIAL} |",
        f"| analog time per token, tile reads one after another | "
        f"{_scaled(latency, _TIME) if latency is not None else _UNKNOWN} |",
        f"| array area | {f'{area:,.3g} mm²' if area is not None else _UNKNOWN} |",
        "", "Figures used (the profile's `costs`):", "",
    ]  # fmt: skip
    for name, meaning in COST_FIELDS.items():
        figure = figures["costs"][name]
        if figure is None:
            lines.append(f"- {meaning}: unknown")
            continue
        note = f"; {figure['note']}" if figure["note"] else ""
        lines.append(f"- {meaning}: {figure['value']:g} (source: {figure['source']}{note})")
    if figures["costs"]["converters_in_analog_energy"]:
        lines.append("- the analog energy figure includes the DAC/ADC conversions (not priced again)")
    return lines


# ------------------------------------------------------------------ the page
def render_report(manifest: Manifest, deployment: dict[str, Any] | None = None) -> str:
    """Markdown report: source, profile, totals, tensors by kind, warnings, deployment figures and cost
    estimate (``deployment``: :func:`cimconvert.bundle.costs.deployment_figures`; omitted when None),
    what each recipe step did, transforms, seeds."""
    t = manifest.totals
    p = manifest.profile.profile
    mapping = p.get("mapping", {})
    lines = [
        f"# cimconvert bundle: {manifest.source.model} → {manifest.profile.name}",
        "",
        f"- created: {manifest.created} by {manifest.producer.name} {manifest.producer.version}",
        f"- source: `{manifest.source.model}` (model_type `{manifest.source.model_type}`"
        + (f", revision `{manifest.source.revision}`)" if manifest.source.revision else ")"),
        f"- profile: `{manifest.profile.name}` ({manifest.profile.content_hash})",
        f"- tiles: {mapping.get('tile_rows')}×{mapping.get('tile_cols')}, scale granularity "
        f"{mapping.get('scale')}, g_max {mapping.get('g_max')} µS",
        f"- tensor counts: {TENSOR_COUNT}",
        "",
        "## Totals",
        "",
        f"- tensors: {t.tensors} ({t.analog_tensors} analog, {t.digital_tensors} digital)",
        f"- analog: {human_bytes(t.analog_bytes)} in {t.analog_tiles} crossbar tiles, "
        f"{t.analog_shards} shard(s)",
        f"- digital: {human_bytes(t.digital_bytes)} in {t.digital_shards} shard(s)",
        *_warnings(manifest),
        "",
        "## Tensors by kind",
        "",
        *_kind_rows(manifest),
    ]
    if deployment is not None:
        lines += _deployment_rows(deployment) + _estimate_rows(deployment, manifest.profile.name)
    lines += _method_rows(manifest)
    lines += ["", "## Transforms", ""]
    if manifest.transforms:
        for x in manifest.transforms:
            keys = ", ".join(sorted(x.params)) or "none"
            lines.append(f"- `{x.id}`: {x.type} on {len(x.targets)} target(s); params: {keys}")
    else:
        lines.append("none (plain conversion)")
    if manifest.seeds:
        lines += ["", "## Seeds", "", *[f"- {k}: {v}" for k, v in sorted(manifest.seeds.items())]]
    lines += ["", "Checksums of every file are in `manifest.json`; verify with `cimconvert inspect`.", ""]
    return "\n".join(lines)
