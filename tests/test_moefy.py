"""examples/moefy.py on a tiny random Llama: exactness at k = E, balanced experts, a loadable checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from cimconvert.checkpoint import resolve_model

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def moefy():
    """The example script as a module."""
    spec = importlib.util.spec_from_file_location("moefy", REPO / "examples" / "moefy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moefy"] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny():
    """A random 2-layer Llama (hidden 64, intermediate 128, tied embeddings) and calibration ids."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 1e5},
    )
    dense = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    return dense, ids


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_balanced_kmeans_partitions(moefy):
    x = torch.randn(96, 10, generator=torch.Generator().manual_seed(0))
    labels, info = moefy.balanced_kmeans(x, 8, seed=3)
    assert torch.bincount(labels, minlength=8).tolist() == [12] * 8
    again, _ = moefy.balanced_kmeans(x, 8, seed=3)
    assert torch.equal(labels, again)  # seeded
    assert info["iters"] >= 1


@pytest.mark.parametrize("router", ["lsq", "centroid"])
def test_all_experts_reproduce_dense(moefy, tiny, router):
    dense, ids = tiny
    inputs = moefy.collect_ffn_inputs(dense, ids)
    ref = _logits(dense, ids)
    # temperature 0: every renormalised weight is exactly 1/E, so only float rounding remains
    exact = moefy.MoefyOptions(experts=4, top_k=4, router=router, logit_spread=0.0)
    moe = moefy.build_moe(dense, moefy.fit_all(dense, inputs, exact, progress=False), exact)
    assert torch.allclose(_logits(moe, ids), ref, atol=1e-5, rtol=0)
    # the default temperature: weights 1/E up to ~logit_spread
    opts = replace(exact, logit_spread=1e-3)
    moe = moefy.build_moe(dense, moefy.fit_all(dense, inputs, opts, progress=False), opts)
    assert (_logits(moe, ids) - ref).abs().max() < 2e-3 * ref.abs().max()


def test_saved_checkpoint_resolves_and_reloads(moefy, tiny, tmp_path):
    dense, ids = tiny
    opts = moefy.MoefyOptions(experts=4, top_k=2, seed=7)
    fits = moefy.fit_all(dense, moefy.collect_ffn_inputs(dense, ids), opts, progress=False)
    for fit in fits:
        assert sorted(i for c in fit.clusters for i in c) == list(range(128))
        assert {len(c) for c in fit.clusters} == {32}
    moe = moefy.build_moe(dense, fits, opts)
    out = moefy.save(moe, tmp_path / "moe", tmp_path, moefy.record(opts, fits, "tiny-llama"))
    src = resolve_model(out)
    assert src.model_type == "mixtral"
    assert src.config["num_local_experts"] == 4 and src.config["num_experts_per_tok"] == 2
    meta = json.loads((out / "moefication.json").read_text())
    assert meta["options"]["seed"] == 7 and len(meta["layers"]) == 2
    back = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.equal(_logits(back, ids), _logits(moe, ids))
