"""Write a bundle: analog/digital safetensors shards + index, scales, manifest, report — atomically.

The writer streams the source checkpoint one tensor at a time (see ``SourceCheckpoint.stream_tensors``):
the output shard layout is planned up front from the headers (every tensor's size, dtype and unit is
known), so each output file gets its header first and then its tensor bytes appended in order. Peak
memory is one tensor (plus its float32 copy for the scales of an analog tensor), whatever the model size.
Each byte is read once and written once; input, tensor and output sha256s are computed on the way.

Everything is built in ``.OUT.tmp-<pid>`` beside OUT, under an exclusive lock on OUT, and renamed at the
end (``bundle.lock`` written last); on any error (or Ctrl-C) the temporary folder is removed, so OUT
either holds a complete bundle or is untouched (see :mod:`cimconvert.bundle.outdir`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import save as safetensors_bytes

from cimconvert import __version__
from cimconvert.bundle.costs import deployment_figures
from cimconvert.bundle.integrity import LOCK_NAME, write_manifest_and_lock
from cimconvert.bundle.manifest import (
    MANIFEST_NAME,
    FileEntry,
    Manifest,
    Overrides,
    PlacementConfig,
    PlacementGroup,
    Producer,
    ProfileInfo,
    Recipe,
    SourceInfo,
    TensorEntry,
    TileGridEntry,
    Totals,
    TransformEntry,
    UnitParams,
    compact_targets,
    match_target,
)
from cimconvert.bundle.outdir import move_into_place, out_lock, tmp_path
from cimconvert.bundle.quantization import UNITS, write_hf_config
from cimconvert.bundle.report import render_report
from cimconvert.checkpoint import (
    CONFIG_NAME,
    FLOAT_DTYPES,
    INDEX_NAME,
    SourceCheckpoint,
    TensorMeta,
    as_tensor,
    sha256_file,
)
from cimconvert.errors import BundleError, CimError, ModelInputError, failure_detail
from cimconvert.profiles import ChipProfile
from cimconvert.progress import progress_bar
from cimconvert.simulator.program import clean_scales
from cimconvert.simulator.tiles import tile_grid

DEFAULT_MAX_SHARD_SIZE = 2 * 1000**3
SCALES_NAME = "cim_scales.safetensors"
REPORT_NAME = "REPORT.md"


@dataclass
class BundleSummary:
    """What ``write_bundle`` produced: the folder, its files (name, sha256, bytes), totals, timing."""

    out: Path
    files: list[dict[str, Any]]
    totals: dict[str, Any]
    manifest: Path
    seconds: float
    recovered: list[str] = field(default_factory=list)


@dataclass
class ShardPlan:
    """One output shard: its final file name, unit and the tensors it holds, in write order."""

    name: str
    unit: str
    tensors: list[TensorMeta] = field(default_factory=list)
    nbytes: int = 0

    def header(self) -> bytes:
        """The safetensors header (8-byte length + JSON padded to 8 bytes) for the planned tensors."""
        entries: dict[str, Any] = {"__metadata__": {"format": "pt", "cimconvert_unit": self.unit}}
        offset = 0
        for meta in self.tensors:
            entries[meta.name] = {
                "dtype": meta.dtype,
                "shape": list(meta.shape),
                "data_offsets": [offset, offset + meta.nbytes],
            }
            offset += meta.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text


def plan_shards(
    tensors: Iterable[TensorMeta], units: dict[str, str], max_shard_size: int = DEFAULT_MAX_SHARD_SIZE
) -> tuple[list[ShardPlan], dict[str, ShardPlan]]:
    """Assign tensors (in stream order) to ``analog-*``/``digital-*`` shards, rolling over at the size.

    Returns the shards (analog first) and the shard of each tensor. Names are final
    (``analog-00001-of-00003.safetensors``) because the count is known before anything is written.
    """
    shards: dict[str, list[ShardPlan]] = {unit: [] for unit in UNITS}
    where: dict[str, ShardPlan] = {}
    for meta in tensors:
        unit = units[meta.name]
        current = shards[unit][-1] if shards[unit] else None
        if current is None or (current.tensors and current.nbytes + meta.nbytes > max_shard_size):
            current = ShardPlan(name="", unit=unit)
            shards[unit].append(current)
        current.tensors.append(meta)
        current.nbytes += meta.nbytes
        where[meta.name] = current
    ordered: list[ShardPlan] = []
    for unit in UNITS:
        count = len(shards[unit])
        for k, shard in enumerate(shards[unit], start=1):
            shard.name = f"{unit}-{k:05d}-of-{count:05d}.safetensors"
            ordered.append(shard)
    return ordered, where


# ------------------------------------------------------------------ output folder
def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing non-empty OUT (or a file in its place) unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        if not force:
            raise BundleError(f"output {out} exists and is not a folder (use --force to replace it)")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise BundleError(f"output folder {out} is not empty (use --force to replace it)")


def _make_tmp(out: Path) -> Path:
    """Create ``.OUT.tmp-<pid>`` beside OUT (parents exist: the OUT lock made them); one-line error when
    the folder is not writable."""
    tmp = tmp_path(out, "tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        probe = tmp / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        _cleanup(tmp if tmp.exists() else None)
        raise BundleError(f"cannot write the bundle: {out.parent} is not writable ({exc.strerror})") from None
    return tmp


def _cleanup(tmp: Path | None) -> None:
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ tensor streaming
@dataclass
class _Written:
    """Per-tensor results of the streaming pass."""

    sha256: dict[str, str] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    files: dict[str, FileEntry] = field(default_factory=dict)


@dataclass
class _OpenShard:
    handle: BinaryIO
    digest: Any
    written: int = 0


class _ShardWriter:
    """Appends tensor bytes to the planned shards in order, hashing the output as it is written.

    Analog and digital tensors interleave in the stream, so one shard per unit is open at a time; a shard
    is closed (and its sha256 recorded) as soon as its last planned tensor is written.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.open: dict[str, _OpenShard] = {}
        self.done: dict[str, FileEntry] = {}

    def write(self, shard: ShardPlan, raw: torch.Tensor) -> None:
        """Append one tensor's bytes to ``shard`` (opening it and writing its header first)."""
        state = self.open.get(shard.name) or self._open(shard)
        data = raw.numpy()
        state.handle.write(data)
        state.digest.update(data)
        state.written += 1
        if state.written == len(shard.tensors):
            self._close(shard.name)

    def _open(self, shard: ShardPlan) -> _OpenShard:
        header = shard.header()
        state = _OpenShard((self.folder / shard.name).open("wb"), hashlib.sha256())
        state.handle.write(header)
        state.digest.update(header)
        self.open[shard.name] = state
        return state

    def _close(self, name: str) -> None:
        state = self.open.pop(name)
        state.handle.close()
        size = (self.folder / name).stat().st_size
        self.done[name] = FileEntry(name=name, sha256=state.digest.hexdigest(), bytes=size)

    def close(self) -> None:
        """Close every shard still open (after an error: the folder is discarded anyway)."""
        for name in list(self.open):
            self.open.pop(name).handle.close()


def analog_scales(meta: TensorMeta, raw: torch.Tensor, layout: str, profile: ChipProfile) -> torch.Tensor:
    """Abs-max mapping scales ``[..., out, n_in_tiles]`` (float32) of an analog tensor."""
    return clean_scales(as_tensor(meta, raw), layout, profile)  # type: ignore[arg-type]


class _ScaleArena:
    """The mapping scales of every analog tensor, in one float32 buffer sized before the stream starts.

    Each tensor's scales come out of few-MB temporaries (the weight widened to float32, its absolute
    value). Kept as its own small allocation, each result pins part of a freed temporary in glibc's heap,
    which then grows by about one temporary per tensor: the 3072 analog per-expert tensors of an
    OLMoE-1B-7B-shaped checkpoint grew the writer past 13 GB. Copied into one buffer allocated up front,
    every temporary is freed whole and reused.
    """

    def __init__(self, metas: Sequence[TensorMeta], infos: dict[str, Any], profile: ChipProfile) -> None:
        self.shapes: dict[str, torch.Size] = {}
        for meta in metas:
            info = infos[meta.name]
            if info.unit == "analog":
                shaped = torch.empty(meta.shape, dtype=meta.torch_dtype, device="meta")
                self.shapes[meta.name] = clean_scales(shaped, info.layout, profile).shape
        self.buffer = torch.empty(sum(shape.numel() for shape in self.shapes.values()), dtype=torch.float32)
        self.used = 0
        self.scales: dict[str, torch.Tensor] = {}

    def put(self, name: str, scales: torch.Tensor) -> None:
        """Copy the scales of analog tensor ``name`` into the buffer (a view of it is kept)."""
        size = scales.numel()
        view = self.buffer[self.used : self.used + size].view(self.shapes[name])
        view.copy_(scales)
        self.scales[name] = view
        self.used += size


def _stream(
    source: SourceCheckpoint,
    metas: Sequence[TensorMeta],
    folder: Path,
    where: dict[str, ShardPlan],
    infos: dict[str, Any],
    profile: ChipProfile,
    progress: Callable[[int], None],
) -> _Written:
    result = _Written()
    writer = _ShardWriter(folder)
    arena = _ScaleArena(metas, infos, profile)
    # sha256 of the input file, of each tensor and of the output file run in parallel (hashlib releases
    # the GIL); every job on a buffer finishes before the buffer is reused for the next tensor.
    with ThreadPoolExecutor(max_workers=2) as pool:
        try:
            for meta, raw in source.stream_tensors(finite_check=True, pool=pool):
                tensor_hash = pool.submit(_hexdigest, raw.numpy())
                writer.write(where[meta.name], raw)
                info = infos[meta.name]
                if info.unit == "analog":
                    arena.put(meta.name, analog_scales(meta, raw, info.layout, profile))
                result.sha256[meta.name] = tensor_hash.result()
                progress(meta.nbytes)
        finally:
            writer.close()
    result.files = writer.done
    result.scales = arena.scales
    return result


def _hexdigest(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------ manifest pieces
def _unit_params(profile: ChipProfile, unit: str, dtypes: Sequence[str]) -> UnitParams:
    if unit == "digital":
        return UnitParams(dtype=",".join(sorted(set(dtypes))) or None)
    m, mvm = profile.mapping, profile.mvm
    return UnitParams(
        tile_rows=m.tile_rows,
        tile_cols=m.tile_cols,
        g_max=m.g_max,
        g_min=m.g_min,
        differential=m.differential,
        levels=m.levels,
        scale_granularity=m.scale,
        programming_noise=profile.programming.kind,
        drift=profile.drift.kind,
        read_noise=profile.read_noise.kind,
        dac_bits=mvm.dac_bits,
        adc_bits=mvm.adc_bits,
        out_bound=mvm.out_bound,
        dtype=",".join(sorted(set(dtypes))) or None,
    )


def _placement_config(entries: list[TensorEntry], profile: ChipProfile, placement: Any) -> PlacementConfig:
    names = {unit: [e.name for e in entries if e.unit == unit] for unit in UNITS}
    groups: dict[str, PlacementGroup] = {}
    targets: dict[str, list[str]] = {}
    for unit in UNITS:
        other = names["digital" if unit == "analog" else "analog"]
        targets[unit] = compact_targets(names[unit], other)
        members = [e for e in entries if e.unit == unit]
        groups[unit] = PlacementGroup(
            unit=unit,
            targets=targets[unit],
            kinds=sorted({e.kind for e in members}),
            params=_unit_params(profile, unit, [e.dtype for e in members]),
        )
    overrides = getattr(placement, "overrides", None) or {}
    return PlacementConfig(
        config_groups=groups,
        ignore=targets["digital"],
        overrides=Overrides(**{unit: [str(p) for p in patterns] for unit, patterns in overrides.items()}),
    )


def _grid_entry(info: Any, shape: tuple[int, ...], layout: str, profile: ChipProfile) -> TileGridEntry | None:
    if info.unit != "analog":
        return None

    matrix = (shape[1], shape[0]) if layout == "in_out" else shape
    grid = tile_grid(matrix, profile.mapping)
    return TileGridEntry(
        in_sizes=list(grid.in_sizes), out_sizes=list(grid.out_sizes), n_matrices=grid.n_matrices
    )


def _transform_of(name: str, transforms: list[TransformEntry]) -> str | None:
    """Id of the first transform whose targets select ``name``."""
    return next((t.id for t in transforms if any(match_target(p, name) for p in t.targets)), None)


def _tensor_entries(
    metas: list[TensorMeta],
    infos: dict[str, Any],
    where: dict[str, ShardPlan],
    written: _Written,
    transforms: list[TransformEntry],
    profile: ChipProfile,
) -> list[TensorEntry]:
    entries = []
    for meta in metas:
        info = infos[meta.name]
        grid = _grid_entry(info, meta.shape, info.layout, profile)
        scales = written.scales.get(meta.name)
        transform = _transform_of(meta.name, transforms)
        entries.append(
            TensorEntry(
                name=meta.name,
                unit=info.unit,
                kind=info.kind,
                shard=where[meta.name].name,
                shape=list(meta.shape),
                dtype=meta.dtype,
                layout=info.layout,
                tile_grid=grid,
                tiles=int(getattr(info, "tiles", 0) or 0) if info.unit == "analog" else 0,
                scales_key=meta.name if scales is not None else None,
                scales_shape=list(scales.shape) if scales is not None else None,
                nbytes=meta.nbytes,
                sha256=written.sha256[meta.name],
                transform=transform,
            )
        )
    return entries


def _totals(entries: list[TensorEntry], shards: list[ShardPlan], placement: Any) -> Totals:
    by_unit = {unit: [e for e in entries if e.unit == unit] for unit in UNITS}
    planned = placement.totals() if hasattr(placement, "totals") else {}
    return Totals(
        tensors=len(entries),
        analog_tensors=len(by_unit["analog"]),
        digital_tensors=len(by_unit["digital"]),
        analog_bytes=sum(e.nbytes for e in by_unit["analog"]),
        digital_bytes=sum(e.nbytes for e in by_unit["digital"]),
        analog_tiles=sum(e.tiles for e in by_unit["analog"]),
        analog_shards=sum(1 for s in shards if s.unit == "analog"),
        digital_shards=sum(1 for s in shards if s.unit == "digital"),
        total_bytes=sum(e.nbytes for e in entries),
        placement=json.loads(json.dumps(planned, default=str)),
    )


def _producer() -> Producer:
    import safetensors
    import transformers

    return Producer(
        version=__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
        safetensors=safetensors.__version__,
    )


# ------------------------------------------------------------------ files
def _write_index(folder: Path, entries: list[TensorEntry], total: int) -> None:
    index = {
        "metadata": {"total_size": total, "format": "cimconvert-bundle"},
        "weight_map": {e.name: e.shard for e in sorted(entries, key=lambda e: e.name)},
    }
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def canonical_safetensors_header(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted, so the same tensors give the same bytes.

    safetensors writes its metadata map in arbitrary order; the sorted compact header has the same
    length, so it replaces the original in place (padding kept, data offsets unchanged).
    """
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    if len(header) > size:
        return data
    return data[:8] + header.ljust(size) + data[8 + size :]


def _write_scales(folder: Path, scales: dict[str, torch.Tensor], profile: ChipProfile) -> str | None:
    if not scales:
        return None
    meta = {"format": "pt", "granularity": profile.mapping.scale, "profile": profile.name}
    path = folder / SCALES_NAME
    data = safetensors_bytes({k: v.clone() for k, v in scales.items()}, metadata=meta)  # unshared storage
    path.write_bytes(canonical_safetensors_header(data))
    path.chmod(0o644)  # match the other bundle files whatever the umask
    return SCALES_NAME


def copy_through(source: SourceCheckpoint, folder: Path) -> None:
    """Copy ``source``'s config.json and auxiliary files (tokenizer, generation config) into ``folder``."""
    for name in (CONFIG_NAME, *source.aux_files):
        shutil.copyfile(source.dir / name, folder / name)


def _file_entries(folder: Path, known: dict[str, FileEntry]) -> list[FileEntry]:
    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in (MANIFEST_NAME, LOCK_NAME):
            continue
        entry = known.get(name) or FileEntry(name=name, sha256=sha256_file(path), bytes=path.stat().st_size)
        entries.append(entry)
    return entries


def _infos(placement: Any, metas: list[TensorMeta]) -> dict[str, Any]:
    infos = {t.name: t for t in (*placement.analog(), *placement.digital())}
    missing = [m.name for m in metas if m.name not in infos]
    if missing:
        raise BundleError(f"placement has no entry for tensor '{missing[0]}' (+{len(missing) - 1} more)")
    return infos


def _progress_bar(total: int, enabled: bool) -> tuple[Callable[[int], None], Callable[[], None]]:
    if not enabled:
        return (lambda n: None), (lambda: None)
    bar = progress_bar(total=total, unit="B", unit_scale=True, desc="converting")
    return bar.update, bar.close


# ------------------------------------------------------------------ main entry
def write_bundle(
    source: SourceCheckpoint,
    out: str | Path,
    profile: ChipProfile,
    placement: Any,
    transforms: Sequence[dict[str, Any]] = (),
    seeds: dict[str, int | list[int]] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    progress: bool = True,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    origin: SourceCheckpoint | None = None,
    finalize: Callable[[Path, Manifest], dict[str, Any]] | None = None,
    key: bytes | str | None = None,
    recipe: dict[str, Any] | None = None,
) -> BundleSummary:
    """Write the bundle for ``source`` placed by ``placement`` into ``out`` (atomically).

    Every on-disk tensor keeps its name and dtype and goes to an ``analog-*`` or ``digital-*`` shard
    (rolled over at ``max_shard_size`` bytes); ``model.safetensors.index.json`` covers all of them.
    Analog tensors get abs-max mapping scales in ``cim_scales.safetensors``. Also writes ``manifest.json``
    and ``REPORT.md``, copies generation config and tokenizer files, and copies config.json with the
    manifest's ``quantization_config`` added, so transformers loads the folder through cimconvert's
    quantizer (:mod:`cimconvert.bundle.quantization`). Refuses a non-empty ``out`` unless ``force`` (the
    old folder is replaced only once the new bundle is complete). ``origin`` is the checkpoint the
    manifest names as the source when ``source`` is a transformed temporary copy of it (ROMER, HPD, ...).
    ``finalize(tmp_folder, manifest)`` runs before the manifest is written (e.g. the ONNX export): files it
    adds to the folder are hashed into ``manifest.files`` and the dict it returns is merged into
    ``manifest.extra``, so the bundle appears complete or not at all. ``bundle.lock`` (the manifest's
    sha256, plus an HMAC with ``key`` or ``$CIMCONVERT_SIGNING_KEY``) is written last. ``recipe`` (the
    resolved recipe of the conversion, ``Recipe`` fields) becomes ``manifest.recipe``. The exclusive lock
    on OUT is held throughout (see :mod:`cimconvert.bundle.outdir`).
    Raises BundleError / ModelInputError (one line).
    """
    started = time.perf_counter()
    out = Path(out).expanduser().absolute()
    with out_lock(out) as lock:
        check_out_dir(out, force)
        metas = [m for name in source.weight_files for m in source.headers[name].tensors]
        infos = _infos(placement, metas)
        _check_analog_dtypes(metas, infos)
        shards, where = plan_shards(metas, {m.name: infos[m.name].unit for m in metas}, max_shard_size)
        plan = _Plan(metas, infos, shards, where, [TransformEntry.model_validate(t) for t in transforms])
        recorded = _Recorded(seeds or {}, extra or {}, origin or source, finalize, key, recipe)
        manifest = _write_in_tmp(source, out, profile, placement, plan, recorded, force, progress)
    return BundleSummary(
        out=out,
        files=[f.model_dump() for f in manifest.files],
        totals=manifest.totals.model_dump(),
        manifest=out / MANIFEST_NAME,
        seconds=time.perf_counter() - started,
        recovered=lock.recovered,
    )


@dataclass
class _Plan:
    """What the streaming pass writes where: tensors, their placement, shards and transforms."""

    metas: list[TensorMeta]
    infos: dict[str, Any]
    shards: list[ShardPlan]
    where: dict[str, ShardPlan]
    transforms: list[TransformEntry]


@dataclass
class _Recorded:
    """What the manifest records besides the tensors: seeds, extra, the origin checkpoint, the ``finalize``
    hook's additions, and the key that signs ``bundle.lock``."""

    seeds: dict[str, int | list[int]]
    extra: dict[str, Any]
    origin: SourceCheckpoint
    finalize: Callable[[Path, Manifest], dict[str, Any]] | None
    key: bytes | str | None
    recipe: dict[str, Any] | None = None


def _check_analog_dtypes(metas: list[TensorMeta], infos: dict[str, Any]) -> None:
    """Analog tiles hold real-valued weights: an integer or boolean tensor placed analog is refused."""
    for meta in metas:
        if infos[meta.name].unit == "analog" and meta.dtype not in FLOAT_DTYPES:
            raise ModelInputError(
                f"tensor '{meta.name}' in {meta.file} has dtype {meta.dtype}, but analog tiles need "
                "floating-point weights (wrong dtype in the safetensors header?)"
            )


def _write_in_tmp(
    source: SourceCheckpoint,
    out: Path,
    profile: ChipProfile,
    placement: Any,
    plan: _Plan,
    recorded: _Recorded,
    force: bool,
    progress: bool,
) -> Manifest:
    """Build the bundle in ``.OUT.tmp-<pid>`` and move it into place; the folder goes on any failure."""
    from safetensors import SafetensorError

    tmp = _make_tmp(out)
    update, close_bar = _progress_bar(sum(m.nbytes for m in plan.metas), progress)
    try:
        written = _stream(source, plan.metas, tmp, plan.where, plan.infos, profile, update)
        close_bar()
        manifest = _assemble(source, tmp, profile, placement, plan, written, recorded)
        move_into_place(tmp, out, force)
    except CimError:
        _cleanup(tmp)
        raise
    except (OSError, SafetensorError) as exc:
        _cleanup(tmp)
        raise BundleError(f"writing the bundle failed: {failure_detail(exc)}") from None
    except BaseException:
        _cleanup(tmp)
        raise
    finally:
        close_bar()
    return manifest


def _assemble(
    source: SourceCheckpoint,
    folder: Path,
    profile: ChipProfile,
    placement: Any,
    plan: _Plan,
    written: _Written,
    recorded: _Recorded,
) -> Manifest:
    """Write index, scales, copied files, REPORT.md, manifest.json and (last) bundle.lock into ``folder``."""
    origin = recorded.origin
    entries = _tensor_entries(plan.metas, plan.infos, plan.where, written, plan.transforms, profile)
    totals = _totals(entries, plan.shards, placement)
    _write_index(folder, entries, totals.total_bytes)
    scales_file = _write_scales(folder, written.scales, profile)
    copy_through(source, folder)
    manifest = Manifest(
        producer=_producer(),
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        source=SourceInfo(
            model=origin.model_id,
            path=origin.recorded_path or str(origin.origin_path),
            revision=origin.revision,
            model_type=origin.model_type,
            files=[FileEntry(name=f.name, sha256=f.sha256, bytes=f.bytes) for f in origin.files()],
            gguf=origin.gguf,
        ),
        profile=ProfileInfo(
            name=profile.name, content_hash=profile.content_hash(), profile=profile.model_dump(mode="json")
        ),
        placement_config=_placement_config(entries, profile, placement),
        scales_file=scales_file,
        tensors=entries,
        recipe=None if recorded.recipe is None else Recipe.model_validate(recorded.recipe),
        transforms=plan.transforms,
        seeds=json.loads(json.dumps(recorded.seeds)),
        extra=json.loads(json.dumps(recorded.extra, default=str)),
        files=[],
        totals=totals,
    )
    write_hf_config(folder, manifest)  # config.json is hashed into manifest.files below
    if recorded.finalize is not None:
        manifest.extra = {**manifest.extra, **recorded.finalize(folder, manifest)}
    report = render_report(manifest, deployment_figures(manifest, source.config))
    (folder / REPORT_NAME).write_text(report, encoding="utf-8")
    manifest.files = _file_entries(folder, written.files)
    write_manifest_and_lock(folder, manifest.model_dump_json(indent=2) + "\n", recorded.key)
    return manifest
