"""Analog/digital placement: which tensors go onto crossbar tiles and how many tiles each needs.

Decision per tensor (first rule that applies):

1. kinds that are not matmuls (embedding, norm, bias, conv, ssm_param, other) are always digital;
2. a ``--digital`` pattern that matches → digital (digital wins over analog, like compressed-tensors'
   ``ignore``);
3. an ``--analog`` pattern that matches → analog;
4. the profile default: matmul kinds listed in ``profile.placement.digital`` stay digital, the rest
   (attention, mlp, expert, shared_expert, ssm projections, ...) are analog.

Override patterns: ``re:REGEX`` is a regular expression; any other pattern is first compared exactly,
then used as a regex with ``re.fullmatch``. A pattern is matched against the tensor name, its module
path, and (for on-disk keys) the in-memory name it loads into and that name's module — so
``model.layers.0.mlp.experts`` selects the fused tensors in memory and every per-expert key on disk.
A pattern that matches no tensor is an error (typo protection). Forcing a digital-only tensor analog is
an error when named exactly; a regex simply skips digital-only tensors, but is an error if it matches
nothing else.

Tiles follow aihwkit: a matrix ``[out, in]`` is split into ``ceil(in / tile_rows)`` near-equal chunks
along the inputs and ``ceil(out / tile_cols)`` along the outputs; a fused 3-D experts tensor
``[E, out, in]`` needs that grid once per expert.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import torch

from cimconvert.arch import ArchAdapter, Layout, get_adapter
from cimconvert.arch.base import SPLIT_FACTOR
from cimconvert.checkpoint import DTYPES
from cimconvert.errors import ModelInputError
from cimconvert.profiles.schema import MATMUL_KINDS, ChipProfile, TensorKind
from cimconvert.simulator.tiles import split_sizes

if TYPE_CHECKING:
    from torch import nn

Unit = Literal["analog", "digital"]


@dataclass(frozen=True)
class TensorInfo:
    """Placement of one tensor (an in-memory parameter or an on-disk safetensors key).

    ``layout``: ``out_in`` (nn.Linear, fused experts ``[E, out, in]``), ``in_out`` (GPT-2 Conv1D) or
    ``none``. ``tile_grid``: tiles along (in, out) per matrix; ``tiles``: total tiles (× E for 3-D);
    both are 0 for digital tensors. ``memory_name``: the in-memory parameter the tensor loads into
    (differs from ``name`` for per-expert and legacy on-disk keys). ``aliases``: other names of a tied
    parameter. ``reason``: why the tensor got its unit.
    """

    name: str
    kind: TensorKind
    shape: tuple[int, ...]
    layout: Layout
    unit: Unit
    module: str
    nbytes: int
    dtype: str
    tiles: int = 0
    tile_grid: tuple[int, int] = (0, 0)
    memory_name: str = ""
    aliases: tuple[str, ...] = ()
    reason: str = ""

    @property
    def params(self) -> int:
        """Number of elements."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def matrix_shape(self) -> tuple[int, int] | None:
        """``(out, in)`` of one matrix (per expert for 3-D tensors); None when not a matmul weight."""
        if self.layout == "in_out":
            return self.shape[1], self.shape[0]
        if self.layout == "out_in":
            return self.shape[-2], self.shape[-1]
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["tile_grid"] = list(self.tile_grid)
        data["aliases"] = list(self.aliases)
        return data


@dataclass(frozen=True)
class Placement:
    """The placement of every tensor of a model, plus what shaped it (profile, tile size, overrides)."""

    tensors: tuple[TensorInfo, ...]
    profile: str
    tile_rows: int
    tile_cols: int
    overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)

    @classmethod
    def of(
        cls, tensors: Iterable[TensorInfo], profile: ChipProfile, overrides: Mapping[str, Sequence[str]]
    ) -> Placement:
        """The placement of ``tensors`` for ``profile`` (its name and tile size), shaped by ``overrides``."""
        return cls(
            tensors=tuple(tensors),
            profile=profile.name,
            tile_rows=profile.mapping.tile_rows,
            tile_cols=profile.mapping.tile_cols,
            overrides={unit: tuple(patterns) for unit, patterns in overrides.items()},
        )

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def get(self, name: str) -> TensorInfo:
        """The entry of one tensor by name or alias (KeyError when absent)."""
        for info in self.tensors:
            if info.name == name or name in info.aliases:
                return info
        raise KeyError(name)

    def analog(self) -> list[TensorInfo]:
        """The tensors placed on analog tiles."""
        return [t for t in self.tensors if t.unit == "analog"]

    def digital(self) -> list[TensorInfo]:
        """The tensors kept on the digital unit."""
        return [t for t in self.tensors if t.unit == "digital"]

    def totals(self) -> dict[str, Any]:
        """Counts and sizes: tensors per unit, analog tiles (crossbar arrays) needed, params, bytes."""
        analog, digital = self.analog(), self.digital()
        by_kind: dict[str, dict[str, int]] = {}
        for info in self.tensors:
            entry = by_kind.setdefault(info.kind, {"analog": 0, "digital": 0, "params": 0})
            entry[info.unit] += 1
            entry["params"] += info.params
        return {
            "tensors": len(self.tensors),
            "analog_tensors": len(analog),
            "digital_tensors": len(digital),
            "analog_tiles": sum(t.tiles for t in analog),
            "analog_params": sum(t.params for t in analog),
            "digital_params": sum(t.params for t in digital),
            "analog_bytes": sum(t.nbytes for t in analog),
            "digital_bytes": sum(t.nbytes for t in digital),
            "tile_rows": self.tile_rows,
            "tile_cols": self.tile_cols,
            "by_kind": dict(sorted(by_kind.items())),
        }

    def table(self) -> list[dict[str, Any]]:
        """Rows for a dry-run printout: tensor, unit, kind, shape, tiles, bytes."""
        return [
            {
                "tensor": t.name,
                "unit": t.unit,
                "kind": t.kind,
                "shape": list(t.shape),
                "tiles": t.tiles,
                "bytes": t.nbytes,
            }
            for t in self.tensors
        ]

    def format_table(self) -> str:
        """The table as aligned text, followed by a totals line."""
        header = ("tensor", "unit", "kind", "shape", "tiles", "bytes")
        rows = [
            (
                r["tensor"],
                r["unit"],
                r["kind"],
                "x".join(map(str, r["shape"])),
                str(r["tiles"]),
                human_bytes(r["bytes"]),
            )
            for r in self.table()
        ]
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
        lines = [
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in [header, *rows]
        ]
        tot = self.totals()
        lines.append(
            f"analog: {tot['analog_tensors']} tensors, {tot['analog_params']:,} params, "
            f"{tot['analog_tiles']} tiles of {self.tile_rows}x{self.tile_cols}; "
            f"digital: {tot['digital_tensors']} tensors, {human_bytes(tot['digital_bytes'])}"
        )
        return "\n".join(lines)

    def to_json(self) -> list[dict[str, Any]]:
        """JSON-ready list of every tensor's placement."""
        return [t.to_dict() for t in self.tensors]


# ------------------------------------------------------------------ overrides
@dataclass
class _Pattern:
    """One ``--analog``/``--digital`` pattern and what it matched."""

    text: str
    unit: Unit
    exact: str | None
    regex: re.Pattern[str] | None
    hits: int = 0
    skipped: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, unit: Unit) -> _Pattern:
        """Compile ``re:REGEX`` or a plain pattern (exact name, else regex)."""
        source = text[3:] if text.startswith("re:") else text
        try:
            regex = re.compile(source)
        except re.error as exc:
            if text.startswith("re:"):
                raise ModelInputError(f"--{unit} '{text}': invalid regular expression ({exc})") from None
            regex = None
        return cls(text, unit, None if text.startswith("re:") else text, regex)

    def match(self, candidates: tuple[str, ...]) -> Literal["exact", "regex", None]:
        """How the pattern matches any of a tensor's candidate names."""
        if self.exact is not None and self.exact in candidates:
            return "exact"
        if self.regex is not None and any(self.regex.fullmatch(c) for c in candidates):
            return "regex"
        return None


def _parse_patterns(analog: Iterable[str], digital: Iterable[str]) -> tuple[list[_Pattern], list[_Pattern]]:
    return [_Pattern.parse(p, "analog") for p in analog], [_Pattern.parse(p, "digital") for p in digital]


def _check_patterns(patterns: Iterable[_Pattern]) -> None:
    """Every pattern must have placed at least one tensor."""
    for pattern in patterns:
        if pattern.hits:
            continue
        if pattern.skipped:
            raise ModelInputError(
                f"--analog '{pattern.text}' matches only digital-only tensors (e.g. {pattern.skipped[0]})"
            )
        raise ModelInputError(f"--{pattern.unit} '{pattern.text}' matches no tensor of the model")


def _candidates(name: str, memory_name: str, aliases: tuple[str, ...]) -> tuple[str, ...]:
    names = dict.fromkeys((name, memory_name, *aliases))
    modules = [n.rpartition(".")[0] for n in names]
    split = SPLIT_FACTOR.match(name)  # a pattern naming a split layer (HPD) selects its analog factor
    owner = [split.group(1)] if split is not None and split.group(2) == "analog" else []
    return tuple(dict.fromkeys([*names, *(m for m in modules if m), *owner]))


def _decide(
    name: str,
    kind: TensorKind,
    candidates: tuple[str, ...],
    profile: ChipProfile,
    analog: list[_Pattern],
    digital: list[_Pattern],
) -> tuple[Unit, str]:
    """Unit and reason for one tensor (see the module docstring for the order of the rules)."""
    is_matmul = kind in MATMUL_KINDS
    digital_hits = [p for p in digital if p.match(candidates)]
    analog_hits = [(p, how) for p in analog if (how := p.match(candidates)) is not None]
    for pattern in digital_hits:
        pattern.hits += 1
    for pattern, how in analog_hits:
        if is_matmul:
            pattern.hits += 1
        elif how == "exact" and not digital_hits:
            raise ModelInputError(f"--analog '{pattern.text}': {name} (kind {kind}) cannot be analog")
        else:
            pattern.skipped.append(name)
    if digital_hits:
        return "digital", f"--digital {digital_hits[0].text}"
    if is_matmul and analog_hits:
        return "analog", f"--analog {analog_hits[0][0].text}"
    if not is_matmul:
        return "digital", "digital-only kind"
    if kind in profile.placement.digital:
        return "digital", f"profile keeps {kind} digital"
    return "analog", "profile default"


# ------------------------------------------------------------------- tiles
def _grid(shape: tuple[int, ...], layout: Layout, profile: ChipProfile) -> tuple[tuple[int, int], int]:
    """Tile grid (n_in, n_out) per matrix and total tiles (× E for a 3-D tensor)."""
    if layout == "in_out":
        n_in, n_out, matrices = shape[0], shape[1], 1
    else:
        n_out, n_in = shape[-2], shape[-1]
        matrices = shape[0] if len(shape) == 3 else 1
    grid = (
        len(split_sizes(n_in, profile.mapping.tile_rows)),
        len(split_sizes(n_out, profile.mapping.tile_cols)),
    )
    return grid, matrices * grid[0] * grid[1]


def _itemsize(dtype: str) -> int:
    """Bytes per element of a safetensors dtype string (``BF16``) or a torch dtype name (``bfloat16``)."""
    key = dtype.removeprefix("torch.")
    if key in DTYPES:
        return DTYPES[key][1]
    torch_dtype = getattr(torch, key, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ModelInputError(f"unsupported tensor dtype '{dtype}'")
    return torch_dtype.itemsize


# ------------------------------------------------------------------ planning
#: Decides (unit, reason) for a tensor given its kind-classified draft entry.
Decision = Callable[[TensorInfo], tuple[Unit, str]]


def _draft(
    name: str, shape: tuple[int, ...], dtype: str, nbytes: int, memory_name: str,
    aliases: tuple[str, ...] = (),
) -> TensorInfo:
    """A tensor to place (kind and layout filled in by :func:`_placed`; digital until decided)."""
    return TensorInfo(name=name, kind="other", shape=shape, layout="none", unit="digital",
                      module=name.rpartition(".")[0], nbytes=nbytes, dtype=dtype, memory_name=memory_name,
                      aliases=aliases)  # fmt: skip


def _placed(draft: TensorInfo, adapter: ArchAdapter, profile: ChipProfile, decide: Decision) -> TensorInfo:
    """``draft`` classified by the adapter, its unit from ``decide`` and (analog) its tile grid."""
    kind, layout = adapter.classify(draft.name, draft.shape)
    classified = replace(draft, kind=kind, layout=layout)
    unit, reason = decide(classified)
    grid, tiles = _grid(draft.shape, layout, profile) if unit == "analog" else ((0, 0), 0)
    return replace(classified, unit=unit, reason=reason, tiles=tiles, tile_grid=grid)


def _by_rules(
    profile: ChipProfile, analog: list[_Pattern], digital: list[_Pattern], tied: frozenset[str] = frozenset()
) -> Decision:
    """The placement rules (module docstring) as a :data:`Decision`; ``tied`` names stay digital."""

    def decide(info: TensorInfo) -> tuple[Unit, str]:
        candidates = _candidates(info.name, info.memory_name, info.aliases)
        unit, reason = _decide(info.name, info.kind, candidates, profile, analog, digital)
        if info.name in tied and unit == "analog":
            return "digital", "tied to the embedding"
        return unit, reason

    return decide


def _plan(
    drafts: Iterable[TensorInfo],
    adapter: ArchAdapter,
    profile: ChipProfile,
    analog: Sequence[str],
    digital: Sequence[str],
    tied: frozenset[str] = frozenset(),
) -> Placement:
    analog_p, digital_p = _parse_patterns(analog, digital)
    decide = _by_rules(profile, analog_p, digital_p, tied)
    infos = [_placed(draft, adapter, profile, decide) for draft in drafts]
    _check_patterns([*digital_p, *analog_p])
    return Placement.of(infos, profile, {"analog": tuple(analog), "digital": tuple(digital)})


def _model_drafts(model: nn.Module, adapter: ArchAdapter) -> list[TensorInfo]:
    """One draft per parameter of ``model``; a shared parameter appears once, under its non-lm_head
    name, with the other names in ``aliases``."""
    names: dict[int, list[str]] = {}
    params: dict[int, Any] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
        params[id(param)] = param
    drafts = []
    for key, group in names.items():
        main = next((n for n in group if adapter.classify(n)[0] != "lm_head"), group[0])
        param = params[key]
        dtype = str(param.dtype).removeprefix("torch.")
        aliases = tuple(n for n in group if n != main)
        nbytes = param.numel() * param.element_size()
        drafts.append(_draft(main, tuple(param.shape), dtype, nbytes, main, aliases))
    return drafts


def plan_model(
    model: nn.Module, profile: ChipProfile, analog: Sequence[str] = (), digital: Sequence[str] = ()
) -> Placement:
    """Place every parameter of an in-memory model (``model.config.model_type`` picks the adapter).

    A parameter shared by several names (lm_head tied to the embedding) appears once, under its
    non-lm_head name, with the other names in ``aliases``: it is the embedding and stays digital.
    Use this once, where a plain model enters (no bundle); a bundle's placement is read back with
    ``bundle.reader.placement_from_manifest`` and mapped onto its loaded model with :func:`model_placement`.
    """
    adapter = get_adapter(model.config)
    return _plan(_model_drafts(model, adapter), adapter, profile, analog, digital)


def plan_tensors(
    shapes: Mapping[str, Any],
    adapter: ArchAdapter,
    profile: ChipProfile,
    analog: Sequence[str] = (),
    digital: Sequence[str] = (),
    *,
    dtype: str = "F32",
    tied_lm_head: bool = False,
) -> Placement:
    """Place on-disk tensors without materialising the model (the streaming converter's view).

    ``shapes`` maps safetensors keys to a shape tuple or to an object with ``.shape`` (and optionally
    ``.dtype``, ``.nbytes``, e.g. a header entry); ``dtype`` is assumed where none is given.
    ``tied_lm_head``: the config ties lm_head to the embedding, so an ``lm_head`` key stays digital.
    """
    drafts, tied = _tensor_drafts(shapes, adapter, dtype, tied_lm_head)
    return _plan(drafts, adapter, profile, analog, digital, tied)


def _tensor_drafts(
    shapes: Mapping[str, Any], adapter: ArchAdapter, dtype: str, tied_lm_head: bool
) -> tuple[list[TensorInfo], frozenset[str]]:
    """One draft per on-disk tensor, and the lm_head keys tied to the embedding (see :func:`plan_tensors`)."""
    drafts, tied = [], set()
    for name, value in shapes.items():
        shape = tuple(int(d) for d in getattr(value, "shape", value))
        value_dtype = str(getattr(value, "dtype", None) or dtype)
        params = 1
        for dim in shape:
            params *= dim
        nbytes = getattr(value, "nbytes", None)
        nbytes = int(nbytes) if nbytes is not None else params * _itemsize(value_dtype)
        if tied_lm_head and adapter.classify(name, shape)[0] == "lm_head":
            tied.add(name)
        drafts.append(_draft(name, shape, value_dtype, nbytes, adapter.memory_name(name)))
    return drafts, frozenset(tied)


def replan_tensors(
    placement: Placement,
    shapes: Mapping[str, Any],
    adapter: ArchAdapter,
    profile: ChipProfile,
    analog: Sequence[str] = (),
    digital: Sequence[str] = (),
    *,
    tied_lm_head: bool = False,
) -> Placement:
    """Place the tensors of a checkpoint that a method rewrote, keeping the conversion's ``placement``.

    A tensor that loads into a parameter ``placement`` already places (same in-memory name) keeps that
    unit; only tensors the method created (e.g. HPD's factors) are decided, by the rules with
    ``placement``'s overrides plus the method's ``analog``/``digital`` patterns, each of which must place
    one of them. The result records both sets of patterns as its overrides.
    """
    drafts, tied = _tensor_drafts(shapes, adapter, "F32", tied_lm_head)
    return _replan(drafts, adapter, placement, profile, (analog, digital), tied=tied)


def replan_model(
    model: nn.Module,
    placement: Placement,
    profile: ChipProfile,
    analog: Sequence[str] = (),
    digital: Sequence[str] = (),
) -> Placement:
    """The placement of ``model``'s parameters after a recipe step, keeping ``placement`` (the model's
    placement before the step: on-disk keys or in-memory names).

    Every parameter ``placement`` records (by in-memory name, as :func:`model_placement` reads it) keeps
    its unit, unless one of the step's ``analog``/``digital`` patterns matches it; parameters the step
    created (HPD's factors) and those its patterns match are decided by the rules with every override so
    far (``placement``'s plus the step's; digital wins). Each of the step's patterns must match a tensor
    (ModelInputError naming it). The result names in-memory parameters and records all the overrides.
    """
    adapter = get_adapter(model.config)
    return _replan(_model_drafts(model, adapter), adapter, placement, profile, (analog, digital),
                   patterns_override_recorded=True)  # fmt: skip


def _replan(
    drafts: Iterable[TensorInfo],
    adapter: ArchAdapter,
    placement: Placement,
    profile: ChipProfile,
    step_patterns: tuple[Sequence[str], Sequence[str]],
    tied: frozenset[str] = frozenset(),
    patterns_override_recorded: bool = False,
) -> Placement:
    """Place ``drafts`` keeping ``placement``'s recorded units (see :func:`replan_tensors` and
    :func:`replan_model`); ``step_patterns`` = (analog, digital) added by a method."""
    analog, digital = step_patterns
    user_analog, user_digital = _parse_patterns(placement.overrides["analog"], placement.overrides["digital"])
    method_analog, method_digital = _parse_patterns(analog, digital)
    step = [*method_digital, *method_analog]
    rules = _by_rules(profile, [*user_analog, *method_analog], [*user_digital, *method_digital], tied)
    recorded = _recorded_units(placement)

    def decide(info: TensorInfo) -> tuple[Unit, str]:
        if not recorded.covers(info):
            return rules(info)
        candidates = _candidates(info.name, info.memory_name, info.aliases)
        if patterns_override_recorded and any(p.match(candidates) for p in step):
            return rules(info)
        return recorded(info)

    infos = [_placed(draft, adapter, profile, decide) for draft in drafts]
    _check_patterns(step)
    overrides = {"analog": (*placement.overrides["analog"], *analog),
                 "digital": (*placement.overrides["digital"], *digital)}  # fmt: skip
    return Placement.of(infos, profile, overrides)


# ------------------------------------------------------------------ a placement read back
def model_placement(model: nn.Module, placement: Placement, profile: ChipProfile) -> Placement:
    """The placement of ``model``'s parameters with every unit taken from ``placement``, not the rules.

    ``placement`` is a bundle's (``bundle.reader.placement_from_manifest``) or a plan of the checkpoint
    the model was loaded from: each parameter gets the unit of the tensor(s) that load into it (by
    in-memory name, so per-expert keys give their fused tensor's unit). A parameter ``placement`` does
    not name is digital; one whose tensors disagree (some experts analog, some digital) is a
    ModelInputError.
    Kinds, layouts and tile grids are the in-memory tensor's (``profile``'s tile size).
    """
    adapter = get_adapter(model.config)
    recorded = _recorded_units(placement)
    infos = [_placed(draft, adapter, profile, recorded) for draft in _model_drafts(model, adapter)]
    return Placement.of(infos, profile, dict(placement.overrides))


def current_placement(model: nn.Module, profile: ChipProfile, placement: Placement | None) -> Placement:
    """What a method step works on: the conversion's ``placement`` mapped onto ``model``
    (:func:`model_placement`), or the profile's default plan of it when the method is called on its own."""
    return model_placement(model, placement, profile) if placement is not None else plan_model(model, profile)


def _memory_names(info: TensorInfo) -> set[str]:
    """Every name ``info`` is known by in memory: its in-memory name, its own name and its aliases."""
    return {info.memory_name or info.name, info.name, *info.aliases}


@dataclass(frozen=True)
class _RecordedUnits:
    """A :data:`Decision` that reads each tensor's unit from an existing placement (by in-memory name)."""

    units: dict[str, frozenset[Unit]]

    def covers(self, info: TensorInfo) -> bool:
        """Whether the placement holds a tensor that loads into ``info``'s parameter."""
        return any(name in self.units for name in _memory_names(info))

    def __call__(self, info: TensorInfo) -> tuple[Unit, str]:
        found = frozenset().union(*(self.units.get(n, frozenset()) for n in _memory_names(info)))
        if len(found) > 1:
            raise ModelInputError(f"tensor '{info.name}' loads from both analog and digital tensors")
        return (next(iter(found)), "placement read back") if found else ("digital", "not in the placement")


def _recorded_units(placement: Placement) -> _RecordedUnits:
    units: dict[str, set[Unit]] = {}
    for info in placement:
        for name in _memory_names(info):
            units.setdefault(name, set()).add(info.unit)
    return _RecordedUnits({name: frozenset(found) for name, found in units.items()})


def human_bytes(n: float) -> str:
    """``n`` bytes in B / KiB / MiB / GiB, one decimal above bytes (tables and reports)."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------ analog cost
def tensor_macs_per_token(info: TensorInfo, adapter: ArchAdapter, config: Any) -> float:
    """Multiply-accumulates one token costs in tensor ``info`` (0 for a tensor that is not a matmul weight).

    A matrix ``[out, in]`` (or Conv1D ``[in, out]``) costs out·in. A routed expert runs for top_k of the E
    experts per token, so an ``expert`` tensor costs per-expert out·in × matrices × top_k / E: a fused
    ``[E, out, in]`` tensor costs out·in × top_k, one per-expert on-disk key out·in × top_k / E.
    """
    matrix = info.matrix_shape
    if matrix is None:
        return 0.0
    fused = info.layout == "out_in" and len(info.shape) == 3
    matrices = info.shape[0] if fused else 1
    macs = float(matrix[0] * matrix[1] * matrices)
    if info.kind != "expert":
        return macs
    experts = matrices if fused else adapter.num_experts(config)
    return macs * adapter.top_k(config) / experts


def analog_macs_per_token(placement: Placement, adapter: ArchAdapter, config: Any) -> float:
    """Analog multiply-accumulates per token of ``placement`` (see :func:`tensor_macs_per_token`)."""
    return sum(tensor_macs_per_token(info, adapter, config) for info in placement.analog())
