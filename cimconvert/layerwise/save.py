"""A transformed copy of a checkpoint, written one decoder layer at a time (the bundle writer's input).

When layer-by-layer steps change weights or structure (outlier splits, folded output gains), each
decoder layer is saved as the steps left it, just before it is freed: one ``layer-NNNNN.safetensors``
per layer, under the names ``save_pretrained`` would give them. Tensors the checkpoint has keep their
on-disk key (a fused in-memory experts tensor goes back to its per-expert keys, gate and up halves
included); parameters a step created (``…q_proj.analog.weight``) get their in-memory name. As the
whole-model path stores a transformed model, float tensors take the checkpoint's storage dtype
(``SourceCheckpoint.storage_dtype``), except created tensors a step placed, which stay float32. The
resident tensors (embeddings, final norm, lm_head) are copied as stored.
:meth:`LayerCheckpointWriter.finish` adds the index, config.json and the tokenizer files and resolves the
folder as a checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors.torch import save_file

from cimconvert.bundle.writer import copy_through
from cimconvert.checkpoint import INDEX_NAME, SourceCheckpoint, resolve_model
from cimconvert.layerwise.skeleton import LayerwiseModel, expert_rows

RESIDENT_FILE = "resident.safetensors"


def layer_state(lw: LayerwiseModel, index: int, named: Collection[str] = ()) -> dict[str, torch.Tensor]:
    """Decoder layer ``index`` as it is now, keyed as on disk (CPU tensors; see the module docstring).

    ``named``: the parameters the steps created and placed (kept float32).
    """
    params = lw.layer_parameters(index)
    storage = lw.source.storage_dtype()
    state: dict[str, torch.Tensor] = {}
    stored: set[str] = set()
    for meta in lw.layer_keys.get(index, []):
        name = lw.memory_name(meta.name)
        if name not in params:  # a module a step replaced (its new parameters follow), or an extra key
            continue
        tensor = params[name].detach()
        expert = lw.adapter.expert_key(meta.name)
        if expert is not None:
            row, rows = expert_rows(expert, tensor)
            tensor = tensor[row, rows]
        state[meta.name] = _stored(tensor, storage)
        stored.add(name)
    for name, param in params.items():
        if name not in stored:
            state[name] = _stored(param.detach(), torch.float32 if name in named else storage)
    return state


def _stored(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """``tensor`` on the CPU, a float one in ``dtype`` (None: as it is), contiguous."""
    cast = dtype if dtype is not None and tensor.is_floating_point() else None
    return tensor.to("cpu", cast).contiguous()


class LayerCheckpointWriter:
    """Writes the transformed checkpoint of ``lw`` into ``folder`` (created; see the module docstring)."""

    def __init__(self, lw: LayerwiseModel, folder: Path) -> None:
        self.lw = lw
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}
        self.total = 0

    def _save(self, state: dict[str, torch.Tensor], name: str) -> None:
        save_file(state, str(self.folder / name), metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(state, name))
        self.total += sum(t.numel() * t.element_size() for t in state.values())

    def add_layer(self, index: int, named: Collection[str] = ()) -> None:
        """Save decoder layer ``index`` as the steps left it (call before the layer is freed); ``named``:
        see :func:`layer_state`."""
        self._save(layer_state(self.lw, index, named), f"layer-{index:05d}.safetensors")

    def finish(self) -> SourceCheckpoint:
        """Copy the resident tensors, write the index and config/tokenizer files; the checkpoint."""
        source = self.lw.source
        resident = {meta.name: tensor.clone() for meta, tensor in self.lw.read_stored(self.lw.resident_keys)}
        if resident:
            self._save(resident, RESIDENT_FILE)
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        copy_through(source, self.folder)
        return resolve_model(str(self.folder), check_shapes=False, progress=False)


__all__ = ["LayerCheckpointWriter", "layer_state"]
