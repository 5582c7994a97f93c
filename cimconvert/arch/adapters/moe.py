"""Adapters for the mixture-of-experts families of transformers 5.24.

In memory every one of them stores the routed experts fused on ``mlp.experts`` as 3-D parameters
``gate_up_proj [E, 2I, H]`` (rows ``[0:I]`` gate, ``[I:2I]`` up) and ``down_proj [E, H, I]``;
``save_pretrained`` writes per-expert keys ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``). The router is ``mlp.gate`` (``weight [E, H]``).
Each adapter's ``routing_rule`` mirrors its stock router's forward (ROMER replays it bit-exactly, tested
for every registered MoE architecture).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cimconvert.arch.base import ArchAdapter, ComplexRope, router_value
from cimconvert.arch.registry import register
from cimconvert.arch.routing import RoutingRule
from cimconvert.errors import CimError

if TYPE_CHECKING:
    from torch import nn


class MoeAdapter(ArchAdapter):
    """Common layout of the Llama-style MoE decoders: ``model.layers.N.{self_attn,mlp}``."""

    family = "moe"
    moe_block = "mlp"
    top_k_key = "num_experts_per_tok"


@register
class Olmoe(MoeAdapter):
    """OLMoE: softmax top-k, renormalised iff ``norm_topk_prob``; q_norm/k_norm; no shared expert."""

    model_type = "olmoe"
    model_class = "OlmoeForCausalLM"
    num_experts_key = "num_experts"
    norm_topk_prob_key = "norm_topk_prob"

    def routing_rule(self, config: Any, router: nn.Module) -> RoutingRule:
        """Softmax, sorted top-k, renormalised iff the router's norm_topk_prob, cast to the logits dtype."""
        return RoutingRule(
            "softmax", norm_topk_prob=bool(router.norm_topk_prob), **self.routing_size(config, router)
        )


@register
class Qwen2Moe(Olmoe):
    """Qwen1.5/2-MoE: as OLMoE plus one sigmoid-gated shared expert; mlp_only_layers are dense."""

    model_type = "qwen2_moe"
    model_class = "Qwen2MoeForCausalLM"
    shared_experts = "shared_expert"
    shared_expert_gate = "shared_expert_gate"
    dense_layers_key = "mlp_only_layers"


@register
class Qwen3Moe(Olmoe):
    """Qwen3-MoE: as OLMoE (real checkpoints set ``norm_topk_prob: true``)."""

    model_type = "qwen3_moe"
    model_class = "Qwen3MoeForCausalLM"
    dense_layers_key = "mlp_only_layers"


@register
class Mixtral(MoeAdapter):
    """Mixtral: top-k always renormalised; on disk the legacy ``block_sparse_moe`` / ``w1,w3,w2`` names."""

    model_type = "mixtral"
    model_class = "MixtralForCausalLM"
    num_experts_key = "num_local_experts"
    norm_topk_prob_default = True
    moe_block_disk_aliases = ("block_sparse_moe",)
    disk_expert_projs = (("gate", "w1"), ("up", "w3"), ("down", "w2"))

    def routing_rule(self, config: Any, router: nn.Module) -> RoutingRule:
        """Softmax, sorted top-k, always renormalised, weights kept in float32."""
        return RoutingRule(
            "softmax", norm_topk_prob=True, cast_to_logits=False, **self.routing_size(config, router)
        )


@register
class DeepseekV2(MoeAdapter):
    """DeepSeek-V2: MLA attention, softmax greedy / group-limited top-k × routed_scaling_factor, ungated
    shared experts; its rotary embedding is complex (swapped for real math during ONNX export)."""

    model_type = "deepseek_v2"
    model_class = "DeepseekV2ForCausalLM"
    attention_projs = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    num_experts_key = "n_routed_experts"
    # the transformers 5.24 router ignores norm_topk_prob for V2
    shared_experts = "shared_experts"
    dense_layers_key = "first_k_dense_replace"
    routed_scaling_factor_key = "routed_scaling_factor"
    complex_rope = ComplexRope("DeepseekV2RotaryEmbedding", "apply_rotary_emb")

    def routing_rule(self, config: Any, router: nn.Module) -> RoutingRule:
        """Softmax, greedy or group-limited (group max) unsorted top-k, × routed_scaling_factor, no renorm."""
        method = str(router_value(router, "topk_method", "greedy"))
        if method not in ("greedy", "group_limited_greedy"):
            raise CimError(f"deepseek_v2 router topk_method '{method}' is not supported")
        return RoutingRule(
            "softmax", norm_topk_prob=False, routed_scaling_factor=float(router.routed_scaling_factor),
            method="greedy" if method == "greedy" else "group_max", **_groups(router),
            sorted=False, cast_to_logits=False, **self.routing_size(config, router),
        )  # fmt: skip


@register
class DeepseekV3(DeepseekV2):
    """DeepSeek-V3: as V2 with sigmoid scoring and ``e_score_correction_bias`` (selection only)."""

    model_type = "deepseek_v3"
    model_class = "DeepseekV3ForCausalLM"
    scoring_default = "sigmoid"
    norm_topk_prob_key = "norm_topk_prob"
    router_buffers = ("e_score_correction_bias",)
    complex_rope = None

    def routing_rule(self, config: Any, router: nn.Module) -> RoutingRule:
        """Sigmoid, group-limited (best two per group) unsorted top-k, renorm iff norm_topk_prob, scaled."""
        return RoutingRule(
            "sigmoid", norm_topk_prob=bool(router.norm_topk_prob), norm_eps=1e-20,
            routed_scaling_factor=float(router.routed_scaling_factor), method="group_top2",
            **_groups(router), sorted=False, cast_to_logits=False, **self.routing_size(config, router),
        )  # fmt: skip


def _groups(router: nn.Module) -> dict[str, int]:
    """``n_group`` and ``topk_group`` of a DeepSeek router (1 and 1 where it has none)."""
    return {
        "n_group": int(router_value(router, "num_group", 1)),
        "topk_group": int(router_value(router, "topk_group", 1)),
    }
