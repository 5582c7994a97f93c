"""The bundle manifest (``manifest.json``): pydantic models, JSON Schema export, target patterns.

The shape follows compressed-tensors' ``quantization_config``: ``placement_config.config_groups`` holds
one group per unit (``analog``, ``digital``) with ``targets`` (exact names or ``re:`` regexes) and the
per-unit parameters; ``ignore`` lists what stays digital. Next to it, ``tensors`` is the resolved
per-tensor list (unit, shard, shape, dtype, tiles, scales, checksum) so consumers need no regex engine.
``transforms`` records model rewrites (ROMER, HPD, ...) that a loader must re-apply. Documented for
deployment-toolchain authors in docs/BUNDLE.md; the JSON Schema lives in
``cimconvert/schemas/manifest.schema.json`` (regenerate with :func:`write_schema`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cimconvert.placement import TensorInfo

MANIFEST_SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "schemas" / "manifest.schema.json"

Unit = Literal["analog", "digital"]


class Entry(BaseModel):
    """Base for manifest sections: unknown keys are errors (a newer schema must bump the version)."""

    model_config = ConfigDict(extra="forbid")


class FileEntry(Entry):
    """A file with its size and sha256 (lower-case hex)."""

    name: str = Field(description="path relative to the bundle (or source) folder")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Producer(Entry):
    """The tool that wrote the bundle and the library versions it ran with."""

    name: str = "cimconvert"
    version: str
    torch: str | None = None
    transformers: str | None = None
    safetensors: str | None = None


class SourceInfo(Entry):
    """The converted checkpoint: what the user passed, where it was read, and every input file's hash."""

    model: str = Field(description="model id or path as given by the user")
    path: str = Field(description="resolved folder the checkpoint was read from")
    revision: str | None = Field(default=None, description="hub commit (from the local cache), if known")
    model_type: str
    files: list[FileEntry]
    gguf: dict[str, Any] | None = Field(
        default=None,
        description="when the checkpoint was dequantised from a GGUF file: its name, sha256, bytes, "
        "architecture, general.file_type, tensor quantisation types (count per type) and the dtype "
        "it was dequantised to",
    )


class ProfileInfo(Entry):
    """The chip profile the bundle targets: name, content hash and the full resolved profile."""

    name: str
    content_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$")
    profile: dict[str, Any] = Field(description="the full profile (ChipProfile.model_dump(mode='json'))")


class UnitParams(Entry):
    """Per-unit parameters of a placement group (null for the digital unit's analog-only fields)."""

    tile_rows: int | None = Field(default=None, description="crossbar rows (inputs) per tile")
    tile_cols: int | None = Field(default=None, description="crossbar columns (outputs) per tile")
    g_max: float | None = Field(default=None, description="µS, conductance of the largest |weight|")
    g_min: float | None = Field(default=None, description="µS, conductance of a zero weight")
    differential: bool | None = None
    levels: int | None = Field(default=None, description="programmable conductance levels (null: continuous)")
    scale_granularity: Literal["channel", "tile", "tensor"] | None = None
    programming_noise: str | None = None
    drift: str | None = None
    read_noise: str | None = None
    dac_bits: int | None = None
    adc_bits: int | None = None
    out_bound: float | None = None
    dtype: str | None = Field(default=None, description="digital unit: stored dtype(s), comma-separated")


class PlacementGroup(Entry):
    """One group of ``placement_config.config_groups``: the tensors of one unit and its parameters."""

    unit: Unit
    targets: list[str] = Field(description="exact tensor names or 're:'-prefixed full-match regexes")
    kinds: list[str] = Field(description="tensor kinds present in the group")
    params: UnitParams


class Overrides(Entry):
    """The user's ``--analog``/``--digital`` patterns (plus a method's, e.g. HPD's split factors) that
    shaped the placement; informational: the placement itself is ``tensors[].unit``."""

    analog: list[str] = Field(default_factory=list)
    digital: list[str] = Field(default_factory=list)


class PlacementConfig(Entry):
    """compressed-tensors-style placement: groups with targets plus ``ignore`` (kept digital)."""

    format: Literal["cim-placement"] = "cim-placement"
    version: int = MANIFEST_SCHEMA_VERSION
    config_groups: dict[str, PlacementGroup]
    ignore: list[str] = Field(description="targets kept on the digital unit (same syntax as targets)")
    overrides: Overrides = Field(
        default_factory=Overrides, description="--analog/--digital patterns that shaped the placement"
    )


class TileGridEntry(Entry):
    """Tile split of an analog matrix: inputs per tile-row, outputs per tile-column, matrices (experts)."""

    in_sizes: list[int]
    out_sizes: list[int]
    n_matrices: int = 1


class TensorEntry(Entry):
    """One stored tensor, fully resolved (on-disk name, as in ``model.safetensors.index.json``).

    ``unit`` is the bundle's placement: every consumer reads it back (``placement_from_manifest``).
    """

    name: str
    unit: Unit = Field(description="where the tensor runs; consumers read it back, never re-derive it")
    kind: str
    shard: str = Field(description="bundle file holding the tensor")
    shape: list[int]
    dtype: str = Field(description="safetensors dtype string (F32, BF16, ...)")
    layout: Literal["out_in", "in_out", "none"]
    tile_grid: TileGridEntry | None = None
    tiles: int = Field(default=0, ge=0, description="crossbar tiles the tensor occupies (0: digital)")
    scales_key: str | None = Field(default=None, description="key in the scales file (analog tensors)")
    scales_shape: list[int] | None = Field(default=None, description="[..., out, n_in_tiles] abs-max scales")
    nbytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of the stored tensor bytes")
    transform: str | None = Field(default=None, description="id of the transform that produced it")

    def placement_info(self, memory_name: str = "") -> TensorInfo:
        """The :class:`~cimconvert.placement.TensorInfo` of this entry (``memory_name``: the in-memory
        parameter it loads into, when known)."""
        grid = (len(self.tile_grid.in_sizes), len(self.tile_grid.out_sizes)) if self.tile_grid else (0, 0)
        return TensorInfo(name=self.name, kind=self.kind, shape=tuple(self.shape),  # type: ignore[arg-type]
                          layout=self.layout, unit=self.unit, module=self.name.rpartition(".")[0],
                          nbytes=self.nbytes, dtype=self.dtype, tiles=self.tiles, tile_grid=grid,
                          memory_name=memory_name, reason="manifest")  # fmt: skip


class TransformEntry(Entry):
    """A model rewrite applied during conversion (re-applied on load by ``TRANSFORM_LOADERS``)."""

    id: str
    type: str
    params: dict[str, Any] = Field(default_factory=dict)
    targets: list[str] = Field(default_factory=list)


RECIPE_SCHEMA_VERSION = 1


class RecipeStep(Entry):
    """One step of a recipe: a registered method (or placement step), its options and its seed."""

    step: str = Field(description="registered method name (romer, hpd, keep_digital, ...)")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's options (in a manifest: "
                                    "every option, defaults filled in)")  # fmt: skip
    seed: int | None = Field(default=None, description="the step's seed (null: the conversion's --seed; in a "
                             "manifest: always resolved)")  # fmt: skip


class Recipe(Entry):
    """A conversion as an ordered list of steps (docs/RECIPES.md); ``family`` / ``model_type`` name the
    architecture it was made for (checked against the model when present)."""

    schema_version: Literal[1] = RECIPE_SCHEMA_VERSION
    family: str | None = Field(default=None, description="model family (moe, ssm, dense) it was made for")
    model_type: str | None = Field(default=None, description="HF model_type it was made for")
    steps: list[RecipeStep] = Field(default_factory=list, description="run in order on the same model")


class Totals(Entry):
    """Counts and sizes over the whole bundle."""

    tensors: int
    analog_tensors: int
    digital_tensors: int
    analog_bytes: int
    digital_bytes: int
    analog_tiles: int
    analog_shards: int
    digital_shards: int
    total_bytes: int = Field(description="sum of the tensor bytes (index metadata.total_size)")
    placement: dict[str, Any] = Field(default_factory=dict, description="placement totals as planned")


class Manifest(Entry):
    """``manifest.json`` of a cimconvert bundle."""

    schema_version: Literal[1] = MANIFEST_SCHEMA_VERSION
    format: Literal["cimconvert-bundle"] = "cimconvert-bundle"
    producer: Producer
    created: str = Field(description="UTC ISO-8601 time the bundle was written")
    source: SourceInfo
    profile: ProfileInfo
    placement_config: PlacementConfig
    scales_file: str | None = Field(default=None, description="safetensors file of the analog scales")
    tensors: list[TensorEntry]
    recipe: Recipe | None = Field(
        default=None,
        description="the recipe the conversion ran (absent in bundles written before recipes existed)",
    )
    transforms: list[TransformEntry] = Field(default_factory=list)
    seeds: dict[str, int | list[int]] = Field(default_factory=dict)
    extra: dict[str, Any] = Field(default_factory=dict)
    files: list[FileEntry] = Field(description="every bundle file except manifest.json")
    totals: Totals

    def analog_names(self) -> list[str]:
        """Names of the tensors placed on analog units."""
        return [t.name for t in self.tensors if t.unit == "analog"]


# ---------------------------------------------------------------- JSON Schema
def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``manifest.json``."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://cimconvert.invalid/schemas/manifest.schema.json"
    return schema


def schema_text() -> str:
    """The JSON Schema as the committed file holds it (indented, trailing newline)."""
    return json.dumps(manifest_json_schema(), indent=2, ensure_ascii=False) + "\n"


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the JSON Schema file (run after changing the models; a test checks it is current)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(schema_text(), encoding="utf-8")
    return path


# ---------------------------------------------------------------- targets
_INDEX = re.compile(r"\.\d+(?=\.|$)")


def _pattern(name: str) -> str:
    """Full-match regex of a name with every numeric component generalised (layers, experts)."""
    parts = _INDEX.split(name)
    return r"\.\d+".join(re.escape(p) for p in parts)


def compact_targets(names: list[str], others: list[str]) -> list[str]:
    """Targets covering exactly ``names``: ``re:`` patterns with numeric components generalised where
    they match none of ``others``, exact names otherwise (compressed-tensors target syntax)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_pattern(name), []).append(name)
    other_set = set(others)
    targets: list[str] = []
    for pattern, members in groups.items():
        regex = re.compile(pattern)
        if len(members) == 1 or any(regex.fullmatch(o) for o in other_set):
            targets.extend(members)
        else:
            targets.append("re:" + pattern)
    return targets


def match_target(target: str, name: str) -> bool:
    """Whether a target (exact name or ``re:`` full-match regex) selects ``name``."""
    if target.startswith("re:"):
        return re.fullmatch(target[3:], name) is not None
    return target == name
