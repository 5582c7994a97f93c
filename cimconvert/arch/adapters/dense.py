"""Adapters for dense decoders: Llama, Qwen2 (``model.layers.N``) and GPT-2 (``transformer.h.N``)."""

from __future__ import annotations

from cimconvert.arch.base import ArchAdapter
from cimconvert.arch.registry import register


class DenseAdapter(ArchAdapter):
    """Common base of the dense decoders: attention and MLP projections, no experts, no SSM mixer."""

    family = "dense"


@register
class Llama(DenseAdapter):
    """Llama: nn.Linear q/k/v/o_proj attention and gated gate/up/down_proj MLP."""

    model_type = "llama"
    model_class = "LlamaForCausalLM"


@register
class Qwen2(Llama):
    """Qwen2: Llama layout with q/k/v biases."""

    model_type = "qwen2"
    model_class = "Qwen2ForCausalLM"


@register
class Gpt2(DenseAdapter):
    """GPT-2: Conv1D projections store weights transposed, ``[in, out]``; wte/wpe embeddings; lm_head tied."""

    model_type = "gpt2"
    model_class = "GPT2LMHeadModel"
    layers_path = "transformer.h"
    embeddings = ("wte", "wpe")
    attention_path = "attn"
    attention_projs = ("c_attn", "c_proj")
    mlp_projs = ("c_fc", "c_proj")
    proj_layout = "in_out"
