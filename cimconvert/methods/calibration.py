"""Calibration text → token batches, shared by every method that fits something on unlabelled text.

Options (declared once here so the CLI shows each flag once, whichever methods use it):
``calib_data`` (a shipped corpus name such as ``calib`` or a UTF-8 text file; the convert command's
``--dataset``, formerly ``--calib-data``), ``--calib-samples``
(number of sequences) and ``--calib-seq-len`` (tokens per sequence). The sequences are consecutive,
non-overlapping windows from the start of the text, so a calibration set is reproducible and never
overlaps the held-out evaluation text when the two corpora are disjoint (``calib`` / ``heldout``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cimconvert.analog.experts import observe
from cimconvert.analog.patch import AnalogPatch, CleanKernel
from cimconvert.analog.routes import owner_of, route_of
from cimconvert.datasets import load_text, token_ids
from cimconvert.errors import CimError
from cimconvert.layerwise.skeleton import analog_of_layer
from cimconvert.methods.base import MethodOption
from cimconvert.placement import Placement, TensorInfo, current_placement
from cimconvert.profiles import ChipProfile

if TYPE_CHECKING:
    from cimconvert.methods.base import MethodOption

DEFAULT_CALIB_DATA = "calib"
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_CALIB_SEQ_LEN = 256


def calibration_options() -> tuple[MethodOption, ...]:
    """The shared ``calib_data`` (``--dataset``) / ``--calib-samples`` / ``--calib-seq-len`` options."""
    return (
        MethodOption(
            "calib_data", str, DEFAULT_CALIB_DATA,
            "calibration text: a shipped corpus name (calib, heldout, wikitext2, ...) or a UTF-8 text file",
        ),
        MethodOption("calib_samples", int, DEFAULT_CALIB_SAMPLES, "number of calibration sequences",
                     minimum=1),
        MethodOption("calib_seq_len", int, DEFAULT_CALIB_SEQ_LEN, "tokens per calibration sequence",
                     minimum=2),
    )  # fmt: skip


def calibration_batches(
    text: str, tokenizer: Any, samples: int, seq_len: int, name: str = "text"
) -> torch.Tensor:
    """``samples`` consecutive windows of ``seq_len`` tokens from ``text`` as a ``[samples, seq_len]`` tensor.

    ``tokenizer`` is any Hugging Face style callable returning ``{"input_ids": [...]}``. Raises a
    one-line CimError when the options are out of range or the text is too short.
    """
    if samples < 1:
        raise CimError(f"--calib-samples must be at least 1 (got {samples})")
    if seq_len < 2:
        raise CimError(f"--calib-seq-len must be at least 2 (got {seq_len})")
    need = samples * seq_len
    ids = token_ids(tokenizer, text, need)
    if ids.numel() < need:
        raise CimError(
            f"calibration data '{name}' has {ids.numel()} tokens, too short for --calib-samples {samples} x "
            f"--calib-seq-len {seq_len} = {need} tokens"
        )
    return ids.view(samples, seq_len)


def resolve_tokenizer(model: torch.nn.Module, options: dict[str, Any]) -> Any:
    """The tokenizer for calibration: ``options["tokenizer"]`` (object or folder), else the model's folder."""
    given = options.get("tokenizer")
    if given is not None and not isinstance(given, str):
        return given
    folder = given or getattr(model, "name_or_path", "") or getattr(model.config, "_name_or_path", "")
    if not folder:
        raise CimError("calibration needs a tokenizer: the model was not loaded from a folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise CimError(
            f"calibration needs a tokenizer; none usable in {folder}: {str(exc).splitlines()[0]}"
        ) from None


def calibration_tokens(model: torch.nn.Module, options: dict[str, Any]) -> torch.Tensor:
    """Calibration batches ``[samples, seq_len]`` for ``model`` from the ``calib_*`` options.

    ``options["calib_tokens"]`` (a LongTensor ``[samples, seq_len]``) bypasses tokenisation (API use).
    """
    given = options.get("calib_tokens")
    if given is not None:
        tokens = torch.as_tensor(given, dtype=torch.long)
        if tokens.dim() != 2 or tokens.shape[1] < 2:
            raise CimError(f"calib_tokens must be a [samples, seq_len] tensor (got {tuple(tokens.shape)})")
        return tokens

    data = str(options.get("calib_data", DEFAULT_CALIB_DATA))
    samples = int(options.get("calib_samples", DEFAULT_CALIB_SAMPLES))
    seq_len = int(options.get("calib_seq_len", DEFAULT_CALIB_SEQ_LEN))
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:  # e.g. the default 256 on a model with a shorter context
        warnings.warn(
            f"calibration sequences shortened from {seq_len} to the model's {max_pos} positions", stacklevel=2
        )
        seq_len = int(max_pos)
    tokenizer = resolve_tokenizer(model, options)
    return calibration_batches(load_text(data), tokenizer, samples, seq_len, name=data)


#: Calibration rows per forward of the whole-model steps (outlier maxima, output correction): their layer
#: steps batch the same way, so both paths draw the same per-MVM noise and write the same bundle.
CALIB_BATCH_SIZE = 8


def iter_batches(tokens: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Split ``[samples, seq_len]`` calibration tokens into batches of at most ``batch_size`` rows."""
    return list(torch.split(tokens, max(1, batch_size), dim=0))


def analog_parts(model: nn.Module, profile: ChipProfile,
                 placement: Placement | None) -> tuple[list[str], list[TensorInfo]]:  # fmt: skip
    """(module paths of the analog ``nn.Linear`` layers, the analog fused experts tensors) of ``model``, in
    placement order, from one placement of the model.

    Fused experts are not linear layers; GPT-2 ``Conv1D`` and weight-only modules (Mamba ``dt_proj``) are
    in neither list.
    """
    layers, experts = [], []
    for info in current_placement(model, profile, placement).analog():
        route = route_of(model, info.name)
        module_path, _, attr = info.name.rpartition(".")
        if route == "experts":
            experts.append(info)
        elif attr == "weight" and route == "linear" and type(model.get_submodule(module_path)) is nn.Linear:
            layers.append(module_path)
    return layers, experts


def analog_linear_layers(model: nn.Module, profile: ChipProfile, placement: Placement | None) -> list[str]:
    """Module paths of the analog ``nn.Linear`` layers of ``model`` (:func:`analog_parts`)."""
    return analog_parts(model, profile, placement)[0]


def analog_expert_tensors(
    model: nn.Module, profile: ChipProfile, placement: Placement | None
) -> list[TensorInfo]:
    """The analog fused experts tensors of ``model`` (:func:`analog_parts`)."""
    return analog_parts(model, profile, placement)[1]


def decoder_layers_only(lw: Any, step: str, profile: ChipProfile, placement: Placement | None) -> None:
    """CimError when an analog linear layer or experts tensor of the layer-by-layer model ``lw`` lies
    outside its decoder layers (an analog lm_head): ``step`` run layer by layer covers decoder layers only."""
    layers, experts = analog_parts(lw.model, profile, placement)
    names = [f"{name}.weight" for name in layers] + [info.name for info in experts]
    outside = [name for name in names if lw.adapter.layer_index(name) is None]
    if outside:
        raise CimError(f"layer by layer, {step} covers the decoder layers only, but "
                       f"'{outside[0].removesuffix('.weight')}' is analog: place it digital (--digital) or "
                       "convert with --whole-model")  # fmt: skip


def layer_targets(lw: Any, index: int, profile: ChipProfile,
                  placement: Placement | None) -> tuple[list[str], list[TensorInfo]]:  # fmt: skip
    """(analog linear layers, analog fused experts tensors) of decoder layer ``index`` of the
    layer-by-layer model ``lw`` under ``placement``."""
    prefix = lw.layer_prefix(index)
    layers, experts = analog_parts(lw.model, profile, placement)
    return [name for name in layers if name.startswith(prefix)], analog_of_layer(experts, prefix)


ExpertObserver = Callable[[str, int, torch.Tensor, torch.Tensor], None]


@contextmanager
def observed_experts(model: nn.Module, names: Sequence[str], observer: ExpertObserver) -> Iterator[None]:
    """While open, ``observer(tensor, expert, x, y)`` sees every projection of the fused tensors ``names``.

    The tensors are routed through the exact kernel; a noise patch opened inside takes them over (its
    binding is restored on close), so the observer then sees the simulated outputs.
    """
    wanted = set(names)
    patch = AnalogPatch(model, CleanKernel())
    removers: list[Callable[[], None]] = []
    try:
        owners: dict[str, nn.Module] = {}
        for name in names:
            patch.route(name)
            owner, path, _ = owner_of(model, name)
            owners[path] = owner
        for path, owner in owners.items():
            def relay(pname: str, expert: int, x: torch.Tensor, y: torch.Tensor, prefix: str = path) -> None:
                if f"{prefix}.{pname}" in wanted:
                    observer(f"{prefix}.{pname}", expert, x, y)

            removers.append(observe(owner, relay))
        yield
    finally:
        for remove in removers:
            remove()
        patch.close()
