"""Model-level noise: in-place programming, restore, seeding and per-MVM hooks on tiny HF models."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    MambaConfig,
    MambaForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
)

from cimconvert.analog.chip_noise import EXPERTS_IMPLEMENTATION, apply_chip_noise
from cimconvert.errors import ModelInputError
from cimconvert.profiles import load_profile
from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator.rng import stable_seed

torch.set_num_threads(1)

DIGITAL_PARTS = ("embed", "wte", "wpe", "lm_head", "mlp.gate.weight", "conv1d", "norm", "ln_", "A_log")

HIGH_RES_MVM = {
    "programming.kind": "none",
    "drift.kind": "none",
    "read_noise.kind": "none",
    "mvm.dac_bits": "16",
    "mvm.adc_bits": "16",
    "mvm.out_noise": "0",
    "mvm.out_bound": "30",
}


def build_olmoe() -> nn.Module:
    config = OlmoeConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        num_experts=4,
        num_experts_per_tok=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return OlmoeForCausalLM(config)


def build_gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


def build_mamba() -> nn.Module:
    config = MambaConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        state_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return MambaForCausalLM(config)


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "olmoe": build_olmoe,
    "gpt2": build_gpt2,
    "mamba": build_mamba,
}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request: pytest.FixtureRequest) -> SimpleNamespace:
    torch.manual_seed(0)
    model = BUILDERS[request.param]().eval()
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    return SimpleNamespace(
        kind=request.param, model=model, ids=ids, targets=analog_targets(model, request.param)
    )


def analog_targets(model: nn.Module, kind: str) -> list[SimpleNamespace]:
    """Matmul weights of the tiny model (what placement.py would mark analog), as simple targets."""
    layout = "in_out" if kind == "gpt2" else "out_in"
    return [
        SimpleNamespace(name=name, layout=layout if param.dim() == 2 else "out_in")
        for name, param in model.named_parameters()
        if param.dim() in (2, 3) and not any(part in name for part in DIGITAL_PARTS)
    ]


def logits(tiny: SimpleNamespace) -> torch.Tensor:
    with torch.no_grad():
        return tiny.model(tiny.ids).logits


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_noise_changes_logits_and_restore_is_bit_exact(tiny: SimpleNamespace) -> None:
    clean, params = logits(tiny), snapshot(tiny.model)
    handle = apply_chip_noise(tiny.model, tiny.targets, load_profile("chipA"), seed=3)
    noisy = logits(tiny)
    assert torch.isfinite(noisy).all() and not torch.equal(noisy, clean)
    assert sorted(handle.perturbed) == sorted(t.name for t in tiny.targets)
    handle.restore()
    assert torch.equal(logits(tiny), clean)
    assert all(torch.equal(p, params[n]) for n, p in tiny.model.named_parameters())
    handle.restore()  # idempotent


def test_weight_only_profile_changes_logits_without_hooks(tiny: SimpleNamespace) -> None:
    clean = logits(tiny)
    with apply_chip_noise(tiny.model, tiny.targets, load_profile("gaussian:sigma=0.1"), seed=0) as handle:
        assert not torch.equal(logits(tiny), clean)
        assert handle.mvm_simulated == [] and not handle.mvm_calls
    assert torch.equal(logits(tiny), clean)


def test_ideal_profile_changes_nothing(tiny: SimpleNamespace) -> None:
    clean = logits(tiny)
    with apply_chip_noise(tiny.model, tiny.targets, load_profile("ideal"), seed=0) as handle:
        assert torch.equal(logits(tiny), clean)
        assert handle.perturbed == [] and handle.profile_hash == load_profile("ideal").content_hash()


def test_mvm_hooks_fire(tiny: SimpleNamespace) -> None:
    with apply_chip_noise(tiny.model, tiny.targets, load_profile("chipA"), seed=0) as handle:
        logits(tiny)
        calls = dict(handle.mvm_calls)
    expected = {
        "olmoe": ["self_attn.q_proj.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "gpt2": ["attn.c_attn.weight", "mlp.c_proj.weight"],
        "mamba": ["mixer.in_proj.weight", "mixer.x_proj.weight", "mixer.out_proj.weight"],
    }[tiny.kind]
    for suffix in expected:
        hits = [name for name in calls if name.endswith(suffix)]
        assert len(hits) == 2 and all(calls[h] > 0 for h in hits), (suffix, calls)
    if tiny.kind == "mamba":
        assert sorted(handle.weight_only) == [f"backbone.layers.{i}.mixer.dt_proj.weight" for i in range(2)]
    else:
        assert handle.weight_only == []
    assert set(handle.mvm_simulated) | set(handle.weight_only) == set(handle.perturbed)


def test_high_resolution_mvm_reproduces_clean_logits(tiny: SimpleNamespace) -> None:
    """With exact weights and 16-bit converters the simulated matmuls (Linear, Conv1D, experts) are exact."""
    clean = logits(tiny)
    with apply_chip_noise(tiny.model, tiny.targets, load_profile("chipA", HIGH_RES_MVM), seed=0) as handle:
        simulated = logits(tiny)
        assert handle.mvm_calls
    assert not torch.equal(simulated, clean)
    assert (simulated - clean).abs().max() < 2e-3 * clean.abs().max()


def test_seeding(tiny: SimpleNamespace) -> None:
    profile = load_profile("chipA")
    runs = {}
    for key, seed in (("a", 5), ("b", 5), ("c", 6)):
        with apply_chip_noise(tiny.model, tiny.targets, profile, seed=seed):
            runs[key] = (snapshot(tiny.model), logits(tiny))
    name = tiny.targets[0].name
    assert torch.equal(runs["a"][0][name], runs["b"][0][name]) and torch.equal(runs["a"][1], runs["b"][1])
    assert not torch.equal(runs["a"][0][name], runs["c"][0][name])
    assert not torch.equal(runs["a"][1], runs["c"][1])


def test_per_tensor_draw_is_independent_of_other_targets(tiny: SimpleNamespace) -> None:
    profile: ChipProfile = load_profile("chipA")
    first = tiny.targets[0].name
    with apply_chip_noise(tiny.model, tiny.targets, profile, seed=9):
        with_all = snapshot(tiny.model)[first]
    with apply_chip_noise(tiny.model, tiny.targets[:1], profile, seed=9) as handle:
        alone = snapshot(tiny.model)[first]
        assert handle.perturbed == [first]
    assert torch.equal(with_all, alone)


def test_experts_implementation_switched_and_restored() -> None:
    torch.manual_seed(0)
    model = build_olmoe().eval()
    before = model.config._experts_implementation
    layer0 = [
        SimpleNamespace(name=f"model.layers.0.mlp.experts.{p}", layout="out_in") for p in ("down_proj",)
    ]
    ids = torch.randint(3, 128, (1, 10))
    with torch.no_grad():
        clean = model(ids).logits
    with apply_chip_noise(model, layer0, load_profile("chipA"), seed=0) as handle:
        assert model.config._experts_implementation == EXPERTS_IMPLEMENTATION
        with torch.no_grad():
            out = model(ids).logits
        assert torch.isfinite(out).all() and not torch.equal(out, clean)
        assert set(handle.mvm_calls) == {"model.layers.0.mlp.experts.down_proj"}  # layer 1 falls back
    assert model.config._experts_implementation == before


def test_bad_targets_raise() -> None:
    model = build_gpt2()
    with pytest.raises(ModelInputError, match="not a parameter"):
        apply_chip_noise(
            model, [SimpleNamespace(name="nope.weight", layout="out_in")], load_profile("chipA"), 0
        )
    with pytest.raises(ModelInputError, match="layout"):
        apply_chip_noise(
            model,
            [SimpleNamespace(name="transformer.h.0.attn.c_attn.weight", layout="none")],
            load_profile("chipA"),
            0,
        )


def test_stable_seed_is_process_independent() -> None:
    assert stable_seed(0, "a.weight") == stable_seed(0, "a.weight") != stable_seed(1, "a.weight")
    assert stable_seed(0, "a.weight") == 1929193105674123274
