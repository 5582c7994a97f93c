"""Tiny random models of every registered architecture, built from configs (never downloaded).

Every MoE model has hidden 32, 2 layers, 4 experts, top-2 and vocab 128; SSM and dense models are of the
same size. ``build_tiny(model_type)`` builds one with a fixed seed; ``save_tiny(model_type, folder)``
writes it with ``save_pretrained`` (safetensors, on-disk per-expert keys); ``write_deepseek_v1_folder``
writes a folder the way the DeepSeek-MoE v1 hub checkpoints look (v1 config keys, ``auto_map``,
``DeepseekForCausalLM``, per-expert keys written by hand).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cimconvert.arch.loading import build_model, load_config

SEED = 0
VOCAB = 128
HIDDEN = 32

_COMMON: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
_MOE: dict[str, Any] = {**_COMMON, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
_SSM: dict[str, Any] = {
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "state_size": 8, "num_hidden_layers": 2,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip
_MLA: dict[str, Any] = {"kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8}

#: model_type → config dict of its tiny model
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "olmoe": {**_MOE, "model_type": "olmoe", "num_experts": 4},
    "qwen2_moe": {
        **_MOE, "model_type": "qwen2_moe", "num_experts": 4, "shared_expert_intermediate_size": 32,
        "mlp_only_layers": [0],
    },
    "qwen3_moe": {**_MOE, "model_type": "qwen3_moe", "num_experts": 4, "norm_topk_prob": True},
    "mixtral": {**_MOE, "model_type": "mixtral", "num_local_experts": 4},
    "deepseek_v2": {
        **_MOE, **_MLA, "model_type": "deepseek_v2", "n_routed_experts": 4, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "q_lora_rank": None, "num_key_value_heads": 4,
    },
    "deepseek_v3": {
        **_MOE, **_MLA, "model_type": "deepseek_v3", "n_routed_experts": 4, "n_shared_experts": 1,
        "first_k_dense_replace": 1, "q_lora_rank": 16, "n_group": 1, "topk_group": 1,
        "num_key_value_heads": 4,
    },
    "deepseek": {
        **_MOE, "model_type": "deepseek", "architectures": ["DeepseekForCausalLM"], "n_routed_experts": 4,
        "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": False,
        "scoring_func": "softmax", "num_key_value_heads": 4, "rope_theta": 10000.0, "rope_scaling": None,
        "aux_loss_alpha": 0.001, "seq_aux": True, "pretraining_tp": 1, "tie_word_embeddings": False,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
    },
    "mamba": {**_SSM, "model_type": "mamba"},
    "mamba2": {**_SSM, "model_type": "mamba2", "num_heads": 4, "head_dim": 16, "n_groups": 1},
    "falcon_mamba": {**_SSM, "model_type": "falcon_mamba"},
    "granitemoe": {
        **_MOE, "model_type": "granitemoe", "num_local_experts": 4, "intermediate_size": 16,
        "embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.125,
        "logits_scaling": 6.0, "tie_word_embeddings": True,
    },
    "llama": {**_COMMON, "model_type": "llama"},
    "qwen2": {**_COMMON, "model_type": "qwen2"},
    "gpt2": {
        "model_type": "gpt2", "vocab_size": VOCAB, "n_embd": HIDDEN, "n_layer": 2, "n_head": 4,
        "n_positions": 64, "bos_token_id": 1, "eos_token_id": 2,
    },
}  # fmt: skip


def tiny_types() -> list[str]:
    """Model types that have a tiny model here."""
    return sorted(TINY_CONFIGS)


def tiny_config(model_type: str) -> Any:
    """The transformers config object of a tiny model (KeyError for a type without one)."""
    return load_config(dict(TINY_CONFIGS[model_type]))


def build_tiny(model_type: str, seed: int = SEED) -> torch.nn.Module:
    """A tiny random model (fp32, eval mode) of ``model_type``, built from its config with ``seed``."""
    return build_model(tiny_config(model_type), seed=seed)


def save_tiny(model_type: str, folder: str | Path, seed: int = SEED) -> tuple[torch.nn.Module, Path]:
    """Build a tiny model and ``save_pretrained`` it (safetensors) into ``folder``; returns both."""
    folder = Path(folder)
    model = build_tiny(model_type, seed)
    model.save_pretrained(folder)
    return model, folder


def read_shapes(folder: str | Path) -> dict[str, tuple[int, ...]]:
    """Key → shape of every tensor in a folder's ``*.safetensors`` files (headers only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def v1_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of an in-memory DeepSeek v1 model under v1 checkpoint key names, split by hand."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        prefix, _, leaf = name.rpartition(".")
        if leaf == "gate_up_proj":
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = gate[e].contiguous()
                out[f"{prefix}.{e}.up_proj.weight"] = up[e].contiguous()
        elif leaf == "down_proj" and prefix.endswith(".experts"):
            for e in range(tensor.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def write_deepseek_v1_folder(folder: str | Path, seed: int = SEED) -> tuple[torch.nn.Module, Path]:
    """Write a v1-style checkpoint folder (hub config.json + per-expert keys); returns (model, folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_tiny("deepseek", seed)
    config = {**TINY_CONFIGS["deepseek"], "torch_dtype": "float32", "transformers_version": "4.36.0"}
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    save_file(v1_state_dict(model), str(folder / "model.safetensors"), metadata={"format": "pt"})
    return model, folder
