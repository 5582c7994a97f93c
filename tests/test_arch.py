"""Architecture adapters: every registered type builds, runs, and has every tensor classified right,
in memory (fused experts) and on disk (per-expert / legacy keys); DeepSeek v1 loads without remote code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from tiny_models import (
    TINY_CONFIGS,
    build_tiny,
    read_shapes,
    save_tiny,
    tiny_types,
    write_deepseek_v1_folder,
)

from cimconvert.arch import get_adapter, load_config, load_pretrained, supported_types
from cimconvert.errors import ModelInputError
from cimconvert.profiles.schema import MATMUL_KINDS, TENSOR_KINDS

MOE_TYPES = [t for t in tiny_types() if get_adapter(t).family == "moe"]
SSM_TYPES = [t for t in tiny_types() if get_adapter(t).family == "ssm"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Every tiny model, built once and saved with save_pretrained."""
    root = tmp_path_factory.mktemp("tiny")
    return {t: save_tiny(t, root / t) for t in tiny_types()}


def oracle(model_type: str, name: str) -> tuple[str, str]:
    """Expected (kind, layout), written independently of the adapters' regexes."""
    kind = _oracle_kind(name)
    if kind not in MATMUL_KINDS:
        return kind, "none"
    conv1d = model_type == "gpt2" and kind in ("attention", "mlp")
    return kind, "in_out" if conv1d else "out_in"


def _oracle_kind(name: str) -> str:
    leaf = name.rsplit(".", 1)[-1]
    ssm = {
        "in_proj": "ssm_in_proj",
        "x_proj": "ssm_x_proj",
        "dt_proj": "ssm_dt_proj",
        "out_proj": "ssm_out_proj",
    }
    checks = [
        (name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight")), "router"),
        (name.endswith(("block_sparse_moe.router.weight", "block_sparse_moe.router.layer.weight")), "router"),
        (leaf == "e_score_correction_bias", "bias"),
        (".experts." in name, "expert"),
        (name.endswith(("_moe.input_linear.weight", "_moe.output_linear.weight")), "expert"),
        ("shared_expert_gate" in name, "shared_expert_gate"),
        (".shared_expert." in name or ".shared_experts." in name, "shared_expert"),
        ("norm" in name or ".ln_" in name, "norm"),
        (any(e in name for e in ("embed_tokens", "embeddings", ".wte.", ".wpe.")), "embedding"),
        (name.startswith("lm_head"), "lm_head"),
        (leaf in ("A_log", "D", "dt_bias"), "ssm_param"),
        (".conv1d." in name, "conv"),
        (leaf == "bias", "bias"),
    ]
    for hit, kind in checks:
        if hit:
            return kind
    for proj, kind in ssm.items():
        if f".mixer.{proj}.weight" in name:
            return kind
    if ".self_attn." in name or ".attn." in name:
        return "attention"
    return "mlp" if ".mlp." in name else "other"


# -------------------------------------------------------------------- coverage
@pytest.mark.parametrize("model_type", supported_types())
def test_every_registered_type_has_a_tiny_model(model_type: str) -> None:
    assert model_type in TINY_CONFIGS, f"add a tiny config for '{model_type}' to tests/tiny_models.py"


def test_expected_types_are_registered() -> None:
    expected = {
        "olmoe",
        "qwen2_moe",
        "qwen3_moe",
        "mixtral",
        "deepseek_v2",
        "deepseek_v3",
        "deepseek",
        "granitemoe",
        "mamba",
        "mamba2",
        "falcon_mamba",
        "llama",
        "qwen2",
        "gpt2",
    }
    assert expected <= set(supported_types())


def test_unknown_model_type_is_a_one_line_error() -> None:
    with pytest.raises(ModelInputError) as err:
        get_adapter("bert")
    message = str(err.value)
    assert "bert" in message and "\n" not in message
    assert all(t in message for t in supported_types())
    with pytest.raises(ModelInputError, match="unsupported model type"):
        load_config({"model_type": "bert", "hidden_size": 8})


def test_get_adapter_accepts_configs_and_dicts() -> None:
    assert get_adapter({"model_type": "mixtral"}) is get_adapter("mixtral")
    assert get_adapter(build_tiny("llama").config).model_type == "llama"


# --------------------------------------------------------- in-memory tensors
@pytest.mark.parametrize("model_type", tiny_types())
def test_forward_and_in_memory_classification(model_type: str, tiny: dict) -> None:
    model, _ = tiny[model_type]
    adapter = get_adapter(model_type)
    with torch.no_grad():
        logits = model(torch.arange(6).reshape(1, 6)).logits
    assert logits.shape == (1, 6, 128) and torch.isfinite(logits).all()
    kinds = set()
    for name, param in model.named_parameters():
        got = adapter.classify(name, tuple(param.shape))
        assert got == oracle(model_type, name), name
        assert got[0] in TENSOR_KINDS and got[0] != "other", name
        if got[0] == "expert":
            assert param.dim() == 3 and name.endswith(("gate_up_proj", "down_proj")), name
        kinds.add(got[0])
    family = {
        "moe": {"router", "expert", "attention"},
        "ssm": {"ssm_in_proj", "ssm_out_proj", "conv", "ssm_param"},
        "dense": {"attention", "mlp"},
    }[adapter.family]
    assert family <= kinds


def test_specific_kinds_and_layouts() -> None:
    cases = [
        ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", (4, 32), ("router", "out_in")),
        ("mixtral", "model.layers.0.block_sparse_moe.experts.3.w2.weight", (32, 64), ("expert", "out_in")),
        ("olmoe", "model.layers.0.mlp.experts.gate_up_proj", (4, 128, 32), ("expert", "out_in")),
        ("gpt2", "transformer.h.0.attn.c_attn.weight", (32, 96), ("attention", "in_out")),
        ("gpt2", "h.0.mlp.c_fc.weight", (32, 128), ("mlp", "in_out")),
        ("gpt2", "h.0.attn.bias", (1, 1, 64, 64), ("bias", "none")),
        ("mamba", "backbone.layers.0.mixer.dt_proj.weight", (64, 2), ("ssm_dt_proj", "out_in")),
        ("mamba", "backbone.layers.0.mixer.A_log", (64, 8), ("ssm_param", "none")),
        ("mamba2", "backbone.layers.0.mixer.dt_bias", (4,), ("ssm_param", "none")),
        ("mamba2", "backbone.layers.0.mixer.norm.weight", (64,), ("norm", "none")),
        ("deepseek_v3", "model.layers.1.mlp.gate.e_score_correction_bias", (4,), ("bias", "none")),
        ("deepseek_v2", "model.layers.0.mlp.gate_proj.weight", (64, 32), ("mlp", "out_in")),
        (
            "qwen2_moe",
            "model.layers.1.mlp.shared_expert_gate.weight",
            (1, 32),
            ("shared_expert_gate", "out_in"),
        ),
        ("llama", "model.layers.0.mystery.weight", (4, 4), ("other", "none")),
        ("llama", "model.layers.0.mlp.down_proj.weight", (4,), ("other", "none")),
    ]
    for model_type, name, shape, expected in cases:
        assert get_adapter(model_type).classify(name, shape) == expected, name


# ------------------------------------------------------------ on-disk tensors
@pytest.mark.parametrize("model_type", tiny_types())
def test_on_disk_keys_match_in_memory_kinds(model_type: str, tiny: dict) -> None:
    model, folder = tiny[model_type]
    adapter = get_adapter(model_type)
    state = model.state_dict()
    shapes = read_shapes(folder)
    for key, shape in shapes.items():
        kind = adapter.classify(key, shape)
        assert kind == oracle(model_type, key), key
        memory = adapter.memory_name(key)
        assert memory in state, key
        assert adapter.classify(memory, tuple(state[memory].shape))[0] == kind[0], key
    if model_type == "mixtral":
        assert any(".block_sparse_moe.experts.0.w1." in k for k in shapes)


@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_expert_keys_point_at_the_right_rows(model_type: str, tiny: dict) -> None:
    model, folder = tiny[model_type]
    adapter = get_adapter(model_type)
    state = model.state_dict()
    n_checked = n_fused = 0
    with safe_open(str(folder / "model.safetensors"), "pt") as handle:
        for key in handle.keys():  # noqa: SIM118
            ref = adapter.expert_key(key)
            if ref is None:
                if adapter.classify(key, tuple(handle.get_slice(key).get_shape()))[0] == "expert":
                    # fused on disk too (GraniteMoE): the whole tensor under its in-memory name
                    assert torch.equal(handle.get_tensor(key), state[adapter.memory_name(key)]), key
                    n_fused += 1
                continue
            fused = state[ref.memory_name][ref.expert]
            half = fused.shape[0] // 2
            rows = {"gate": fused[:half], "up": fused[half:], "down": fused}[ref.role]
            assert torch.equal(handle.get_tensor(key), rows), key
            n_checked += 1
    n_layers = sum(1 for _ in adapter.moe_layers(model))
    assert (n_checked, n_fused) in ((3 * 4 * n_layers, 0), (0, 2 * n_layers))


@pytest.mark.parametrize("model_type", tiny_types())
def test_saved_folder_reloads_without_missing_keys(model_type: str, tiny: dict) -> None:
    model, folder = tiny[model_type]
    loaded = load_pretrained(folder)
    ids = torch.arange(5).reshape(1, 5)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)


def test_trust_remote_code_is_refused(tiny: dict) -> None:
    with pytest.raises(ModelInputError, match="trust_remote_code"):
        load_pretrained(tiny["llama"][1], trust_remote_code=True)


# --------------------------------------------------------------- helpers
@pytest.mark.parametrize("model_type", MOE_TYPES)
def test_moe_helpers(model_type: str, tiny: dict) -> None:
    model, _ = tiny[model_type]
    adapter = get_adapter(model_type)
    assert adapter.num_experts(model.config) == 4
    assert adapter.top_k(model.config) == 2
    layers = list(adapter.moe_layers(model))
    dense_first = model_type in ("deepseek", "deepseek_v2", "deepseek_v3", "qwen2_moe")
    assert [m.index for m in layers] == ([1] if dense_first else [0, 1])
    for layer in layers:
        assert layer.router.weight.shape == (4, 32)
        assert layer.experts.gate_up_proj.shape[0] == 4 and layer.experts.down_proj.shape[0] == 4
        has_shared = model_type in ("qwen2_moe", "deepseek", "deepseek_v2", "deepseek_v3")
        assert (layer.shared_experts is not None) == has_shared
        assert (layer.shared_expert_gate is not None) == (model_type == "qwen2_moe")
        assert model.get_submodule(layer.path) is layer.block


def test_routing_config_values(tiny: dict) -> None:
    def cfg(t: str) -> object:
        return tiny[t][0].config

    assert get_adapter("mixtral").norm_topk_prob(cfg("mixtral")) is True
    assert get_adapter("olmoe").norm_topk_prob(cfg("olmoe")) is False
    assert get_adapter("qwen3_moe").norm_topk_prob(cfg("qwen3_moe")) is True
    assert get_adapter("deepseek_v3").scoring(cfg("deepseek_v3")) == "sigmoid"
    assert get_adapter("deepseek").scoring(cfg("deepseek")) == "softmax"
    assert get_adapter("deepseek_v3").routed_scaling_factor(cfg("deepseek_v3")) == 2.5
    assert get_adapter("deepseek").routed_scaling_factor(cfg("deepseek")) == 1.0
    assert get_adapter("mamba").tied_embeddings(cfg("mamba")) is True
    assert get_adapter("mamba2").tied_embeddings(cfg("mamba2")) is False
    with pytest.raises(ModelInputError, match="no experts"):
        get_adapter("mamba").num_experts(cfg("mamba"))


@pytest.mark.parametrize("model_type", SSM_TYPES)
def test_ssm_out_projs(model_type: str, tiny: dict) -> None:
    model, _ = tiny[model_type]
    found = get_adapter(model_type).ssm_out_projs(model)
    assert [path for path, _ in found] == [f"backbone.layers.{i}.mixer.out_proj" for i in range(2)]
    assert all(isinstance(m, torch.nn.Linear) for _, m in found)


# ------------------------------------------------------------- DeepSeek v1
def _moe_reference(x: torch.Tensor, folder: Path, layer: int, cfg: dict) -> torch.Tensor:
    """The v1 MoE block by hand from the v1 checkpoint keys: softmax, greedy top-k, no renorm, + shared."""
    pre = f"model.layers.{layer}.mlp"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        w = {k: f.get_tensor(k) for k in f.keys() if k.startswith(pre)}  # noqa: SIM118

    def mlp(h: torch.Tensor, p: str) -> torch.Tensor:
        gate, up, down = (w[f"{p}.{n}_proj.weight"] for n in ("gate", "up", "down"))
        return (F.silu(h @ gate.T) * (h @ up.T)) @ down.T

    flat = x.reshape(-1, x.shape[-1])
    scores = torch.softmax(flat @ w[f"{pre}.gate.weight"].T, dim=-1)
    top_w, top_i = torch.topk(scores, cfg["num_experts_per_tok"], dim=-1)
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for k in range(top_i.shape[1]):
            out[t] += top_w[t, k] * mlp(flat[t], f"{pre}.experts.{int(top_i[t, k])}")
    return out.reshape(x.shape) + mlp(x, f"{pre}.shared_experts")


def test_deepseek_v1_folder_loads_without_remote_code(tmp_path: Path) -> None:
    original, folder = write_deepseek_v1_folder(tmp_path / "v1")
    assert not list(folder.glob("*.py"))
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["DeepseekForCausalLM"] and "auto_map" in config
    model = load_pretrained(folder)  # strict: missing/unexpected keys would raise
    cls = type(model)
    assert cls.__module__ == "cimconvert.arch.deepseek_v1_model"
    _, info = cls.from_pretrained(str(folder), config=model.config, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = torch.arange(7).reshape(1, 7)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, original(ids).logits, atol=1e-6)
        torch.manual_seed(1)
        x = torch.randn(2, 3, 32)
        expected = _moe_reference(x, folder, 1, TINY_CONFIGS["deepseek"])
        assert torch.allclose(model.model.layers[1].mlp(x), expected, atol=1e-5)
        model.set_experts_implementation("eager")
        assert torch.allclose(model.model.layers[1].mlp(x), expected, atol=1e-5)


def test_deepseek_v1_structure_and_renormalisation() -> None:
    model = build_tiny("deepseek")
    assert hasattr(model.model.layers[0].mlp, "gate_proj")  # first_k_dense_replace = 1 → dense
    assert model.model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (2 * 16, 32)
    router = model.model.layers[1].mlp.gate
    x = torch.randn(5, 32)
    _, weights, _ = router(x)
    assert (weights.sum(-1) < 1).all()  # no renormalisation by default
    router.norm_topk_prob = True
    _, weights, _ = router(x)
    assert torch.allclose(weights.sum(-1), torch.ones(5))


def test_deepseek_v1_rejects_sigmoid_scoring() -> None:
    with pytest.raises(ModelInputError, match="scoring_func"):
        load_config({**TINY_CONFIGS["deepseek"], "scoring_func": "sigmoid"})
