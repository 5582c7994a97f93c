"""Write a random-weight checkpoint with the exact shapes of OLMoE-1B-7B (the scale benchmark's input).

OLMoE-1B-7B-0924: 16 decoder layers, 64 experts (top-8, no renormalisation), hidden 2048, expert
intermediate 1024, 16 heads, vocab 50304, untied lm_head, bfloat16 — about 13.8 GB on disk, stored as
Hugging Face writes it (per-expert ``mlp.experts.E.{gate,up,down}_proj.weight`` keys, safetensors shards
with an index). The weights are random (seeded per tensor: the same seed writes the same bytes) with the
scale of a trained model (projections N(0, 0.02²), norms 1), so perplexities are near the vocabulary size.
The shards are streamed: the header of each shard is computed from the shapes first, then one tensor at a
time is drawn and appended, so the script itself stays well under 1 GB of memory.

The tokenizer is OLMoE's (GPT-NeoX BPE, ``$CIMCONVERT_SHARED_DATA/tokenizers/olmoe/tokenizer.json``).

    CIMCONVERT_SHARED_DATA=... python benchmarks/make_olmoe_shapes.py --out models/olmoe-shapes [--layers 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

from cimconvert.simulator.rng import stable_seed

HIDDEN, INTERMEDIATE, EXPERTS, TOP_K, HEADS, VOCAB = 2048, 1024, 64, 8, 16, 50304
STD = 0.02
SHARD_BYTES = 2 << 30


def olmoe_config(layers: int) -> dict:
    """OLMoE-1B-7B-0924's config.json with ``layers`` decoder layers."""
    return {
        "architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "attention_bias": False,
        "attention_dropout": 0.0, "clip_qkv": None, "bos_token_id": None, "eos_token_id": 50279,
        "pad_token_id": 1, "hidden_act": "silu", "hidden_size": HIDDEN, "initializer_range": STD,
        "intermediate_size": INTERMEDIATE, "max_position_embeddings": 4096, "norm_topk_prob": False,
        "num_attention_heads": HEADS, "num_experts": EXPERTS, "num_experts_per_tok": TOP_K,
        "num_hidden_layers": layers, "num_key_value_heads": HEADS, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False, "dtype": "bfloat16", "vocab_size": VOCAB,
    }  # fmt: skip


def tensor_shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the checkpoint in write order (name, shape)."""
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out.append((f"{p}.self_attn.{proj}.weight", (HIDDEN, HIDDEN)))
        out += [(f"{p}.self_attn.q_norm.weight", (HIDDEN,)), (f"{p}.self_attn.k_norm.weight", (HIDDEN,))]
        out.append((f"{p}.mlp.gate.weight", (EXPERTS, HIDDEN)))
        for e in range(EXPERTS):
            out.append((f"{p}.mlp.experts.{e}.gate_proj.weight", (INTERMEDIATE, HIDDEN)))
            out.append((f"{p}.mlp.experts.{e}.up_proj.weight", (INTERMEDIATE, HIDDEN)))
            out.append((f"{p}.mlp.experts.{e}.down_proj.weight", (HIDDEN, INTERMEDIATE)))
        out += [(f"{p}.{norm}.weight", (HIDDEN,)) for norm in ("input_layernorm", "post_attention_layernorm")]
    out += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return out


def draw(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The bfloat16 values of one tensor: ones for a norm, else N(0, STD²) from its own generator."""
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(stable_seed(seed, name))
    return (torch.randn(shape, generator=generator) * STD).to(torch.bfloat16)


def shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of at most SHARD_BYTES (bfloat16)."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * int(torch.Size(shape).numel())
        if groups[-1] and size + nbytes > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append((name, shape))
        size += nbytes
    return groups


def write_shard(path: Path, group: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """One safetensors file: the header from the shapes, then each tensor drawn and appended in turn."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in group:
        nbytes = 2 * int(torch.Size(shape).numel())
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-len(raw)) % 8)
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", len(raw)))
        handle.write(raw)
        for name, shape in group:
            handle.write(draw(name, shape, seed).view(torch.int16).numpy().tobytes())


def write_tokenizer(out: Path) -> None:
    """OLMoE's tokenizer.json from the shared data folder plus a tokenizer_config.json."""
    shared = os.environ.get("CIMCONVERT_SHARED_DATA")
    source = Path(shared) / "tokenizers" / "olmoe" / "tokenizer.json" if shared else None
    if source is None or not source.is_file():
        sys.exit("set CIMCONVERT_SHARED_DATA to the shared data folder (tokenizers/olmoe/tokenizer.json)")
    shutil.copy2(source, out / "tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
              "pad_token": "<|padding|>", "model_max_length": 4096}  # fmt: skip
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def make_checkpoint(out: Path, layers: int = 16, seed: int = 0) -> dict:
    """Write the checkpoint into ``out`` (replaced); returns a summary (files, bytes, seconds)."""
    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    groups = shards(tensor_shapes(layers))
    weight_map, total = {}, 0
    for index, group in enumerate(groups, 1):
        name = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        write_shard(out / name, group, seed)
        total += (out / name).stat().st_size
        weight_map.update(dict.fromkeys((n for n, _ in group), name))
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(olmoe_config(layers), indent=2) + "\n")
    write_tokenizer(out)
    return {"out": str(out), "layers": layers, "shards": len(groups), "bytes": total,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> None:
    """Command line: ``--out``, ``--layers``, ``--seed``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("models/olmoe-shapes"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(make_checkpoint(args.out, args.layers, args.seed)))


if __name__ == "__main__":
    main()
