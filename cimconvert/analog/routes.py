"""Which matmul owns an analog tensor, and how that matmul can be routed through an analog kernel.

Three routes, decided from the model alone (the same answer for the simulator, STE and the exporter):

* ``linear``: the ``weight`` of an ``nn.Linear`` or GPT-2 ``Conv1D`` — the module's forward is routed;
* ``experts``: a fused 3-D expert tensor (``gate_up_proj`` / ``up_proj`` / ``down_proj``) of a
  transformers-5 experts module — its experts implementation is routed;
* ``weight``: anything else (e.g. Mamba's ``dt_proj.weight``, listed in its adapter's
  ``weight_only_modules`` because HF code reads it directly as ``dt_proj.weight @ dt``, or a router
  read through ``F.linear``) — weight-level effects only.
"""

from __future__ import annotations

from typing import Literal

from torch import nn
from transformers.pytorch_utils import Conv1D

from cimconvert.arch import get_adapter

Route = Literal["linear", "experts", "weight"]

#: Fused expert parameters of transformers-5 experts modules.
EXPERT_PARAMS = ("gate_up_proj", "up_proj", "down_proj")


def is_weight_only(model: nn.Module, module_path: str) -> bool:
    """Whether the module at ``module_path`` has its weight read directly by HF code (Mamba ``dt_proj``).

    The one place the rule is asked (the simulator, STE and the exporter all route through here).
    """
    return get_adapter(model.config).is_weight_only(module_path)


def owner_of(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    """(owning module, its path, attribute) of the parameter ``name`` of ``model``."""
    module_path, _, attr = name.rpartition(".")
    owner = model.get_submodule(module_path) if module_path else model
    return owner, module_path, attr


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers-5 fused experts module (3-D ``down_proj`` parameter + config)."""
    down = getattr(module, "down_proj", None)
    return isinstance(down, nn.Parameter) and hasattr(module, "config")


def route_of(model: nn.Module, name: str) -> Route:
    """How the matmul that owns the parameter ``name`` is routed (see the module docstring)."""
    owner, module_path, attr = owner_of(model, name)
    if isinstance(owner, (nn.Linear, Conv1D)) and attr == "weight" and not is_weight_only(model, module_path):
        return "linear"
    param = getattr(owner, attr, None)
    fused = isinstance(param, nn.Parameter) and param.dim() == 3
    if attr in EXPERT_PARAMS and fused and hasattr(owner, "config"):
        return "experts"
    return "weight"
