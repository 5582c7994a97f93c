"""DeepSeek-MoE v1 (``model_type: "deepseek"``, e.g. deepseek-moe-16b) without remote code.

transformers 5.24 has no DeepSeek v1 and the checkpoints' remote code targets transformers 4.x. The
DeepseekV2 classes cannot stand in: their MLA attention (``kv_a_proj_with_mqa``/``kv_b_proj``, a latent
norm and interleaved RoPE on part of each head) is not plain multi-head attention. This module therefore
rebuilds v1 from transformers' Llama pieces plus a small MoE block, faithful to the original code:

* attention, norms, RoPE: Llama (``self_attn.{q,k,v,o}_proj``, rotate-half RoPE); dense MLP and shared
  experts: gated ``gate_proj/up_proj/down_proj`` (transformers' DeepseekV2MLP);
* MoE layers are ``layer >= first_k_dense_replace and layer % moe_layer_freq == 0``; the block is
  ``mlp.gate`` (router ``weight [E, H]``), ``mlp.experts`` (fused in memory like every transformers MoE:
  ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) and ungated ``mlp.shared_experts``
  (width ``moe_intermediate_size · n_shared_experts``) added to the routed output;
* routing: softmax over the router logits (computed in fp32), greedy top-k, renormalised only when
  ``norm_topk_prob`` (false for the released checkpoints), no routed scaling factor.

The per-expert checkpoint keys ``mlp.experts.{e}.{gate,up,down}_proj.weight`` are fused on load and split
again by ``save_pretrained`` through the transformers conversion mapping registered below for
``model_type "deepseek"`` (the same mapping transformers uses for Qwen2-MoE and DeepSeek-V2/V3).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.conversion_mapping import (
    USER_REGISTERED_MAPPINGS,
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.integrations import use_experts_implementation
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from cimconvert.errors import ModelInputError

MODEL_TYPE = "deepseek"


@strict
class DeepseekV1Config(LlamaConfig):
    """Config of DeepSeek-MoE v1, with the v1 key names and defaults of its ``configuration_deepseek.py``."""

    model_type = MODEL_TYPE
    attribute_map = {"num_experts": "n_routed_experts"}  # noqa: RUF012

    vocab_size: int = 102400
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 100000
    eos_token_id: int | list[int] | None = 100001
    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True

    def __post_init__(self, **kwargs: Any) -> None:
        # the hub config's auto_map points at remote code we never run; do not carry it into saved configs
        kwargs.pop("auto_map", None)
        super().__post_init__(**kwargs)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether decoder layer ``layer_idx`` has an MoE block (else a dense MLP), as in the v1 code."""
        return (
            self.n_routed_experts is not None
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )


class DeepseekV1TopkRouter(nn.Module):
    """Softmax router with greedy top-k; ``forward`` returns ``(logits, top_k_weights, top_k_index)``."""

    def __init__(self, config: DeepseekV1Config) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.hidden_size))
        self.num_experts, self.hidden_dim = self.weight.shape
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route ``hidden_states [..., H]``: logits ``[T, E]``, weights and indices ``[T, k]``."""
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states.float(), self.weight.float())
        scores = router_logits.softmax(dim=-1)
        top_k_weights, top_k_index = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        if self.top_k > 1 and self.norm_topk_prob:
            top_k_weights = top_k_weights / (top_k_weights.sum(dim=-1, keepdim=True) + 1e-20)
        return router_logits, top_k_weights, top_k_index


@use_experts_implementation
class DeepseekV1Experts(nn.Module):
    """Routed experts stored fused: ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``."""

    def __init__(self, config: DeepseekV1Config) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(
            torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim)
        )
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Eager reference: sum over the selected experts of ``weight · down(act(gate(x)) · up(x))``."""
        final = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token_idx], self.gate_up_proj[expert]).chunk(2, dim=-1)
            out = F.linear(self.act_fn(gate) * up, self.down_proj[expert])
            out = out * top_k_weights[token_idx, slot, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final


class DeepseekV1Moe(nn.Module):
    """v1 MoE block: routed experts plus (ungated) shared experts."""

    def __init__(self, config: DeepseekV1Config) -> None:
        super().__init__()
        self.gate = DeepseekV1TopkRouter(config)
        self.experts = DeepseekV1Experts(config)
        self.shared_experts = (
            DeepseekV2MLP(config, intermediate_size=config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Routed expert mixture of ``hidden_states [B, S, H]`` plus the shared experts' output."""
        shape = hidden_states.shape
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        flat = hidden_states.reshape(-1, shape[-1])
        out = self.experts(flat, top_k_index, top_k_weights.to(hidden_states.dtype)).reshape(shape)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden_states)
        return out


class DeepseekV1DecoderLayer(LlamaDecoderLayer):
    """Llama decoder layer whose MLP is the v1 MoE block on MoE layers."""

    def __init__(self, config: DeepseekV1Config, layer_idx: int) -> None:
        nn.Module.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config=config, layer_idx=layer_idx)
        self.mlp = DeepseekV1Moe(config) if config.is_moe_layer(layer_idx) else DeepseekV2MLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekV1PreTrainedModel(LlamaPreTrainedModel):
    """Weight initialisation and class metadata shared by the v1 model classes."""

    config: DeepseekV1Config
    config_class = DeepseekV1Config
    _no_split_modules = ["DeepseekV1DecoderLayer"]  # noqa: RUF012
    _can_record_outputs = {"hidden_states": DeepseekV1DecoderLayer, "attentions": LlamaAttention}  # noqa: RUF012

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepseekV1TopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, DeepseekV1Experts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


class DeepseekV1Model(DeepseekV1PreTrainedModel, LlamaModel):
    """v1 decoder stack; ``forward`` is Llama's."""

    def __init__(self, config: DeepseekV1Config) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [DeepseekV1DecoderLayer(config, idx) for idx in range(config.num_hidden_layers)]
        )
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class DeepseekV1ForCausalLM(DeepseekV1PreTrainedModel, LlamaForCausalLM):
    """DeepSeek-MoE v1 causal LM (``architectures: DeepseekForCausalLM`` in the checkpoints)."""

    def __init__(self, config: DeepseekV1Config) -> None:
        LlamaPreTrainedModel.__init__(self, config)
        self.model = DeepseekV1Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


def check_v1_config(config: DeepseekV1Config) -> None:
    """Reject v1 configs this implementation does not reproduce (as the original code would)."""
    if config.scoring_func != "softmax":
        raise ModelInputError(
            f"DeepSeek v1: scoring_func '{config.scoring_func}' is not supported (softmax only)"
        )
    if config.n_routed_experts is not None and not config.num_experts_per_tok:
        raise ModelInputError("DeepSeek v1: n_routed_experts is set but num_experts_per_tok is missing")


def v1_config(config_dict: dict[str, Any]) -> DeepseekV1Config:
    """A validated :class:`DeepseekV1Config` from a v1 ``config.json`` dict (``auto_map`` is dropped)."""
    values = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map")}
    try:
        config = DeepseekV1Config(**values)
    except (TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelInputError(f"DeepSeek v1 config is invalid: {reason}") from None
    check_v1_config(config)
    return config


def _register_conversion() -> None:
    """Fuse per-expert checkpoint keys on load (and split them on save), as for DeepSeek-V2."""
    if MODEL_TYPE not in USER_REGISTERED_MAPPINGS:
        register_checkpoint_conversion_mapping(
            MODEL_TYPE, get_checkpoint_conversion_mapping("deepseek_v2"), overwrite=True
        )


_register_conversion()
