"""The ``quantization_config`` in a bundle's config.json: written from the manifest, read back against it.

transformers looks at ``config.json["quantization_config"]["quant_method"]`` to pick the quantizer that
loads a model folder. A bundle names ``cimconvert`` there, so ``from_pretrained`` runs cimconvert's
registered quantizer (:mod:`cimconvert.hf_quantizer`), which re-applies the manifest's transforms exactly
as ``load_bundle`` does. The manifest stays the single source of truth: :func:`quantization_config`
derives the whole entry from it (format version, producer version, profile name and hash, placement
groups with in-memory targets, recipe, transforms), the writer stores exactly that, and
:func:`check_against_manifest` refuses a config.json whose entry differs from what the manifest gives.

Placement targets here are **in-memory parameter names** (fused experts included, e.g.
``model.layers.0.mlp.experts.gate_up_proj``), so matchers that walk ``model.named_parameters()`` (the
compressed-tensors convention) find them; ``manifest.placement_config`` keeps the on-disk keys
(per-expert ``...experts.3.gate_proj.weight``). The architecture adapter's ``memory_name`` maps one to the
other (docs/BUNDLE.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cimconvert import __version__
from cimconvert.arch import get_adapter
from cimconvert.arch.loading import BUNDLE_QUANT_METHOD, BUNDLE_WEIGHTS_GUARD
from cimconvert.bundle.manifest import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, Manifest, compact_targets
from cimconvert.checkpoint import CONFIG_NAME
from cimconvert.errors import BundleError

#: The bundle format version this cimconvert reads and writes (the manifest's ``schema_version``).
FORMAT_VERSION = MANIFEST_SCHEMA_VERSION
UNITS = ("analog", "digital")


def check_format_version(version: Any, where: str) -> None:
    """BundleError (one line, with both versions) unless ``version`` is a format version this cimconvert
    reads; ``where`` names what carried it (e.g. ``config.json quantization_config``)."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BundleError(f"{where}: format version {version!r} is not a valid bundle format version")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{where}: bundle format version {version} is newer than this cimconvert {__version__} "
            f"supports (up to {FORMAT_VERSION}); upgrade cimconvert to load it"
        )


def memory_targets(manifest: Manifest) -> dict[str, list[str]]:
    """Unit → the in-memory parameter names its tensors load into (per-expert keys → the fused tensor)."""
    adapter = get_adapter(manifest.source.model_type)
    names: dict[str, set[str]] = {unit: set() for unit in UNITS}
    for tensor in manifest.tensors:
        names[tensor.unit].add(adapter.memory_name(tensor.name))
    return {unit: sorted(members) for unit, members in names.items()}


def _config_groups(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The manifest's placement groups with their targets rewritten to in-memory names."""
    memory = memory_targets(manifest)
    groups: dict[str, dict[str, Any]] = {}
    for unit, group in manifest.placement_config.config_groups.items():
        other = memory["digital" if unit == "analog" else "analog"]
        groups[unit] = {
            "unit": group.unit,
            "targets": compact_targets(memory[group.unit], other),
            "kinds": list(group.kinds),
            "params": group.params.model_dump(mode="json"),
        }
    return groups


def quantization_config(manifest: Manifest) -> dict[str, Any]:
    """The ``quantization_config`` entry of a bundle's config.json, derived from its manifest alone."""
    groups = _config_groups(manifest)
    return {
        "quant_method": BUNDLE_QUANT_METHOD,
        "format": manifest.format,
        "format_version": manifest.schema_version,
        "cimconvert_version": manifest.producer.version,
        "manifest": MANIFEST_NAME,
        "profile": {"name": manifest.profile.name, "content_hash": manifest.profile.content_hash},
        "config_groups": groups,
        "ignore": list(groups.get("digital", {}).get("targets", [])),
        "recipe": None if manifest.recipe is None else manifest.recipe.model_dump(mode="json"),
        "transforms": [{"id": t.id, "type": t.type, "targets": list(t.targets)} for t in manifest.transforms],
    }


def _normalised(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples → lists, key order ignored by comparison)."""
    return json.loads(json.dumps(value, sort_keys=True))


def check_against_manifest(config: dict[str, Any], manifest: Manifest) -> None:
    """BundleError unless ``config`` (a bundle's quantization_config) is what its manifest gives."""
    expected = _normalised(quantization_config(manifest))
    given = _normalised(config)
    differing = sorted(k for k in expected.keys() | given.keys() if expected.get(k) != given.get(k))
    if differing:
        raise BundleError(
            f"config.json quantization_config does not match {MANIFEST_NAME} (field '{differing[0]}'); "
            "the manifest is the source of truth: convert the model again"
        )


def write_hf_config(folder: Path, manifest: Manifest) -> None:
    """Add the manifest's ``quantization_config`` and the weights guard to ``folder/config.json``."""
    path = Path(folder) / CONFIG_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"cannot read {path}: {exc}") from None
    data["quantization_config"] = quantization_config(manifest)
    data["transformers_weights"] = BUNDLE_WEIGHTS_GUARD
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
