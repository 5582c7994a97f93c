"""Adapter for DeepSeek-MoE v1 (``model_type: "deepseek"``), loaded through our own module, no remote code.

The model classes live in :mod:`cimconvert.arch.deepseek_v1_model` (imported only when a model is built
or loaded); the tensor names are those of the v1 checkpoints: Llama attention, ``mlp.gate``,
``mlp.experts.{e}.{gate,up,down}_proj`` on disk (fused in memory), ungated ``mlp.shared_experts``.
"""

from __future__ import annotations

from cimconvert.arch.moe import MoeAdapter
from cimconvert.arch.registry import register


@register
class DeepseekV1(MoeAdapter):
    """DeepSeek-MoE 16B v1: softmax greedy top-k, no renormalisation, scaling 1, ungated shared experts."""

    model_type = "deepseek"
    model_class = "cimconvert.arch.deepseek_v1_model:DeepseekV1ForCausalLM"
    note = "DeepSeek-MoE v1 (16B): own module, Llama MHA + softmax greedy top-k + ungated shared experts"
    num_experts_key = "n_routed_experts"
    norm_topk_prob_key = "norm_topk_prob"
    scoring_key = "scoring_func"
    shared_experts = "shared_experts"
    dense_layers_key = "first_k_dense_replace"
