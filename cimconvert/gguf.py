"""GGUF input: a llama.cpp ``.gguf`` file becomes a plain safetensors checkpoint folder.

transformers reads GGUF (config, tokenizer and dequantised tensors) through the ``gguf`` package, but a
model loaded that way refuses ``save_pretrained`` ("quantized with gguf and is not serializable"). So the
file is read once here: its header is checked with ``gguf.GGUFReader`` (magic, architecture, tensor
quantisation types, tokenizer) before anything heavy runs, then transformers dequantises the tensors, the
plain registered architecture is built from the config, the tensors are copied in (strict keys, so the
logits are those of the GGUF model) and saved as safetensors with the tokenizer and a provenance file
(``gguf_source.json``: the GGUF's sha256, quantisation types and the dequantised dtype). The folder is
written under a temporary name and renamed when complete, so a failed or interrupted run leaves nothing.

The rest of the pipeline reads that folder like any other checkpoint; ``checkpoint.resolve_model`` calls
:func:`materialise` for a ``.gguf`` path (or a folder holding one ``.gguf`` and no ``config.json``) and
the manifest records the provenance.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from cimconvert.arch import build_model, get_adapter
from cimconvert.devices import DTYPES
from cimconvert.errors import ModelInputError

LOGGER = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
GGUF_SUFFIX = ".gguf"
PROVENANCE_NAME = "gguf_source.json"
#: Storage dtypes a GGUF may be dequantised to (the ``--dtype`` names).
DEQUANT_DTYPES = DTYPES
#: GGUF ``general.file_type`` values whose weights are plain floats: kept in that float type by default.
_FLOAT_FILE_TYPES = {"ALL_F32": "float32", "MOSTLY_F16": "float16", "MOSTLY_BF16": "bfloat16"}
#: GGUF tensor types stored as plain numbers (no dequantisation needed).
_PLAIN_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file holds, from its header only (no tensor data read)."""

    file: str
    sha256: str
    bytes: int
    architecture: str
    model_type: str
    file_type: str
    tensor_types: dict[str, int] = field(default_factory=dict)
    dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        """Plain dict for ``gguf_source.json`` and the manifest."""
        return asdict(self)


def is_gguf_path(path: Path) -> bool:
    """True for a ``.gguf`` file, or a folder with no ``config.json`` that holds ``.gguf`` files."""
    if path.is_file():
        return path.suffix.lower() == GGUF_SUFFIX or _has_magic(path)
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob(f"*{GGUF_SUFFIX}"))


def find_gguf_file(path: Path) -> Path:
    """The GGUF file itself: ``path`` or the single ``.gguf`` in the folder ``path``."""
    if path.is_file():
        return path
    files = sorted(path.glob(f"*{GGUF_SUFFIX}"))
    if len(files) != 1:
        names = ", ".join(f.name for f in files[:4])
        raise ModelInputError(f"{path} holds {len(files)} .gguf files ({names}); pass the one to convert")
    return files[0]


def _has_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _field(reader: Any, key: str) -> Any:
    entry = reader.fields.get(key)
    return None if entry is None else entry.contents()


def _open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not _has_magic(path):
        raise ModelInputError(f"{path.name}: not a GGUF file (no GGUF magic bytes)")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors on bad files
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelInputError(f"{path.name}: corrupt or truncated GGUF file ({detail})") from None


def _model_type(architecture: str, name: str) -> str:
    """The transformers ``model_type`` transformers' GGUF loader maps an architecture to."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    model_type = architecture.replace("qwen2moe", "qwen2_moe").replace("qwen3moe", "qwen3_moe")
    if "llama" in architecture and "mistral" in name.lower():
        model_type = "mistral"
    if model_type not in GGUF_SUPPORTED_ARCHITECTURES:
        raise ModelInputError(
            f"GGUF architecture '{architecture}' is not supported by transformers' GGUF loader"
        )
    return model_type


def _check_quant_types(path: Path, types: Counter[str]) -> None:
    from gguf.quants import _type_traits

    dequantisable = _PLAIN_TYPES | {t.name for t in _type_traits}
    unsupported = sorted(t for t in types if t not in dequantisable)
    if unsupported:
        raise ModelInputError(
            f"{path.name}: GGUF quantisation type {', '.join(unsupported)} cannot be dequantised "
            "by the gguf package"
        )


def read_gguf_info(path: Path, dtype: str | None = None) -> GgufInfo:
    """Check a GGUF header (magic, architecture, quant types, tokenizer) and describe the file.

    ``dtype`` is the dequantisation target (``float32``/``float16``/``bfloat16``); default: the file's own
    float type for F32/F16/BF16 files, float32 for quantised ones. Raises ModelInputError (one line).
    """
    reader = _open_reader(path)
    architecture = _field(reader, "general.architecture")
    if not isinstance(architecture, str):
        raise ModelInputError(f"{path.name}: GGUF header has no general.architecture")
    model_type = _model_type(architecture, str(_field(reader, "general.name") or ""))
    get_adapter(model_type)  # unsupported by cimconvert → one line naming the supported types
    types = Counter(t.tensor_type.name for t in reader.tensors)
    if not types:
        raise ModelInputError(f"{path.name}: GGUF file holds no tensors")
    _check_quant_types(path, types)
    if _field(reader, "tokenizer.ggml.model") is None or _field(reader, "tokenizer.ggml.tokens") is None:
        raise ModelInputError(f"{path.name}: GGUF file has no tokenizer (tokenizer.ggml.* fields missing)")
    file_type = _file_type_name(_field(reader, "general.file_type"))
    chosen = dtype or _FLOAT_FILE_TYPES.get(file_type, "float32")
    if chosen not in DEQUANT_DTYPES:
        raise ModelInputError(f"--dtype {chosen!r} is not one of {', '.join(DEQUANT_DTYPES)}")
    return GgufInfo(
        file=path.name,
        sha256=_sha256(path),
        bytes=path.stat().st_size,
        architecture=architecture,
        model_type=model_type,
        file_type=file_type,
        tensor_types=dict(sorted(types.items())),
        dtype=chosen,
    )


def _file_type_name(value: Any) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(int(value)).name
    except (TypeError, ValueError):
        return "unknown"


def _load_dequantised(path: Path, dtype: torch.dtype) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """(config, tokenizer, state dict) of a GGUF file through transformers' GGUF support."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelInputError(f"{path.name}: cannot read the GGUF model ({detail})") from None
    state = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    return config, tokenizer, state


def _plain_model(config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The registered architecture built from the config, holding exactly the dequantised tensors."""
    config.dtype = dtype
    with torch.device("meta"):
        model = build_model(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelInputError(f"GGUF tensors do not match the {config.model_type} architecture: "
                              f"{str(exc).splitlines()[0]}") from None
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def dequantise_to_folder(
    path: Path, out: Path, dtype: str | None = None, progress: bool = True, info: GgufInfo | None = None
) -> GgufInfo:
    """Write the GGUF model at ``path`` as a safetensors checkpoint folder ``out`` (atomically).

    ``out`` must not exist. The folder holds config.json, model.safetensors, the tokenizer files from the
    GGUF and ``gguf_source.json``. ``info`` is the file's already checked header (read when not given).
    Returns the file's :class:`GgufInfo`.
    """
    info = info or read_gguf_info(path, dtype)
    torch_dtype = DEQUANT_DTYPES[info.dtype]
    if progress:
        LOGGER.info("dequantising %s (%s) to %s ...", path.name, info.file_type, info.dtype)
    config, tokenizer, state = _load_dequantised(path, torch_dtype)
    model = _plain_model(config, state, torch_dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.part-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a model folder is not
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE_NAME).write_text(json.dumps(info.to_json(), indent=2) + "\n", encoding="utf-8")
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


def read_provenance(folder: Path) -> dict[str, Any] | None:
    """The ``gguf_source.json`` of a folder written by :func:`dequantise_to_folder`, if any."""
    path = folder / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise ModelInputError(f"{PROVENANCE_NAME} in {folder} is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("sha256"), str):
        raise ModelInputError(f"{PROVENANCE_NAME} in {folder} has no sha256")
    return data


def materialise(path: Path, dtype: str | None = None, progress: bool = True) -> tuple[Path, Path]:
    """Dequantise a GGUF file (or a folder holding one) into a temporary checkpoint folder.

    The folder lives until the process exits. Returns (checkpoint folder, resolved GGUF file).
    """
    gguf_file = find_gguf_file(path).resolve()
    info = read_gguf_info(gguf_file, dtype)  # bad input fails before anything is written
    root = Path(tempfile.mkdtemp(prefix="cimconvert-gguf-"))
    atexit.register(shutil.rmtree, root, True)
    out = root / gguf_file.stem
    dequantise_to_folder(gguf_file, out, dtype, progress, info=info)
    return out, gguf_file
