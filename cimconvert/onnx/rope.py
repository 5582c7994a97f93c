"""Real-valued rotary embeddings for export (complex-number RoPE does not export to ONNX).

transformers' DeepSeek-V2 (whose adapter declares it, ``ArchAdapter.complex_rope``) builds its rotary
embedding as complex numbers: the rotary module returns
``freqs_cis = polar(1, θ)·scaling`` (``aten::polar``) and ``apply_rotary_emb`` multiplies
``view_as_complex`` pairs of q/k by it. Neither op has an ONNX symbolic. While an export runs,
:func:`patch_complex_rope` swaps both for the same math on real tensors:

* the rotary module returns ``stack((cos θ, sin θ), -1)·scaling`` (``[batch, seq, d/2, 2]``), still
  wrapped by ``dynamic_rope_update`` so dynamic/long RoPE variants update ``inv_freq`` as before;
* ``apply_rotary_emb`` rotates each interleaved pair ``(a, b)`` to ``(a·c − b·s, a·s + b·c)``, which is
  the complex product ``(a + ib)(c + is)`` written out, and flattens the pairs back (same layout).

The stock model is untouched outside the export (the patches are undone with the others).
"""

from __future__ import annotations

import importlib
import types
from typing import Any

import torch
from torch import nn

from cimconvert.arch import get_adapter


def real_rope_forward(self: nn.Module, x: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    """``(cos θ, sin θ)·scaling`` stacked on a last axis of 2 (the real view of ``polar(1, θ)·scaling``)."""
    freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
    return torch.stack((freqs.cos(), freqs.sin()), dim=-1) * self.attention_scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(3).type_as(x)


def real_apply_rotary_emb(
    xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 ``apply_rotary_emb`` on the real ``[batch, seq, d/2, 2]`` form of ``freqs_cis``."""
    freqs = freqs_cis.unsqueeze(1).to(xq.device)  # [batch, 1, seq, d/2, 2]
    cos, sin = freqs[..., 0], freqs[..., 1]
    return _rotate(xq, cos, sin), _rotate(xk, cos, sin)


def _wrapped_forward(module: nn.Module) -> Any:
    """The real forward bound to ``module``, under ``dynamic_rope_update`` like the stock one."""
    from transformers.modeling_rope_utils import dynamic_rope_update

    return types.MethodType(dynamic_rope_update(real_rope_forward), module)


def patch_complex_rope(patches: Any, model: nn.Module) -> list[str]:
    """Switch every complex-RoPE module of ``model`` (and its family's apply function) to real math.

    ``patches``: an ``export._Patches`` (``setattr`` records the undo). The model's adapter names the
    rotary class and apply function (``complex_rope``); returns the patched modules.
    """
    adapter = get_adapter(model.config)
    spec = adapter.complex_rope
    if spec is None:
        return []
    family = adapter.model_module()
    patched = [
        name
        for name, module in model.named_modules()
        if type(module).__module__ == family and type(module).__name__ == spec.rotary_class
    ]
    for name in patched:
        module = model.get_submodule(name)
        patches.setattr(module, "forward", _wrapped_forward(module))
    if patched:
        patches.setattr(importlib.import_module(family), spec.apply_function, real_apply_rotary_emb)
    return patched
