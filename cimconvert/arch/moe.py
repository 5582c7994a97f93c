"""Adapters for the mixture-of-experts families of transformers 5.24.

In memory every one of them stores the routed experts fused on ``mlp.experts`` as 3-D parameters
``gate_up_proj [E, 2I, H]`` (rows ``[0:I]`` gate, ``[I:2I]`` up) and ``down_proj [E, H, I]``;
``save_pretrained`` writes per-expert keys ``mlp.experts.{e}.{gate,up,down}_proj.weight`` (Mixtral:
``block_sparse_moe.experts.{e}.w1/w3/w2.weight``). The router is ``mlp.gate`` (``weight [E, H]``).
"""

from __future__ import annotations

from typing import ClassVar

from cimconvert.arch.base import ArchAdapter, Family
from cimconvert.arch.registry import register


class MoeAdapter(ArchAdapter):
    """Common layout of the Llama-style MoE decoders: ``model.layers.N.{self_attn,mlp}``."""

    family: ClassVar[Family] = "moe"
    moe_block: ClassVar[str | None] = "mlp"
    top_k_key: ClassVar[str | None] = "num_experts_per_tok"


@register
class Olmoe(MoeAdapter):
    """OLMoE: softmax router, renormalised iff ``norm_topk_prob``; q_norm/k_norm in attention."""

    model_type = "olmoe"
    model_class = "OlmoeForCausalLM"
    note = "OLMoE: softmax top-k, optional renormalisation, no shared expert"
    num_experts_key = "num_experts"
    norm_topk_prob_key = "norm_topk_prob"


@register
class Qwen2Moe(MoeAdapter):
    """Qwen1.5/2-MoE: as OLMoE plus one sigmoid-gated shared expert per MoE layer."""

    model_type = "qwen2_moe"
    model_class = "Qwen2MoeForCausalLM"
    note = "Qwen2-MoE: softmax top-k + sigmoid-gated shared expert; mlp_only_layers are dense"
    num_experts_key = "num_experts"
    norm_topk_prob_key = "norm_topk_prob"
    shared_experts = "shared_expert"
    shared_expert_gate = "shared_expert_gate"
    dense_layers_key = "mlp_only_layers"


@register
class Qwen3Moe(MoeAdapter):
    """Qwen3-MoE: as OLMoE (real checkpoints set ``norm_topk_prob: true``)."""

    model_type = "qwen3_moe"
    model_class = "Qwen3MoeForCausalLM"
    note = "Qwen3-MoE: softmax top-k, renormalised iff norm_topk_prob, no shared expert"
    num_experts_key = "num_experts"
    norm_topk_prob_key = "norm_topk_prob"
    dense_layers_key = "mlp_only_layers"


@register
class Mixtral(MoeAdapter):
    """Mixtral: top-k always renormalised; on disk the legacy ``block_sparse_moe`` / ``w1,w3,w2`` names."""

    model_type = "mixtral"
    model_class = "MixtralForCausalLM"
    note = "Mixtral: softmax top-k always renormalised; disk keys block_sparse_moe.experts.N.w1/w3/w2"
    num_experts_key = "num_local_experts"
    norm_topk_prob_default = True
    moe_block_disk_aliases = ("block_sparse_moe",)
    disk_expert_projs = (("gate", "w1"), ("up", "w3"), ("down", "w2"))


@register
class DeepseekV2(MoeAdapter):
    """DeepSeek-V2: MLA attention, softmax greedy / group-limited top-k × routed_scaling_factor."""

    model_type = "deepseek_v2"
    model_class = "DeepseekV2ForCausalLM"
    note = "DeepSeek-V2: MLA attention, softmax top-k x routed_scaling_factor, ungated shared experts"
    attention_projs = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
    num_experts_key = "n_routed_experts"
    # the transformers 5.24 router ignores norm_topk_prob for V2
    shared_experts = "shared_experts"
    dense_layers_key = "first_k_dense_replace"
    routed_scaling_factor_key = "routed_scaling_factor"


@register
class DeepseekV3(DeepseekV2):
    """DeepSeek-V3: as V2 with sigmoid scoring and ``e_score_correction_bias`` (selection only)."""

    model_type = "deepseek_v3"
    model_class = "DeepseekV3ForCausalLM"
    note = "DeepSeek-V3: sigmoid group-limited top-k with e_score_correction_bias, ungated shared experts"
    scoring_default = "sigmoid"
    norm_topk_prob_key = "norm_topk_prob"
    router_buffers = ("e_score_correction_bias",)
