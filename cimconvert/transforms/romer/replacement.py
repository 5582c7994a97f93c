"""Expert replacement: find under-activated experts and overwrite their arrays with hot experts' weights.

Frequencies ``f_e`` are the share of calibration tokens that select expert ``e`` (uniform load is k/E).
An expert is *cold* when ``f_e < tau·k/E`` (or, with ``bottom_r > 0``, when it is among the ``r`` least
selected). Donors are the hottest experts, assigned round-robin. Two modes:

* ``substitute``: copy the donor into the cold slot; the router row of the cold slot is unchanged, so the
  tokens that chose the cold expert now get (an independently programmed copy of) the donor.
* ``replicate_split``: copy the donor into the cold slot, mask the cold slot in the router (never
  selected) and send the donor's tokens to donor and replica (see :mod:`.hook`); independent programming
  noise of the two copies averages out.

Copies act on dim 0 of the fused 3-D expert tensors (``gate_up_proj``, ``down_proj``, ``up_proj`` and
biases where an architecture has them); ``save_pretrained`` writes them as ordinary per-expert weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from cimconvert.analog.experts import DIGITAL_INPUTS_ATTR
from cimconvert.errors import CimError

Mode = Literal["none", "substitute", "replicate_split"]
#: fused expert parameters copied along dim 0 (whichever the experts module has)
EXPERT_TENSORS = (
    "gate_up_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj_bias",
    "up_proj_bias",
    "down_proj_bias",
)


def cold_experts(freq: torch.Tensor, top_k: int, tau: float, bottom_r: int = 0) -> list[int]:
    """Under-activated experts of one layer, coldest first (at most ``E − k`` and at most ``E // 2``)."""
    num = int(freq.numel())
    order = torch.argsort(freq, stable=True).tolist()
    cold = order[:bottom_r] if bottom_r > 0 else [e for e in order if float(freq[e]) < tau * top_k / num]
    return cold[: max(0, min(num - top_k, num // 2))]


def plan_pairs(freq: torch.Tensor, top_k: int, tau: float, bottom_r: int = 0) -> list[list[int]]:
    """``[cold, donor]`` pairs of one layer: donors are the hottest experts, round-robin."""
    cold = cold_experts(freq, top_k, tau, bottom_r)
    if not cold:
        return []
    donors = [e for e in torch.argsort(freq, descending=True, stable=True).tolist() if e not in cold]
    return [[c, donors[i % len(donors)]] for i, c in enumerate(cold)]


@torch.no_grad()
def copy_experts(experts: nn.Module, pairs: list[list[int]]) -> list[str]:
    """Overwrite expert ``dst`` with expert ``src`` for each ``[dst, src]``; returns the tensors touched."""
    touched = []
    for name in EXPERT_TENSORS:
        tensor = getattr(experts, name, None)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() < 2:
            continue
        for dst, src in pairs:
            if not (0 <= dst < tensor.shape[0] and 0 <= src < tensor.shape[0]):
                raise CimError(f"expert replacement {dst} <- {src} out of range for {tuple(tensor.shape)}")
            tensor[dst].copy_(tensor[src])
        touched.append(name)
    if pairs and not touched:
        raise CimError(f"{type(experts).__name__} has no fused expert tensors to replace")
    for index in getattr(experts, DIGITAL_INPUTS_ATTR, {}).values():  # the copy keeps its donor's split
        for dst, src in pairs:
            index[dst] = index[src]
    return touched


def snapshot(experts: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the fused expert tensors and of their digital input channels (to undo a replacement)."""
    saved = {
        name: getattr(experts, name).detach().clone()
        for name in EXPERT_TENSORS
        if isinstance(getattr(experts, name, None), torch.Tensor)
    }
    digital = getattr(experts, DIGITAL_INPUTS_ATTR, {})
    return {**saved, **{_digital_key(name): index.clone() for name, index in digital.items()}}


def _digital_key(name: str) -> str:
    return f"{DIGITAL_INPUTS_ATTR}:{name}"


@torch.no_grad()
def restore(experts: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Put back the tensors saved by :func:`snapshot`."""
    digital = getattr(experts, DIGITAL_INPUTS_ATTR, {})
    for name, tensor in saved.items():
        pname = name.removeprefix(f"{DIGITAL_INPUTS_ATTR}:")
        target = digital[pname] if pname != name else getattr(experts, name)
        target.copy_(tensor)
