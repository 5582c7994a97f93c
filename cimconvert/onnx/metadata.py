"""``metadata_props`` of an exported graph: producer, model, profile and the analog placement.

Keys are prefixed ``cimconvert.``; values are strings (JSON for structured values). Readers use
:func:`read_metadata`; docs/ANALOG_OP.md lists the keys.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from onnx import ModelProto

from cimconvert import __version__
from cimconvert.profiles.schema import ChipProfile

PREFIX = "cimconvert."
FORMAT_VERSION = "1"


def _versions() -> dict[str, str]:
    import onnx
    import torch
    import transformers

    return {"cimconvert": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "onnx": onnx.__version__}  # fmt: skip


def _manifest_fields(manifest: Any) -> dict[str, str]:
    """Key manifest fields (source model, transforms, seeds) when a manifest is given."""
    if manifest is None:
        return {}
    return {
        "source_model": str(manifest.source.model),
        "bundle_created": str(manifest.created),
        "transforms": json.dumps([{"id": t.id, "type": t.type} for t in manifest.transforms]),
        "seeds": json.dumps(dict(manifest.seeds)),
        "method": str((manifest.extra or {}).get("method", "none")),
        "recipe": json.dumps(None if manifest.recipe is None else manifest.recipe.model_dump(mode="json")),
    }


def build_metadata(
    model: Any,
    profile: ChipProfile,
    specs: Mapping[str, Sequence[Any]],
    weight_only: Sequence[str],
    manifest: Any = None,
) -> dict[str, str]:
    """The metadata_props (without prefix) of an export of ``model`` for ``profile``."""
    analog = [
        {"tensor": name, "layout": s[0].layout, "kind": s[0].kind, "matrices": len(s)}
        for name, s in specs.items()
    ]
    return {
        "format_version": FORMAT_VERSION,
        "model_type": str(model.config.model_type),
        "profile": profile.name,
        "profile_hash": profile.content_hash(),
        "tile": json.dumps([profile.mapping.tile_rows, profile.mapping.tile_cols]),
        "mvm": json.dumps(profile.mvm.model_dump(mode="json")),
        "analog_domain": "ai.cimconvert",
        "analog_tensors": json.dumps(analog),
        "weight_only": json.dumps(list(weight_only)),
        "inputs": "input_ids,attention_mask",
        "outputs": "logits",
        "versions": json.dumps(_versions()),
        **_manifest_fields(manifest),
    }


def set_metadata(model: ModelProto, values: Mapping[str, str]) -> None:
    """Replace the ``cimconvert.*`` metadata_props of ``model`` by ``values`` (keys get the prefix)."""
    kept = [(p.key, p.value) for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for key, value in [*kept, *((PREFIX + k, str(v)) for k, v in values.items())]:
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value


def read_metadata(model: ModelProto | Mapping[str, str]) -> dict[str, str]:
    """The ``cimconvert.*`` metadata (prefix stripped) of a ModelProto or of a session's custom map."""
    items = model.items() if isinstance(model, Mapping) else ((p.key, p.value) for p in model.metadata_props)
    return {k[len(PREFIX) :]: v for k, v in items if k.startswith(PREFIX)}
