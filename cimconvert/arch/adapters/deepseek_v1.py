"""Adapter for DeepSeek-MoE v1 (``model_type: "deepseek"``), loaded through our own module, no remote code.

The model classes live in :mod:`cimconvert.arch.deepseek_v1_model` (imported only when a model is built
or loaded); the tensor names are those of the v1 checkpoints: Llama attention, ``mlp.gate``,
``mlp.experts.{e}.{gate,up,down}_proj`` on disk (fused in memory), ungated ``mlp.shared_experts``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cimconvert.arch.adapters.moe import MoeAdapter
from cimconvert.arch.registry import register
from cimconvert.arch.routing import RoutingRule

if TYPE_CHECKING:
    from torch import nn


@register
class DeepseekV1(MoeAdapter):
    """DeepSeek-MoE 16B v1: our own module (Llama MHA), softmax greedy top-k, no renormalisation, scaling 1,
    ungated shared experts; its config is built by our own config class (no remote code)."""

    model_type = "deepseek"
    model_class = "cimconvert.arch.deepseek_v1_model:DeepseekV1ForCausalLM"
    config_builder = "cimconvert.arch.deepseek_v1_model:v1_config"
    num_experts_key = "n_routed_experts"
    norm_topk_prob_key = "norm_topk_prob"
    scoring_key = "scoring_func"
    shared_experts = "shared_experts"
    dense_layers_key = "first_k_dense_replace"

    def routing_rule(self, config: Any, router: nn.Module) -> RoutingRule:
        """Softmax, unsorted greedy top-k, renormalised (eps 1e-20) iff norm_topk_prob and top_k > 1."""
        size = self.routing_size(config, router)
        return RoutingRule(
            "softmax", norm_topk_prob=bool(router.norm_topk_prob) and size["top_k"] > 1, norm_eps=1e-20,
            sorted=False, cast_to_logits=False, **size,
        )  # fmt: skip
