"""A model whose decoder layers live on disk: the skeleton on ``meta``, one layer materialised at a time.

:class:`LayerwiseModel` builds the causal-LM class of a checkpoint with ``accelerate.init_empty_weights``
(parameters on the ``meta`` device, buffers such as rotary frequencies computed for real), loads the
*resident* tensors (embeddings, final norm, lm_head: every tensor outside the decoder layers) and then
materialises one decoder layer at a time from the safetensors shards (``safe_open``): on-disk keys map to
in-memory parameters through the architecture adapter (``memory_name``; per-expert keys fill their slice
of the fused ``[E, out, in]`` tensor, ``expert_key``). Tensors are loaded as float32, as the whole-model
path loads them, so both paths compute the same numbers. :meth:`LayerwiseModel.free_layer` puts the
layer's parameters back on ``meta``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from cimconvert.arch import get_adapter, load_config, load_model_class
from cimconvert.arch.base import ArchAdapter, ExpertKey
from cimconvert.checkpoint import SourceCheckpoint, TensorMeta, as_tensor, check_finite, read_exact
from cimconvert.errors import ModelInputError

#: Bytes per element of the float32 parameters a layer is materialised in.
FLOAT32_BYTES = 4


def build_skeleton(source: SourceCheckpoint) -> nn.Module:
    """The checkpoint's causal LM with every parameter on ``meta`` (buffers real, float32), eval mode."""
    config = load_config(source.dir)
    config.dtype = torch.float32
    cls = load_model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls(config)
    return model.eval()


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter ``name`` of ``model`` by ``value`` (no gradient)."""
    path, _, attr = name.rpartition(".")
    module = model.get_submodule(path) if path else model
    module._parameters[attr] = nn.Parameter(value, requires_grad=False)


def expert_rows(key: ExpertKey, fused: torch.Tensor) -> tuple[int, slice]:
    """Expert index and the rows of ``fused`` that a per-expert key fills (gate: first half, up: second)."""
    if key.role == "down":
        return key.expert, slice(None)
    half = fused.shape[1] // 2
    return key.expert, slice(0, half) if key.role == "gate" else slice(half, 2 * half)


@dataclass
class LayerwiseModel:
    """A checkpoint run one decoder layer at a time (see the module docstring).

    ``device``: where materialised tensors and activations live (default CPU).
    """

    source: SourceCheckpoint
    adapter: ArchAdapter
    model: nn.Module
    device: torch.device
    layer_keys: dict[int, list[TensorMeta]] = field(default_factory=dict)
    resident_keys: list[TensorMeta] = field(default_factory=list)

    @classmethod
    def open(cls, source: SourceCheckpoint, device: torch.device | str = "cpu") -> LayerwiseModel:
        """The skeleton of ``source`` with its resident tensors loaded (no decoder layer yet)."""
        adapter = get_adapter(source.model_type)
        keys: dict[int, list[TensorMeta]] = defaultdict(list)
        resident = []
        for meta in source.tensor_shapes().values():
            index = adapter.layer_index(meta.name)
            (keys[index] if index is not None else resident).append(meta)
        lw = cls(source, adapter, build_skeleton(source), torch.device(device), dict(keys), resident)
        lw._load_resident()
        return lw

    # ------------------------------------------------------------------ layout
    @property
    def layers(self) -> nn.ModuleList:
        """The decoder-layer list of the skeleton."""
        return self.adapter.layers(self.model)

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return len(self.layers)

    def layer_prefix(self, index: int) -> str:
        """Parameter-name prefix of decoder layer ``index`` (``model.layers.3.``)."""
        return f"{self.adapter.layers_path}.{index}."

    def layer_parameters(self, index: int) -> dict[str, nn.Parameter]:
        """Full parameter names → parameters of decoder layer ``index``."""
        prefix = self.layer_prefix(index)
        return {prefix + name: p for name, p in self.layers[index].named_parameters()}

    def layer_bytes(self, index: int) -> int:
        """Bytes decoder layer ``index`` takes when materialised (float32)."""
        return sum(p.numel() for p in self.layer_parameters(index).values()) * FLOAT32_BYTES

    def largest_layer_bytes(self) -> int:
        """Bytes of the largest decoder layer (float32)."""
        return max((self.layer_bytes(i) for i in range(self.num_layers)), default=0)

    # ------------------------------------------------------------------ loading
    def read_stored(self, metas: Iterable[TensorMeta]) -> Iterator[tuple[TensorMeta, torch.Tensor]]:
        """``(meta, tensor as stored: its dtype, on the CPU)`` for each of ``metas``, one at a time, with a
        NaN/Inf check.

        Plain reads at the header's offsets into a fresh buffer (no memory map, whose touched pages would
        stay in the resident set until the file is closed).
        """
        by_file: dict[str, list[TensorMeta]] = defaultdict(list)
        for meta in metas:
            by_file[meta.file].append(meta)
        for file, group in by_file.items():
            start, path = self.source.headers[file].data_start, self.source.dir / file
            with path.open("rb") as handle:
                for meta in sorted(group, key=lambda m: m.begin):
                    handle.seek(start + meta.begin)
                    raw = read_exact(handle, torch.empty(meta.nbytes, dtype=torch.uint8), path)
                    tensor = as_tensor(meta, raw)
                    check_finite(meta.name, tensor, file)
                    yield meta, tensor

    def _read(self, metas: Iterable[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
        """``(key, float32 tensor on device)`` for each of ``metas`` (:meth:`read_stored`)."""
        for meta, tensor in self.read_stored(metas):
            dtype = torch.float32 if tensor.is_floating_point() else None
            yield meta.name, tensor.to(self.device, dtype)

    def _assign(self, params: dict[str, nn.Parameter], metas: list[TensorMeta], where: str) -> None:
        """Load ``metas`` into the parameters ``params`` (full names); every parameter must be filled.

        Tensors are read one at a time; a per-expert key is copied into its fused tensor right away, so
        the peak is the layer plus one on-disk tensor.
        """
        fused: dict[str, torch.Tensor] = {}
        filled: set[str] = set()
        for key, tensor in self._read(metas):
            expert = self.adapter.expert_key(key)
            name = self.memory_name(key)
            if name not in params:
                continue  # extra on-disk tensors are allowed, as in the whole-model load
            if expert is None:
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise ModelInputError(f"tensor '{key}' has shape {list(tensor.shape)}, the model expects "
                                          f"{list(params[name].shape)}")  # fmt: skip
                _set_parameter(self.model, name, tensor)
            else:
                if name not in fused:
                    fused[name] = torch.zeros(params[name].shape, dtype=torch.float32, device=self.device)
                index, rows = expert_rows(expert, fused[name])
                fused[name][index, rows] = tensor
            filled.add(name)
        for name, tensor in fused.items():
            _set_parameter(self.model, name, tensor)
        missing = sorted(set(params) - filled)
        if missing:
            raise ModelInputError(f"checkpoint lacks tensor '{missing[0]}' of {where}")

    def _load_resident(self) -> None:
        """Load every parameter outside the decoder layers (lm_head tied to the embedding if configured)."""
        prefix = f"{self.adapter.layers_path}."
        params = {n: p for n, p in self.model.named_parameters() if not n.startswith(prefix)}
        tied = self.adapter.tied_embeddings(self.model.config)
        head = f"{self.adapter.lm_head}.weight"
        if tied:
            params = {n: p for n, p in params.items() if n != head}
        self._assign(params, self.resident_keys, "the embeddings / head")
        if tied:
            self.model.tie_weights()
            if self.model.get_parameter(head).is_meta:
                raise ModelInputError("tied lm_head could not be tied to the input embedding")

    def load_layer(self, index: int, names: Iterable[str] | None = None) -> nn.Module:
        """Materialise decoder layer ``index`` from the shards (float32 on ``device``); returns the layer.

        ``names``: reload only these parameters (full names), e.g. the ones a noise draw programmed.
        """
        params = self.layer_parameters(index)
        metas = self.layer_keys.get(index, [])
        if names is not None:
            wanted = set(names)
            params = {n: p for n, p in params.items() if n in wanted}
            metas = [m for m in metas if self.memory_name(m.name) in wanted]
        self._assign(params, metas, f"decoder layer {index}")
        return self.layers[index]

    def spill(self, names: Iterable[str], path: Path) -> None:
        """Write the current values of parameters ``names`` (full in-memory names) to ``path`` (safetensors,
        their dtype): a transformed layer's working copy, read back by :meth:`unspill` after a noise draw
        programmed them in place (no clean copy in memory)."""
        params = dict(self.model.named_parameters())
        save_file({name: params[name].detach().to("cpu").contiguous() for name in names}, str(path))

    def unspill(self, path: Path, names: Iterable[str]) -> None:
        """Set parameters ``names`` to the values :meth:`spill` wrote to ``path`` (on ``device``)."""
        with safe_open(str(path), framework="pt", device=str(self.device)) as handle:
            for name in names:
                _set_parameter(self.model, name, handle.get_tensor(name))

    def memory_name(self, key: str) -> str:
        """The in-memory parameter an on-disk key loads into (fused tensor for a per-expert key)."""
        expert = self.adapter.expert_key(key)
        return expert.memory_name if expert is not None else self.adapter.memory_name(key)

    def free_layer(self, index: int) -> None:
        """Put decoder layer ``index``'s parameters back on ``meta`` (its memory is released)."""
        for name, param in self.layer_parameters(index).items():
            _set_parameter(self.model, name, torch.empty_like(param, device="meta"))

    def resident_names(self) -> set[str]:
        """Names of the parameters outside the decoder layers."""
        prefix = f"{self.adapter.layers_path}."
        return {n for n, _ in self.model.named_parameters() if not n.startswith(prefix)}


def analog_of_layer(targets: Iterable[Any], prefix: str) -> list[Any]:
    """The analog targets whose names start with ``prefix`` (one decoder layer's)."""
    return [t for t in targets if str(t.name).startswith(prefix)]


__all__ = ["FLOAT32_BYTES", "LayerwiseModel", "analog_of_layer", "build_skeleton", "expert_rows"]
