"""REPORT.md: a human-readable summary of a bundle, rendered from its manifest."""

from __future__ import annotations

from collections import defaultdict

from cimconvert.bundle.manifest import Manifest
from cimconvert.placement import human_bytes


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


def _method_rows(manifest: Manifest) -> list[str]:
    """The recipe's steps and the scalar figures of each step's report (e.g. HPD's digital overhead), plus
    a table for each report key a step lists under ``tables`` (e.g. the digital budget's choice)."""
    steps = manifest.recipe.steps if manifest.recipe is not None else []
    if not steps:
        return []
    reports = manifest.extra.get("method_report") or {}
    lines = ["", "## Recipe", ""]
    for index, step in enumerate(steps, 1):
        lines.append(f"{index}. `{step.step}` (seed {step.seed})")
        report = reports.get(f"{index}:{step.step}") or {}
        scalars = {k: v for k, v in report.items() if isinstance(v, int | float | str) and k != "method"}
        lines += [f"   - {k}: {v}" for k, v in scalars.items()]
        for key in report.get("tables") or []:
            lines += _table(key, list(report.get(key) or []))
    return lines


def render_report(manifest: Manifest) -> str:
    """Markdown report: source, profile, totals, a table per tensor kind, transforms, seeds."""
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
        "",
        "## Totals",
        "",
        f"- tensors: {t.tensors} ({t.analog_tensors} analog, {t.digital_tensors} digital)",
        f"- analog: {human_bytes(t.analog_bytes)} in {t.analog_tiles} crossbar tiles, "
        f"{t.analog_shards} shard(s)",
        f"- digital: {human_bytes(t.digital_bytes)} in {t.digital_shards} shard(s)",
        "",
        "## Tensors by kind",
        "",
        *_kind_rows(manifest),
        "",
        "## Transforms",
        "",
    ]
    if manifest.transforms:
        for x in manifest.transforms:
            keys = ", ".join(sorted(x.params)) or "none"
            lines.append(f"- `{x.id}`: {x.type} on {len(x.targets)} target(s); params: {keys}")
    else:
        lines.append("none (plain conversion)")
    lines += _method_rows(manifest)
    if manifest.seeds:
        lines += ["", "## Seeds", "", *[f"- {k}: {v}" for k, v in sorted(manifest.seeds.items())]]
    lines += ["", "Checksums of every file are in `manifest.json`; verify with `cimconvert inspect`.", ""]
    return "\n".join(lines)
