"""Adapters for dense decoders: Llama, Qwen2 (``model.layers.N``) and GPT-2 (``transformer.h.N``)."""

from __future__ import annotations

from typing import ClassVar

from cimconvert.arch.base import ArchAdapter, Family, Layout
from cimconvert.arch.registry import register


@register
class Llama(ArchAdapter):
    """Llama: q/k/v/o_proj attention, gated gate/up/down_proj MLP."""

    model_type = "llama"
    family: ClassVar[Family] = "dense"
    model_class = "LlamaForCausalLM"
    note = "Llama: nn.Linear attention and gated MLP"


@register
class Qwen2(Llama):
    """Qwen2: Llama layout with q/k/v biases."""

    model_type = "qwen2"
    model_class = "Qwen2ForCausalLM"
    note = "Qwen2: Llama layout, q/k/v biases"


@register
class Gpt2(ArchAdapter):
    """GPT-2: Conv1D projections store weights transposed, ``[in, out]``; lm_head tied by default."""

    model_type = "gpt2"
    family: ClassVar[Family] = "dense"
    model_class = "GPT2LMHeadModel"
    note = "GPT-2: transposed Conv1D weights [in, out]; wte/wpe embeddings; lm_head tied"
    layers_path: ClassVar[str] = "transformer.h"
    embeddings: ClassVar[tuple[str, ...]] = ("wte", "wpe")
    attention_path: ClassVar[str] = "attn"
    attention_projs: ClassVar[tuple[str, ...]] = ("c_attn", "c_proj")
    mlp_projs: ClassVar[tuple[str, ...]] = ("c_fc", "c_proj")
    proj_layout: ClassVar[Layout] = "in_out"
