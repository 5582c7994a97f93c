"""Input side: find a Hugging Face checkpoint, validate it without loading it, stream its tensors.

A checkpoint is a local folder or a hub id already in the local Hugging Face cache (never downloaded).
Only safetensors weights are read; pickled checkpoints (``*.bin``, ``*.pt``, ``*.pth``) are refused
and never unpickled. Validation reads only the safetensors headers (8-byte length + JSON): corrupt or
truncated headers, files shorter than their offsets claim, an index naming a missing shard, and tensor
shapes that do not match what the config implies are one-line :class:`ModelInputError`\\ s. Tensor data
is read one tensor (``stream_tensors``) or one shard (``iter_shards``) at a time, with a NaN/Inf check.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cimconvert.arch import get_adapter, load_config, load_model_class, load_pretrained, supported_types
from cimconvert.errors import ModelInputError
from cimconvert.gguf import is_gguf_path, materialise, read_provenance

INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024
HASH_CHUNK = 8 * 1024 * 1024
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
#: Files copied through to a bundle next to config.json (tokenizer, generation config, chat template).
AUX_PATTERNS = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)

#: Files any one of which makes a folder's tokenizer loadable by ``AutoTokenizer``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")


def has_tokenizer(folder: str | Path) -> bool:
    """Whether ``folder`` holds tokenizer files (what calibration steps need)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


#: safetensors dtype string → (torch dtype, bytes per element).
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U64": (torch.uint64, 8),
    "U32": (torch.uint32, 4),
    "U16": (torch.uint16, 2),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
#: Storage formats a transformed model may be cast back to (8-bit floats are not: they need scales).
CASTABLE_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class TensorMeta:
    """One tensor as a safetensors header describes it (no data loaded)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    file: str
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor data in bytes."""
        return self.end - self.begin

    @property
    def torch_dtype(self) -> torch.dtype:
        """The torch dtype of the stored data."""
        return DTYPES[self.dtype][0]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed safetensors header: data start offset, file size, tensors in data order, metadata."""

    file: str
    data_start: int
    size: int
    tensors: tuple[TensorMeta, ...]
    metadata: dict[str, str]


@dataclass(frozen=True)
class SourceFile:
    """An input file with its size and sha256 (hex)."""

    name: str
    sha256: str
    bytes: int


def sha256_file(path: Path) -> str:
    """sha256 (hex) of a file."""
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _cached_blob_sha(path: Path) -> str | None:
    """The sha256 a Hugging Face cache blob is named by (LFS files), if ``path`` links to one."""
    if not path.is_symlink():
        return None
    target = path.resolve()
    if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return None


def _bad(path: Path, problem: str) -> ModelInputError:
    return ModelInputError(f"{path.name}: {problem}")


def _parse_entry(path: Path, name: str, entry: Any, data_len: int) -> TensorMeta:
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise _bad(path, f"corrupt safetensors header (entry '{name}' lacks dtype/shape/data_offsets)")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise _bad(path, f"tensor '{name}' has unsupported dtype {dtype!r}")
    valid_shape = isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)
    valid_offsets = (
        isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
    )
    if not valid_shape or not valid_offsets or not 0 <= offsets[0] <= offsets[1]:
        raise _bad(path, f"corrupt safetensors header (bad shape or offsets for '{name}')")
    numel = 1
    for dim in shape:
        numel *= dim
    if offsets[1] - offsets[0] != numel * DTYPES[dtype][1]:
        raise _bad(path, f"corrupt safetensors header ('{name}' offsets do not match shape {shape})")
    if offsets[1] > data_len:
        raise _bad(
            path,
            f"file is truncated: tensor '{name}' ends at byte {offsets[1]} of the data "
            f"but the file holds only {data_len} data bytes",
        )
    return TensorMeta(name, tuple(shape), dtype, path.name, offsets[0], offsets[1])


def read_header(path: Path) -> SafetensorsHeader:
    """Parse a safetensors header without reading tensor data; one-line error when corrupt/truncated."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise _bad(path, "truncated safetensors file (shorter than the 8-byte header length)")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _bad(path, f"corrupt safetensors header (claims {length} header bytes, file has {size})")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - length
    tensors = [_parse_entry(path, name, entry, data_len) for name, entry in header.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    return SafetensorsHeader(path.name, 8 + length, size, tuple(tensors), dict(metadata))


def check_finite(name: str, tensor: torch.Tensor, where: str = "") -> None:
    """Raise ModelInputError when a floating-point tensor holds NaN or Inf values."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        tensor = tensor.float()
    low, high = torch.aminmax(tensor.reshape(-1))  # NaN propagates, ±Inf shows up as an extreme
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    nan = int(torch.isnan(tensor).sum())
    inf = int(torch.isinf(tensor).sum())
    suffix = f" in {where}" if where else ""
    raise ModelInputError(f"tensor '{name}'{suffix} holds {nan} NaN and {inf} Inf values")


@dataclass
class SourceCheckpoint:
    """A validated safetensors checkpoint folder (see :func:`resolve_model`)."""

    dir: Path
    model_id: str
    config: dict[str, Any]
    model_type: str
    weight_files: list[str]
    aux_files: list[str]
    revision: str | None = None
    #: Provenance of a checkpoint dequantised from a GGUF file (``gguf_source.json``), else None.
    gguf: dict[str, Any] | None = None
    #: The GGUF file the checkpoint was dequantised from, when it was given as MODEL.
    gguf_file: Path | None = None
    #: What the manifest records as the source path instead of the folder (an in-memory model's label: the
    #: temporary folder it was saved to is gone after the conversion).
    recorded_path: str | None = None
    headers: dict[str, SafetensorsHeader] = field(default_factory=dict, repr=False)
    _sha: dict[str, str] = field(default_factory=dict, repr=False)

    # ----------------------------------------------------------------- metadata
    def tensor_shapes(self) -> dict[str, TensorMeta]:
        """Every tensor on disk (name → shape, dtype, file, offsets), from the headers only."""
        return {t.name: t for f in self.weight_files for t in self.headers[f].tensors}

    def storage_dtype(self) -> torch.dtype | None:
        """The float dtype holding most of the checkpoint's bytes among :data:`CASTABLE_DTYPES` (what a
        transformed model is stored in: a bf16 checkpoint stays bf16), or None without such tensors."""
        counts: dict[str, int] = {}
        for meta in self.tensor_shapes().values():
            if meta.dtype in CASTABLE_DTYPES:
                counts[meta.dtype] = counts.get(meta.dtype, 0) + meta.nbytes
        return DTYPES[max(counts, key=counts.__getitem__)][0] if counts else None

    @property
    def origin_path(self) -> Path:
        """What the user's MODEL resolved to: the GGUF file when one was given, else the folder."""
        return self.gguf_file or self.dir

    @property
    def input_files(self) -> list[str]:
        """config.json, the index (if any), every weight shard and the copied auxiliary files."""
        index = [INDEX_NAME] if (self.dir / INDEX_NAME).is_file() else []
        return [CONFIG_NAME, *index, *self.weight_files, *self.aux_files]

    def file_sha256(self, name: str) -> str:
        """sha256 of one input file (cached; HF cache blobs are named by it, local files are read)."""
        if name not in self._sha:
            path = self.dir / name
            self._sha[name] = _cached_blob_sha(path) or sha256_file(path)
        return self._sha[name]

    def files(self) -> list[SourceFile]:
        """Every input file with its sha256 and size (hashes computed on first use)."""
        return [SourceFile(n, self.file_sha256(n), (self.dir / n).stat().st_size) for n in self.input_files]

    # ----------------------------------------------------------------- data
    def stream_tensors(
        self, finite_check: bool = True, pool: Executor | None = None
    ) -> Iterator[tuple[TensorMeta, torch.Tensor]]:
        """Yield ``(meta, raw)`` for every tensor, one at a time, in file and data order.

        ``raw`` is a flat uint8 tensor holding the stored bytes (:func:`as_tensor` gives the typed
        view). It lives in one reused buffer and is valid only until the next item: clone to keep it.
        Each file is read sequentially exactly once and hashed on the way (in ``pool`` when given, in
        parallel with the consumer), so the input sha256s come for free. Peak memory is one tensor.
        """
        sizes = [t.nbytes for f in self.weight_files for t in self.headers[f].tensors]
        buffer = torch.empty(max(sizes, default=0), dtype=torch.uint8)
        for name in self.weight_files:
            yield from self._stream_file(name, finite_check, buffer, pool)

    def _stream_file(
        self, name: str, finite_check: bool, buffer: torch.Tensor, pool: Executor | None
    ) -> Iterator[tuple[TensorMeta, torch.Tensor]]:
        header = self.headers[name]
        digest = hashlib.sha256()
        with (self.dir / name).open("rb") as handle:
            _read_hashed(handle, header.data_start, digest)
            pos = 0
            for meta in header.tensors:
                if meta.begin > pos:
                    _read_hashed(handle, meta.begin - pos, digest)
                raw = read_exact(handle, buffer[: meta.nbytes], self.dir / name)
                pending = pool.submit(digest.update, raw.numpy()) if pool is not None else None
                if pending is None:
                    digest.update(raw.numpy())
                pos = meta.end
                if finite_check and meta.dtype in FLOAT_DTYPES:
                    check_finite(meta.name, as_tensor(meta, raw), name)
                yield meta, raw
                if pending is not None:
                    pending.result()  # the buffer is reused for the next tensor
            while block := handle.read(HASH_CHUNK):
                digest.update(block)
        self._sha[name] = digest.hexdigest()

    def iter_shards(self, finite_check: bool = True) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """Yield ``(file, {name: tensor})`` one shard at a time (memory-mapped via ``safe_open``)."""
        from safetensors import safe_open

        for name in self.weight_files:
            tensors: dict[str, torch.Tensor] = {}
            with safe_open(str(self.dir / name), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    tensor = handle.get_tensor(key)
                    if finite_check:
                        check_finite(key, tensor, name)
                    tensors[key] = tensor
            yield name, tensors

    def load_model(self, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The full Hugging Face model in eval mode (DeepSeek v1 through the arch helper)."""
        return load_hf_model(self.dir, self.model_type, dtype)

    def check_shapes(self) -> None:
        """Compare on-disk tensors with the shapes the config implies (model built on ``meta``)."""
        model = build_meta_model(self.dir, self.model_type)
        check_shapes_against(model, self.tensor_shapes())
        check_dtypes_against(model, self.tensor_shapes())


def check_weights_finite(net: torch.nn.Module) -> torch.nn.Module:
    """Return ``net``, or raise ModelInputError naming the first parameter or buffer with NaN/Inf."""
    for pname, tensor in net.state_dict().items():
        check_finite(pname, tensor)
    return net


def as_tensor(meta: TensorMeta, raw: torch.Tensor) -> torch.Tensor:
    """View raw bytes (flat uint8) as the typed tensor ``meta`` describes (no copy)."""
    if meta.nbytes == 0:
        return torch.empty(meta.shape, dtype=meta.torch_dtype)
    return raw.view(meta.torch_dtype).reshape(meta.shape)


def read_exact(handle: Any, buf: torch.Tensor, path: Path) -> torch.Tensor:
    """Fill the uint8 buffer ``buf`` from ``handle`` (a one-line error naming ``path`` if the file ends)."""
    if buf.numel() and handle.readinto(buf.numpy()) != buf.numel():
        raise _bad(path, "file is truncated while reading tensor data")
    return buf


def _read_hashed(handle: Any, nbytes: int, digest: Any) -> None:
    while nbytes > 0:
        block = handle.read(min(nbytes, HASH_CHUNK))
        if not block:
            return
        digest.update(block)
        nbytes -= len(block)


# --------------------------------------------------------------------- resolving
def _looks_like_hub_id(model: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", model)) and ".." not in model


def _from_cache(model: str, revision: str | None) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model, revision=revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, HFValidationError, offline errors, ...
        raise ModelInputError(
            f"model '{model}' is not a local folder and not in the local Hugging Face cache "
            "(no download is attempted; download it first or pass a folder)"
        ) from None


def _locate(model: str, revision: str | None) -> tuple[Path, str | None]:
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelInputError(f"model path {path} is a file; expected a model folder")
        return path.resolve(), None
    if _looks_like_hub_id(model):
        folder = _from_cache(model, revision)
        return folder, folder.name
    raise ModelInputError(f"model folder not found: {path}")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ModelInputError(f"no config.json in {folder}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelInputError(f"config.json in {folder} is not valid JSON (line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelInputError(f"cannot read config.json in {folder}: {exc}") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ModelInputError(f"config.json in {folder} has no 'model_type'")
    _refuse_remote_code(config, folder)
    return config


def _refuse_remote_code(config: dict[str, Any], folder: Path) -> None:
    """One clear line for a model type that exists only as the checkpoint's own Python code."""
    model_type = config["model_type"]
    if "auto_map" in config and model_type not in supported_types():
        raise ModelInputError(
            f"unsupported model type '{model_type}' in {folder}: its config.json asks for the checkpoint's "
            f"own Python code (auto_map), which cimconvert never runs "
            f"(supported: {', '.join(supported_types())})"
        )


def _read_index(folder: Path) -> list[str]:
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise ModelInputError(f"{INDEX_NAME} in {folder} is corrupt (no valid weight_map)") from None
    for shard in shards:
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise ModelInputError(f"{INDEX_NAME} names an invalid shard path {shard!r}")
        if not (folder / shard).is_file():
            raise ModelInputError(f"{INDEX_NAME} names shard {shard}, which is missing from {folder}")
    return shards


def _weight_files(folder: Path) -> list[str]:
    if (folder / INDEX_NAME).is_file():
        return _read_index(folder)
    files = sorted(p.name for p in folder.glob("*.safetensors") if p.is_file())
    preferred = [f for f in files if f.startswith("model")]
    if preferred or files:
        return preferred or files
    pickled = sorted({p.name for pat in PICKLE_PATTERNS for p in folder.glob(pat)})
    if pickled:
        raise ModelInputError(
            f"{folder} holds only pickled weights ({pickled[0]}); pickled checkpoints are not loaded "
            "(unsafe): convert to safetensors"
        )
    raise ModelInputError(f"no *.safetensors weights in {folder}")


def _check_index_consistency(folder: Path, headers: dict[str, SafetensorsHeader]) -> None:
    path = folder / INDEX_NAME
    if not path.is_file():
        return
    weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    names = {f: {t.name for t in h.tensors} for f, h in headers.items()}
    for tensor, shard in weight_map.items():
        if tensor not in names[shard]:
            raise ModelInputError(f"{INDEX_NAME} puts tensor '{tensor}' in {shard}, which does not hold it")


def _read_headers(folder: Path, files: list[str]) -> dict[str, SafetensorsHeader]:
    headers = {f: read_header(folder / f) for f in files}
    seen: dict[str, str] = {}
    for name, header in headers.items():
        for meta in header.tensors:
            if meta.name in seen:
                raise ModelInputError(f"tensor '{meta.name}' appears in both {seen[meta.name]} and {name}")
            seen[meta.name] = name
    return headers


def _locate_gguf(model: str, dtype: str | None, progress: bool) -> tuple[Path, Path] | None:
    """(dequantised folder, GGUF file) when ``model`` is a GGUF file or a folder holding one."""
    path = Path(model).expanduser()
    if not path.exists() or not is_gguf_path(path):
        if dtype is not None:
            raise ModelInputError("--dtype applies to GGUF input only (the model is not a .gguf file)")
        return None
    return materialise(path, dtype, progress)


def resolve_model(
    model: str | Path,
    revision: str | None = None,
    check_shapes: bool = True,
    dtype: str | None = None,
    progress: bool = True,
) -> SourceCheckpoint:
    """Find and validate a checkpoint: a local folder, a GGUF file, or a hub id from the local HF cache.

    A ``.gguf`` file (or a folder holding one and no config.json) is dequantised to ``dtype``
    (default: its own float type, float32 for quantised files) into a temporary checkpoint folder first
    (:mod:`cimconvert.gguf`); the result records the GGUF's provenance.

    Checks config.json (parseable, has ``model_type``), refuses pickled-only checkpoints, parses every
    safetensors header (corrupt/truncated files), checks the index names only present shards, and
    (``check_shapes``) compares tensor shapes with a ``meta``-device model built from the config.
    No tensor data is read. Raises ModelInputError with a one-line message.
    """
    gguf = _locate_gguf(str(model), dtype, progress)
    folder, cache_revision = (gguf[0], None) if gguf else _locate(str(model), revision)
    config = _read_config(folder)
    files = _weight_files(folder)
    headers = _read_headers(folder, files)
    _check_index_consistency(folder, headers)
    aux = sorted(p for p in AUX_PATTERNS if (folder / p).is_file())
    source = SourceCheckpoint(
        dir=folder,
        model_id=str(model),
        config=config,
        model_type=config["model_type"],
        weight_files=files,
        aux_files=aux,
        revision=revision or cache_revision,
        gguf=read_provenance(folder),
        gguf_file=gguf[1] if gguf else None,
        headers=headers,
    )
    if check_shapes:
        source.check_shapes()
    return source


# --------------------------------------------------------------------- models and shapes
def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def build_meta_model(folder: Path, model_type: str) -> torch.nn.Module:
    """The model the config describes, on the ``meta`` device (no memory, no weights).

    Goes through the arch registry (unsupported ``model_type`` → ModelInputError naming the supported
    ones; DeepSeek v1 through our own module).
    """
    get_adapter(model_type)
    config = load_config(folder)
    cls = load_model_class(config)
    try:
        with torch.device("meta"):
            return cls(config)
    except Exception as exc:  # any config value the model cannot be built from (e.g. hidden_size 0)
        raise ModelInputError(f"cannot build model type '{model_type}': {_first_line(exc)}") from None


def load_hf_model(
    folder: Path,
    model_type: str,
    dtype: torch.dtype = torch.float32,
    expected_key_changes: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> torch.nn.Module:
    """Load a model folder (a checkpoint or a bundle) with its weights, in eval mode.

    Library code only (the registered class; DeepSeek v1 through our own module) and strict keys, except
    ``expected_key_changes`` = (missing, unexpected) keys that a recorded transform re-loads itself.
    Remote code never runs.
    """
    get_adapter(model_type)
    missing, unexpected = expected_key_changes
    model = load_pretrained(folder, dtype=dtype, expected_missing=missing, expected_unexpected=unexpected)
    return model.eval()


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def expected_shapes(model: torch.nn.Module) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """Shapes the config implies, under every accepted on-disk name; plus the required tensors.

    Accepted names: in-memory parameter names (fused 3-D experts, tied weights included) and the
    names ``save_pretrained`` writes (per-expert keys, Mixtral's legacy ``block_sparse_moe`` keys).
    ``required`` maps each saved in-memory tensor to its on-disk alternatives (one of which must exist).
    """
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    accepted = {k: tuple(v.shape) for k, v in state.items()}
    saved = remove_tied_weights_from_state_dict(dict(state), model)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        saved.pop(key, None)
    try:
        reverted = revert_weight_conversion(model, dict(saved))
        accepted.update({k: tuple(v.shape) for k, v in reverted.items()})
    except Exception:  # a conversion that cannot run on meta tensors: accept in-memory names only
        reverted = {}
    required: dict[str, list[str]] = {}
    for key, value in saved.items():
        if key in reverted:
            required[key] = [key]
            continue
        try:
            required[key] = list(revert_weight_conversion(model, {key: value}))
        except Exception:
            required[key] = [key]
    return accepted, required


def check_shapes_against(model: torch.nn.Module, tensors: dict[str, TensorMeta]) -> None:
    """Raise ModelInputError naming the first tensor whose shape differs from the config's, or a
    tensor the config needs that the checkpoint lacks. Extra on-disk tensors are allowed."""
    accepted, required = expected_shapes(model)
    for name, meta in tensors.items():
        want = accepted.get(name)
        if want is not None and tuple(meta.shape) != want:
            raise ModelInputError(
                f"tensor '{name}' in {meta.file} has shape {_fmt(meta.shape)} "
                f"but the config implies {_fmt(want)}"
            )
    for key, alternatives in required.items():
        if key in tensors or all(alt in tensors for alt in alternatives):
            continue
        missing = next(alt for alt in alternatives if alt not in tensors)
        raise ModelInputError(f"checkpoint lacks tensor '{missing}' that the config implies")


def check_dtypes_against(model: torch.nn.Module, tensors: dict[str, TensorMeta]) -> None:
    """Raise ModelInputError for an on-disk tensor whose dtype family differs from the config's model:
    a floating-point parameter stored as an integer or boolean type (e.g. BF16 data labelled I16, which
    has the same width and would pass every size check), or an integer buffer stored as a float."""
    state = model.state_dict()
    accepted, _ = expected_shapes(model)
    for name, meta in tensors.items():
        if name not in accepted:
            continue
        want_float = state[name].is_floating_point() if name in state else True  # on-disk-only names: weights
        if want_float != (meta.dtype in FLOAT_DTYPES):
            family = "floating-point" if want_float else "integer"
            raise ModelInputError(
                f"tensor '{name}' in {meta.file} has dtype {meta.dtype}, but the config implies a "
                f"{family} tensor (wrong dtype in the safetensors header?)"
            )
