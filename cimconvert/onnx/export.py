"""torch → ONNX with explicit analog ops, per architecture family (dense, MoE, SSM).

The exporter is torch's TorchScript ("legacy") ONNX exporter (opset 18): ~1 s for the tiny models,
names weight initializers after the parameters, and turns :func:`analog_op.analog_linear` into one
``ai.cimconvert.AnalogMatMul`` node per analog matmul. What makes each family export with dynamic batch
and sequence axes and routing-independent graphs (see the project's design notes, TOOLCHAIN.md):

* analog matmuls go through the one analog-execution layer (:class:`cimconvert.analog.AnalogPatch`)
  with :class:`ExportKernel`, which emits the marker op: ``nn.Linear`` / GPT-2 ``Conv1D`` forwards
  become the marker (+ bias); fused experts run the ``static`` dispatch — a loop over *all* experts
  that selects each expert's tokens with ``NonZero`` → ``Gather`` → matmuls → ``ScatterND`` add, so
  dispatch stays sparse and nothing depends on which experts the trace input happened to hit;
* complex-number rotary embeddings (DeepSeek-V2's ``polar``/``view_as_complex``):
  :mod:`cimconvert.onnx.rope` swaps in the same math on real cos/sin tensors;
* Mamba / FalconMamba / Mamba2 mixers: :mod:`cimconvert.onnx.ssm` replaces the Python time loop by one
  ``SelectiveScan`` / ``SsdScan`` node (a local function) that exports with a dynamic sequence axis.

:func:`export_model` writes ``model.onnx`` (+ ``model.onnx_data`` when large);
:func:`export_bundle_onnx` does it for a converted bundle and returns the file entries.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import ModelProto
from torch import nn

from cimconvert import __version__
from cimconvert.analog.experts import DIGITAL_COLUMNS_SUFFIX, analog_columns, digital_columns, digital_inputs
from cimconvert.analog.patch import AnalogPatch
from cimconvert.analog.routes import EXPERT_PARAMS, owner_of, route_of
from cimconvert.arch import get_adapter
from cimconvert.bundle.manifest import Manifest
from cimconvert.bundle.reader import manifest_profile, placement_from_manifest
from cimconvert.errors import CimError
from cimconvert.onnx import analog_op, rope, ssm
from cimconvert.onnx.analog_op import SCALES_SUFFIX, AnalogSpec
from cimconvert.onnx.metadata import build_metadata, set_metadata
from cimconvert.placement import model_placement
from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator.program import clean_scales

LOGGER = logging.getLogger(__name__)

OPSET = 18
ONNX_DIR = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx_data"
#: Initializers above this size go to the external data file once the model exceeds EXTERNAL_THRESHOLD.
TENSOR_THRESHOLD = 1024
EXTERNAL_THRESHOLD = 256 << 20
PAGE = 4096
SCALES_BUFFER = "weight" + SCALES_SUFFIX


@dataclass
class ExportResult:
    """What :func:`export_model` wrote: files (relative to the bundle), counts and timings."""

    model_path: Path
    #: The model file's name relative to the bundle (what the manifest records; never absolute).
    model_name: str
    files: list[dict[str, Any]]
    analog_nodes: int
    analog_tensors: list[str]
    seconds: float
    opset: int = OPSET
    metadata: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (``files`` are manifest ``FileEntry`` dicts)."""
        return {
            "model": self.model_name,
            "files": self.files,
            "analog_nodes": self.analog_nodes,
            "analog_tensors": self.analog_tensors,
            "seconds": round(self.seconds, 3),
            "opset": self.opset,
        }


# ----------------------------------------------------------------------------------------------
# Specs: which matmuls are analog and what their nodes say
# ----------------------------------------------------------------------------------------------


def _features(shape: Sequence[int], layout: str) -> tuple[int, int]:
    """(in_features, out_features) of one matrix of a 2-D/3-D weight."""
    rows, cols = int(shape[-2]), int(shape[-1])
    return (cols, rows) if layout == "out_in" else (rows, cols)


def manifest_names(manifest: Any, adapter: Any) -> dict[tuple[str, int], list[str]]:
    """(in-memory tensor, expert or -1) → the bundle's analog on-disk tensor names it covers."""
    out: dict[tuple[str, int], list[str]] = {}
    for entry in getattr(manifest, "tensors", []) or []:
        if entry.unit != "analog":
            continue
        expert = adapter.expert_key(entry.name)
        key = (expert.memory_name, expert.expert) if expert else (adapter.memory_name(entry.name), -1)
        out.setdefault(key, []).append(entry.name)
    return out


def analog_specs(
    targets: Sequence[Any], profile: ChipProfile, names: dict[tuple[str, int], list[str]] | None = None
) -> dict[str, list[AnalogSpec]]:
    """One :class:`AnalogSpec` per analog matrix (one per expert of a 3-D stack), by tensor name."""
    names = names or {}
    specs: dict[str, list[AnalogSpec]] = {}
    for target in targets:
        shape = tuple(target.shape)
        in_f, out_f = _features(shape, target.layout)
        experts = range(shape[0]) if len(shape) == 3 else [-1]
        specs[target.name] = [
            AnalogSpec(
                tensor=target.name, kind=str(target.kind), layout=str(target.layout), in_features=in_f,
                out_features=out_f, tile_rows=profile.mapping.tile_rows, tile_cols=profile.mapping.tile_cols,
                profile=profile.name, profile_hash=profile.content_hash(), expert=e,
                manifest_tensors=tuple(names.get((target.name, e), ())),
            )
            for e in experts
        ]  # fmt: skip
    return specs


# ----------------------------------------------------------------------------------------------
# Export-time patches
# ----------------------------------------------------------------------------------------------


@dataclass
class ExportKernel:
    """Analog kernel of the exporter: one ``AnalogMatMul`` marker per matmul (scales as a buffer)."""

    specs: dict[str, list[AnalogSpec]]

    def linear(self, name: str, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """AnalogMatMul of a Linear/Conv1D weight (its clean scales in the ``weight_scales`` buffer)."""
        return analog_op.analog_linear(x, module.weight, getattr(module, SCALES_BUFFER), self.specs[name][0])

    def expert(self, name: str, module: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        """AnalogMatMul of one expert of a fused tensor (the node's spec names the expert)."""
        attr = name.rpartition(".")[2]
        weight, scales = getattr(module, attr), getattr(module, attr + SCALES_SUFFIX)
        return analog_op.analog_linear(x, weight, scales, self.specs[name][expert])


class _Patches:
    """Temporary changes to a model for export; ``undo()`` restores it exactly."""

    def __init__(self) -> None:
        self._undo: list[Any] = []

    def buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        """Register a persistent buffer (exported as an initializer named after it)."""
        module.register_buffer(name, value, persistent=True)
        self._undo.append(lambda: delattr(module, name))

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        """Set an instance attribute (e.g. ``forward``), restoring the previous state on undo."""
        had, old = name in obj.__dict__, obj.__dict__.get(name)
        obj.__dict__[name] = value

        def restore() -> None:
            if had:
                obj.__dict__[name] = old
            else:
                obj.__dict__.pop(name, None)

        self._undo.append(restore)

    def call(self, fn: Any) -> None:
        """Run ``fn`` on undo."""
        self._undo.append(fn)

    def undo(self) -> None:
        """Undo every change, last first."""
        while self._undo:
            self._undo.pop()()


def _split_digital_columns(
    patches: _Patches, owner: nn.Module, attr: str, index: torch.Tensor, layout: str
) -> None:
    """Export a fused tensor with digital input channels as its analog columns (the AnalogMatMul weight,
    digital columns zeroed) plus a buffer of the digital columns (a plain initializer the runtime never
    programs); the model is restored on undo."""
    param = getattr(owner, attr)
    patches.buffer(owner, attr + DIGITAL_COLUMNS_SUFFIX, digital_columns(param.detach(), index, layout))
    saved = param.detach().clone()
    with torch.no_grad():
        param.copy_(analog_columns(param.detach(), index, layout))
    patches.call(lambda: param.data.copy_(saved))


@contextlib.contextmanager
def export_patches(
    model: nn.Module, specs: dict[str, list[AnalogSpec]], profile: ChipProfile
) -> Iterator[list[str]]:
    """Swap analog matmuls for AnalogMatMul markers (and SSM scans for exportable ones).

    Yields the analog tensors that have no matmul module (weight read directly; exported as plain
    initializers so the runtime can still program them).
    """
    patches = _Patches()
    weight_only: list[str] = []
    try:
        analog = AnalogPatch(model, ExportKernel(specs), dispatch="static")
        patches.call(analog.close)
        analog.bind_all_experts()
        rope.patch_complex_rope(patches, model)
        for name, node_specs in specs.items():
            if route_of(model, name) == "weight":
                weight_only.append(name)
                continue
            owner, _, attr = owner_of(model, name)
            digital = digital_inputs(owner, attr) if attr in EXPERT_PARAMS else None
            if digital is not None:
                _split_digital_columns(patches, owner, attr, digital, node_specs[0].layout)
            scales = clean_scales(getattr(owner, attr), node_specs[0].layout, profile)  # type: ignore[arg-type]
            patches.buffer(owner, attr + SCALES_SUFFIX, scales)
            analog.route(name)
        ssm.patch_mixers(patches, model, specs, profile)
        yield weight_only
    finally:
        patches.undo()


# ----------------------------------------------------------------------------------------------
# Tracing and post-processing
# ----------------------------------------------------------------------------------------------


class LogitsModel(nn.Module):
    """``(input_ids, attention_mask) → logits`` without cache (what the ONNX graph computes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def sample_inputs(
    vocab: int, batch: int = 2, seq: int = 16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Trace inputs: random ids (batch ≥ 2 so no axis is specialised to 1) and an all-ones mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    return ids, torch.ones_like(ids)


def _trace(model: nn.Module, seq: int) -> ModelProto:
    """Legacy-export ``LogitsModel(model)`` to an in-memory ModelProto with dynamic batch/sequence."""
    wrapper = LogitsModel(model).eval()
    vocab = int(model.get_input_embeddings().weight.shape[0])
    inputs = sample_inputs(vocab, seq=seq)
    axes = {0: "batch", 1: "sequence"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, inputs, buffer, dynamo=False, opset_version=OPSET, do_constant_folding=True,
            input_names=["input_ids", "attention_mask"], output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
            custom_opsets={analog_op.DOMAIN: analog_op.OP_VERSION},
        )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def _rename_value(model: ModelProto, old: str, new: str) -> None:
    """Rename an initializer/value everywhere in the main graph."""
    for init in model.graph.initializer:
        if init.name == old:
            init.name = new
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new


def _canonical_names(model: ModelProto, weight_only: Sequence[str]) -> list[str]:
    """Give W and S of every AnalogMatMul their canonical names; returns the analog tensors found."""
    inits = {i.name for i in model.graph.initializer}
    found: list[str] = []
    for node in analog_op.analog_nodes(model):
        tensor = str(analog_op.node_attrs(node)["tensor"])
        for index, wanted in ((1, tensor), (2, tensor + SCALES_SUFFIX)):
            current = node.input[index]
            if current != wanted:
                if current not in inits:
                    raise CimError(
                        f"ONNX export: input {index} of the AnalogMatMul of '{tensor}' is not a weight"
                    )
                _rename_value(model, current, wanted)
                inits = (inits - {current}) | {wanted}
        if tensor not in found:
            found.append(tensor)
    return found


def _find_initializer(model: ModelProto, data: bytes, dims: list[int]) -> Any:
    return next(
        (t for t in model.graph.initializer if t.raw_data == data and list(t.dims) == dims), None
    )


def _name_weight_only(model: ModelProto, net: nn.Module, names: Sequence[str]) -> None:
    """Give weight-only analog tensors (read directly, no AnalogMatMul) their parameter names.

    The exporter may rename such an initializer (``onnx::MatMul_N``) or store it transposed (a router's
    ``F.linear``); it is found by its exact bytes. A transposed copy is replaced by the named tensor in
    its own layout followed by a Transpose node, so the runtime can bind programmed weights by name.
    """
    params = dict(net.named_parameters())
    by_name = {t.name: t for t in model.graph.initializer}
    for name in names:
        if name in by_name:
            continue
        weight = params[name].detach().float().contiguous()
        match = _find_initializer(model, weight.numpy().tobytes(), list(weight.shape))
        if match is not None:
            _rename_value(model, match.name, name)
            continue
        if weight.dim() != 2:
            raise CimError(f"ONNX export: analog tensor '{name}' did not survive as a named initializer")
        flipped = weight.t().contiguous()
        match = _find_initializer(model, flipped.numpy().tobytes(), list(flipped.shape))
        if match is None:
            raise CimError(f"ONNX export: analog tensor '{name}' did not survive as a named initializer")
        model.graph.initializer.remove(match)
        model.graph.initializer.append(onnx.numpy_helper.from_array(weight.numpy(), name))
        node = onnx.helper.make_node("Transpose", [name], [match.name], name=f"{name}::t", perm=[1, 0])
        model.graph.node.insert(0, node)


def _check_complete(specs: dict[str, list[AnalogSpec]], found: list[str], weight_only: list[str]) -> None:
    missing = [n for n in specs if n not in found and n not in weight_only]
    if missing:
        raise CimError(f"ONNX export: analog tensor '{missing[0]}' has no AnalogMatMul node in the graph")


def build_onnx(
    model: nn.Module,
    targets: Sequence[Any],
    profile: ChipProfile,
    manifest: Any = None,
    trace_seq: int = 16,
) -> tuple[ModelProto, list[str], list[str]]:
    """Export ``model`` with AnalogMatMul nodes for ``targets``; returns (model, analog, weight-only)."""
    adapter = get_adapter(model.config)
    specs = analog_specs(targets, profile, manifest_names(manifest, adapter) if manifest else None)
    model.eval()
    with export_patches(model, specs, profile) as weight_only:
        proto = _trace(model, trace_seq)
        weight_only = list(weight_only)
    found = _canonical_names(proto, weight_only)
    _name_weight_only(proto, model, weight_only)
    _check_complete(specs, found, weight_only)
    analog_op.attach_function(proto, analog_op.ideal_function(OPSET))
    ssm.attach_scan_functions(proto, OPSET)
    proto.producer_name = "cimconvert"
    proto.producer_version = __version__
    set_metadata(proto, build_metadata(model, profile, specs, weight_only, manifest))
    return proto, found, weight_only


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------


def _externalise(proto: ModelProto, folder: Path, threshold: int) -> bool:
    """Move initializers into one page-aligned ``model.onnx_data`` when they total ≥ ``threshold``."""
    big = [t for t in proto.graph.initializer if len(t.raw_data) >= TENSOR_THRESHOLD]
    if not big or sum(len(t.raw_data) for t in big) < threshold:
        return False
    with (folder / DATA_FILE).open("wb") as handle:
        offset = 0
        for tensor in big:
            pad = (-offset) % PAGE
            handle.write(b"\0" * pad)
            offset += pad
            data = tensor.raw_data
            handle.write(data)
            onnx.external_data_helper.set_external_data(tensor, DATA_FILE, offset, len(data))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            offset += len(data)
    return True


def file_entry(path: Path, base: Path) -> dict[str, Any]:
    """``{name, sha256, bytes}`` of a file, ``name`` relative to ``base`` (manifest FileEntry)."""
    with path.open("rb") as handle:
        digest = hashlib.file_digest(handle, "sha256")
    return {
        "name": path.relative_to(base).as_posix(),
        "sha256": digest.hexdigest(),
        "bytes": path.stat().st_size,
    }


def save_onnx(proto: ModelProto, folder: Path, external: bool | None = None) -> list[Path]:
    """Write ``folder/model.onnx`` (+ ``model.onnx_data``); ``external`` forces/forbids external data."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in (folder / MODEL_FILE, folder / DATA_FILE):
        stale.unlink(missing_ok=True)
    saved = proto
    if external is not False:
        saved = ModelProto()
        saved.CopyFrom(proto)
        if not _externalise(saved, folder, 0 if external else EXTERNAL_THRESHOLD):
            saved = proto
    onnx.save_model(saved, str(folder / MODEL_FILE))
    return [p for p in (folder / MODEL_FILE, folder / DATA_FILE) if p.exists()]


def export_model(
    model: nn.Module,
    targets: Sequence[Any],
    profile: ChipProfile,
    folder: str | Path,
    manifest: Any = None,
    base: str | Path | None = None,
    external: bool | None = None,
) -> ExportResult:
    """Export ``model`` to ``folder/model.onnx`` with AnalogMatMul nodes for the analog ``targets``."""
    start = time.perf_counter()
    folder = Path(folder)
    proto, found, weight_only = build_onnx(model, targets, profile, manifest)
    paths = save_onnx(proto, folder, external)
    base_dir = Path(base) if base is not None else folder
    return ExportResult(
        model_path=folder / MODEL_FILE,
        model_name=(folder / MODEL_FILE).relative_to(base_dir).as_posix(),
        files=[file_entry(p, base_dir) for p in paths],
        analog_nodes=len(analog_op.analog_nodes(proto)),
        analog_tensors=[*found, *weight_only],
        seconds=time.perf_counter() - start,
        metadata={p.key: p.value for p in proto.metadata_props},
    )


def export_bundle_onnx(
    bundle_dir: str | Path, model: nn.Module, manifest: Any, progress: bool = False
) -> dict:
    """Export the (transformed) in-memory ``model`` of a bundle to ``bundle_dir/onnx/model.onnx``.

    ``manifest``: the bundle's Manifest (or its dict); its profile, and its per-tensor placement (read
    back, not re-planned) decides what is analog. Returns ``{"files": [FileEntry dicts, names relative
    to bundle_dir], "onnx": summary}``: append ``files`` to ``manifest.files`` and store ``onnx`` under
    ``manifest.extra["onnx"]``.
    """
    if isinstance(manifest, dict):
        manifest = Manifest.model_validate(manifest)
    chip = manifest_profile(manifest)
    targets = model_placement(model, placement_from_manifest(manifest), chip).analog()
    if progress:
        LOGGER.info("exporting ONNX (%d analog tensors) ...", len(targets))
    folder = Path(bundle_dir)
    result = export_model(model, targets, chip, folder / ONNX_DIR, manifest=manifest, base=folder)
    return {"files": result.files, "onnx": result.to_dict()}


__all__ = [
    "ExportKernel",
    "ExportResult",
    "LogitsModel",
    "analog_specs",
    "build_onnx",
    "export_bundle_onnx",
    "export_model",
    "file_entry",
    "save_onnx",
]
