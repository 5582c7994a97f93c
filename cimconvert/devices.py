"""Where torch computes: ``--device`` and ``--dtype`` resolved once, with one-line errors.

Every command that runs a model (convert's calibration, eval, analyze, validate's torch side, finetune)
takes ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``: the GPU when one is visible, else the CPU) and
``dtype`` (``float32``, ``bfloat16``, ``float16``) and calls :func:`resolve_device` / :func:`resolve_dtype`
before loading anything. Under a ``torchrun`` launch, ``cuda`` means this rank's GPU (``LOCAL_RANK``).
Inputs follow the model with :func:`to_model_device`. The chip simulator needs nothing from here: it
draws where the weights live (docs/SIMULATOR.md, "Devices").
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cimconvert.errors import CimError

#: The values ``--device`` accepts (``cuda:N`` for any index N).
DEVICE_CHOICES = ("cpu", "cuda", "cuda:N", "auto")
#: ``--dtype`` name → torch dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DEVICE = "cpu"
DEFAULT_DTYPE = "float32"


def _cuda_index(spec: str) -> int | None:
    """The index of ``cuda:N`` (None for a bare ``cuda``); CimError for anything else after ``cuda:``."""
    if spec == "cuda":
        return None
    index = spec.removeprefix("cuda:")
    if not index.isdigit():
        raise CimError(f"--device {spec}: expected one of {', '.join(DEVICE_CHOICES)}")
    return int(index)


def _local_rank() -> int:
    """This process's index on its node under ``torchrun`` (0 without a launcher)."""
    value = os.environ.get("LOCAL_RANK", "0")
    return int(value) if value.isdigit() else 0


def _cuda_device(spec: str) -> torch.device:
    """``cuda`` / ``cuda:N`` checked against the GPUs this process sees."""
    index = _cuda_index(spec)
    if not torch.cuda.is_available():
        build = "no GPU is visible" if torch.version.cuda else f"torch {torch.__version__} is a CPU build"
        raise CimError(f"--device {spec}: {build} (use --device cpu or auto; a CUDA build of torch: "
                       "CIMCONVERT_TORCH=cuda scripts/setup.sh)")  # fmt: skip
    count = torch.cuda.device_count()
    index = _local_rank() % count if index is None else index
    if index >= count:
        raise CimError(f"--device {spec}: no such GPU (this machine has {count}: cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def resolve_device(spec: str | torch.device | None = None) -> torch.device:
    """The torch device of ``--device`` (None: the CPU); CimError when it is unknown or not present."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or DEFAULT_DEVICE).strip().lower()
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "auto":
        return _cuda_device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda"):
        return _cuda_device(spec)
    raise CimError(f"--device {spec}: expected one of {', '.join(DEVICE_CHOICES)}")


def resolve_dtype(name: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The torch dtype of ``--dtype`` (None: float32), checked against ``device``."""
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    name = name or DEFAULT_DTYPE
    if name not in DTYPES:
        raise CimError(f"--dtype {name}: expected one of {', '.join(DTYPES)}")
    dtype = DTYPES[name]
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise CimError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} ({device}) has no bfloat16 "
                       "support; use --dtype float16 or float32")  # fmt: skip
    return dtype


def model_device(model: Any) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for models without torch parameters)."""
    parameters = getattr(model, "parameters", None)
    if not callable(parameters):
        return torch.device("cpu")
    first = next(iter(parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_model_device(tensor: torch.Tensor, model: Any) -> torch.Tensor:
    """``tensor`` on ``model``'s device (itself when it is already there)."""
    return tensor.to(model_device(model))


def place_model(
    model: torch.nn.Module, device: torch.device | None, dtype: torch.dtype | None
) -> torch.nn.Module:
    """Move ``model`` to ``device``, cast its floating-point tensors to ``dtype`` (in place; None: as is)."""
    if device is not None:
        model.to(device=device)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def describe(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """The ``device`` / ``dtype`` keys of a command's JSON result (docs/JSON.md)."""
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch.")}


def set_threads(threads: int | None) -> None:
    """torch's CPU threads, when given (None or 0: torch's current setting)."""
    if threads:
        torch.set_num_threads(threads)
