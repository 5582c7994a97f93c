"""ROMER: routing hook exactness, replacement, calibration fits, bundle loaders, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_CONFIGS, build_tiny
from transformers import AutoTokenizer

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter, supported_types
from cimconvert.arch.loading import build_model, load_config
from cimconvert.bundle.manifest import TransformEntry
from cimconvert.checkpoint import resolve_model
from cimconvert.datasets import load_text, tokenize
from cimconvert.errors import CimError
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.methods import METHODS, all_options, resolve_method
from cimconvert.methods.calibration import calibration_batches, calibration_tokens
from cimconvert.methods.romer import (
    METHOD,
    LayerRouting,
    RomerConfig,
    calibration_stats,
    collect,
    install_hook,
    moe_routers,
    remove_hook,
    save_router_logits,
)
from cimconvert.methods.romer.calibrate import column_percentiles, fit_affine
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.transforms import TRANSFORM_LOADERS

#: every registered MoE architecture (a new adapter is covered without editing this list)
MOE_TYPES = [t for t in supported_types() if get_adapter(t).family == "moe"]
ROUTER = r"re:.*\.mlp\.gate\.weight"
DEMO_OLMOE = Path(__file__).resolve().parent.parent / "examples" / "models" / "tiny-olmoe"


def _variant(model_type: str, **changes: object) -> torch.nn.Module:
    return build_model(load_config({**TINY_CONFIGS[model_type], **changes}), seed=0)


def _models() -> list[tuple[str, torch.nn.Module]]:
    extra = [
        (
            "deepseek_v2-group",
            _variant("deepseek_v2", topk_method="group_limited_greedy", n_group=2, topk_group=1),
        ),
        ("deepseek_v3-group", _variant("deepseek_v3", n_group=2, topk_group=1, norm_topk_prob=False)),
    ]
    return [(t, build_tiny(t)) for t in MOE_TYPES] + extra


def _options(**changes: object) -> dict[str, object]:
    opts: dict[str, object] = {o.name: o.default for o in METHOD.options}
    opts.update(calib_tokens=torch.randint(3, 128, (4, 32), generator=torch.Generator().manual_seed(1)))
    opts.update(changes)
    return opts


def _identity(moe, index: int) -> LayerRouting:
    n = moe.num_experts
    return LayerRouting(layer=index, num_experts=n, calibration="affine", a=[1.0] * n, b=[0.0] * n)


@pytest.mark.parametrize(("name", "model"), _models(), ids=lambda x: x if isinstance(x, str) else "")
def test_identity_calibration_reproduces_stock_routing(name: str, model: torch.nn.Module) -> None:
    moe = moe_routers(model, get_adapter(model.config.model_type))
    hidden = torch.randn(37, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    if name.startswith("deepseek_v3"):
        for m in moe.layers:
            m.router.e_score_correction_bias.copy_(torch.linspace(-0.1, 0.1, moe.num_experts))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    stock = [m.router(hidden) for m in moe.layers]
    ref = model(input_ids=ids).logits
    for m in moe.layers:
        install_hook(m.router, _identity(moe, m.index), moe.rules[m.index])
    hooked = [m.router(hidden) for m in moe.layers]
    out = model(input_ids=ids).logits
    for m in moe.layers:
        remove_hook(m.router)
    for (z0, w0, i0), (z1, w1, i1) in zip(stock, hooked, strict=True):
        assert torch.equal(z0, z1) and torch.equal(i0, i1) and torch.equal(w0, w1) and w0.dtype == w1.dtype
    assert torch.equal(ref, out)


def test_calibration_hook_changes_routing_deepseek_v3_sigmoid() -> None:
    model = build_tiny("deepseek_v3")
    moe = moe_routers(model, get_adapter("deepseek_v3"))
    m = moe.layers[0]
    hidden = torch.randn(50, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    _, _, before = m.router(hidden)
    n = moe.num_experts
    spec = LayerRouting(
        layer=m.index, num_experts=n, calibration="affine", a=[1.0] * n, b=[5.0] + [0.0] * (n - 1)
    )
    install_hook(m.router, spec, moe.rules[m.index])
    _, _, after = m.router(hidden)
    remove_hook(m.router)
    assert (after == 0).any(dim=-1).all() and not (before == 0).any(dim=-1).all()


def test_affine_fit_maps_percentiles_synthetic() -> None:
    g = torch.Generator().manual_seed(0)
    clean = torch.randn(4000, 6, generator=g) * torch.linspace(0.5, 2.0, 6) + torch.linspace(-1, 1, 6)
    noisy = 0.6 * clean + 0.3 + 0.05 * torch.randn(4000, 6, generator=g)
    a, b = fit_affine(noisy, clean, 5.0, 95.0)
    calibrated = noisy * torch.tensor(a) + torch.tensor(b)
    assert torch.allclose(column_percentiles(calibrated, (5.0, 95.0)), column_percentiles(clean, (5.0, 95.0)),
                          atol=1e-4)  # fmt: skip


def test_affine_calibration_matches_clean_percentiles_on_calibration_data() -> None:
    model = build_tiny("olmoe")
    adapter = get_adapter("olmoe")
    profile = load_profile("chipA:drift.compensation=none,t_inference=86400")
    opts = _options(calib_mode="in-situ", insitu_seed=3, analog=(ROUTER,), router_deadband=0.0)
    METHOD.apply(model, adapter, profile, opts, progress=False)
    moe = moe_routers(model, adapter)
    tokens = opts["calib_tokens"]
    targets = plan_model(model, profile, analog=(ROUTER,)).analog()
    with apply_chip_noise(model, targets, profile, 3):
        calibrated = collect(model, moe.routers, moe.num_experts, tokens)
    for m in moe.layers:
        remove_hook(m.router)
    clean = collect(model, moe.routers, moe.num_experts, tokens)
    first = moe.layers[0].index
    got = column_percentiles(calibrated.logits[first], (5.0, 95.0))
    want = column_percentiles(clean.logits[first], (5.0, 95.0))
    assert torch.allclose(got, want, atol=1e-4)


def test_replicate_split_sends_donor_tokens_to_formerly_cold_slot() -> None:
    model = build_tiny("olmoe")
    adapter = get_adapter("olmoe")
    res = METHOD.apply(model, adapter, load_profile("gaussian:sigma=0.1"),
                       _options(replacement="replicate_split", replace_bottom=1, router_calibration="none"),
                       progress=False)  # fmt: skip
    moe = moe_routers(model, adapter)
    after = collect(model, moe.routers, moe.num_experts, _options()["calib_tokens"])
    for layer in res.report["layers"]:
        (cold, donor), i = layer["pairs"][0], layer["layer"]
        experts = moe.layer(i).experts
        assert torch.equal(experts.gate_up_proj[cold], experts.gate_up_proj[donor])
        assert torch.equal(experts.down_proj[cold], experts.down_proj[donor])
        assert int(after.counts[i][cold]) == int(after.counts[i][donor]) > 0
        assert after.counts[i][cold] > layer["noisy_freq"][cold] * after.tokens


def test_substitute_gives_cold_slot_the_donor_function() -> None:
    model = build_tiny("qwen2_moe")
    adapter = get_adapter("qwen2_moe")
    res = METHOD.apply(model, adapter, load_profile("gaussian:sigma=0.1"),
                       _options(replacement="substitute", replace_bottom=2, router_calibration="none"),
                       progress=False)  # fmt: skip
    assert [t["type"] for t in res.transforms] == ["romer_replacement"]
    moe = moe_routers(model, adapter)
    for layer in res.report["layers"]:
        for cold, donor in layer["pairs"]:
            assert torch.equal(moe.layer(layer["layer"]).experts.gate_up_proj[cold],
                               moe.layer(layer["layer"]).experts.gate_up_proj[donor])  # fmt: skip
            assert cold not in [c for c, _ in layer["pairs"] if c == donor]


ROUNDTRIP_TYPES = ["olmoe", "qwen2_moe", "deepseek_v2", "deepseek_v3", "deepseek", "mixtral", "granitemoe"]


@pytest.mark.parametrize("model_type", ROUNDTRIP_TYPES)
def test_apply_transforms_json_and_loader_roundtrip(model_type: str, tmp_path: Path) -> None:
    model = build_tiny(model_type)
    adapter = get_adapter(model_type)
    opts = _options(replacement="replicate_split", replace_bottom=1, router_deadband=0.0,
                    router_calibration="token_norm" if model_type == "mixtral" else "affine")  # fmt: skip
    res = METHOD.apply(model, adapter, load_profile("gaussian:sigma=0.2"), opts, progress=False)
    entries = json.loads(json.dumps(res.transforms))
    json.dumps(res.report)
    assert {e["type"] for e in entries} == {"romer_replacement", "romer_routing"}
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    want = model(input_ids=ids).logits
    fresh = build_tiny(model_type)  # original weights: the loader re-applies the copies too
    for entry in entries:
        TRANSFORM_LOADERS[entry["type"]](fresh, TransformEntry(**entry), tmp_path)
    assert torch.allclose(fresh(input_ids=ids).logits, want, atol=1e-6, rtol=0)


def test_insitu_logits_file_gives_same_fit_as_simulated_instance(tmp_path: Path) -> None:
    model = build_tiny("olmoe")
    adapter = get_adapter("olmoe")
    profile = load_profile("chipA:drift.compensation=none")
    moe = moe_routers(model, adapter)
    opts = _options(calib_mode="in-situ", insitu_seed=4, analog=(ROUTER,), router_deadband=0.0)
    targets = plan_model(model, profile, analog=(ROUTER,)).analog()
    cfg = RomerConfig.from_options(opts)
    stats = calibration_stats(model, moe, opts["calib_tokens"], targets, profile, cfg)
    path = tmp_path / "chip_logits.safetensors"
    save_router_logits(path, opts["calib_tokens"], stats.noisy)
    file_opts = {**opts, "insitu_logits": str(path)}
    from_file = METHOD.apply(build_tiny("olmoe"), adapter, profile, file_opts, progress=False)
    simulated = METHOD.apply(model, adapter, profile, opts, progress=False)
    assert from_file.report["logits_source"] == "measured"
    a = [entry["params"]["layers"] for entry in from_file.transforms]
    b = [entry["params"]["layers"] for entry in simulated.transforms]
    assert a == b


def test_registration_and_options() -> None:
    assert "romer" in METHODS  # a recipe step; not in the MoE default (methods/defaults.py, docs/ROMER.md)
    assert resolve_method("auto", "moe") == "outlier_channels+output_correction"
    flags = {o.flag for o in all_options()}
    for flag in ("--calib-data", "--calib-samples", "--calib-seq-len", "--calib-seeds", "--calib-mode",
                 "--insitu-seed", "--insitu-logits", "--replacement", "--replace-tau", "--router-calibration",
                 "--router-p-lo", "--router-p-hi", "--router-q"):  # fmt: skip
        assert flag in flags
    with pytest.raises(CimError, match="applies to moe"):
        resolve_method("romer", "dense")


def test_dense_model_is_refused() -> None:
    with pytest.raises(CimError, match="mixture-of-experts"):
        METHOD.apply(build_tiny("llama"), get_adapter("llama"), load_profile("chipA"), _options(), False)


def test_router_not_found() -> None:
    model = build_tiny("olmoe")
    for layer in model.model.layers:
        layer.mlp.gate = None
    with pytest.raises(CimError, match="no MoE router found"):
        METHOD.apply(model, get_adapter("olmoe"), load_profile("chipA"), _options(), False)


class _CharTokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


def test_calibration_text_too_short() -> None:
    assert calibration_batches("x" * 100, _CharTokenizer(), 3, 32).shape == (3, 32)
    with pytest.raises(CimError, match=r"too short for --calib-samples 4 x --calib-seq-len 32") as err:
        calibration_batches("x" * 100, _CharTokenizer(), 4, 32, name="tiny.txt")
    assert "\n" not in str(err.value)


def test_bad_option_values() -> None:
    with pytest.raises(CimError, match="--router-p-lo"):
        RomerConfig.from_options({"router_p_lo": 90.0, "router_p_hi": 10.0})
    with pytest.raises(CimError, match="--calib-mode"):
        RomerConfig.from_options({"calib_mode": "sometimes"})


@pytest.mark.slow
@pytest.mark.skipif(not (DEMO_OLMOE / "model.safetensors").is_file(), reason="demo tiny-olmoe not trained")
def test_trained_olmoe_calibration_recovers_drift_damage_on_unseen_draw() -> None:
    model = resolve_model(str(DEMO_OLMOE)).load_model(dtype=torch.float32)
    adapter = get_adapter("olmoe")
    ids = tokenize(AutoTokenizer.from_pretrained(str(DEMO_OLMOE)), load_text("heldout"), 2048)
    profile = load_profile("chipA:drift.compensation=none,t_inference=604800")
    targets = plan_model(model, profile, analog=(ROUTER,)).analog()

    def noisy() -> float:
        with apply_chip_noise(model, targets, profile, 1000):
            return perplexity(model, ids, seq_len=256)

    clean, before = perplexity(model, ids, seq_len=256), noisy()
    opts = {**_options(calib_samples=8, calib_seq_len=256, analog=(ROUTER,)), "calib_tokens": None}
    res = METHOD.apply(model, adapter, profile, opts, progress=False)
    after = noisy()
    assert res.report["layers"][0]["logit_spread_ratio"] < 0.8
    assert (before - after) / (before - clean) > 0.3


def test_ideal_profile_leaves_model_unchanged() -> None:
    res = METHOD.apply(build_tiny("olmoe"), get_adapter("olmoe"), load_profile("ideal"), _options(), False)
    assert res.transforms == [] and "skipped" in res.report


def test_calibration_sequences_shortened_to_the_model_context() -> None:
    """The default --calib-seq-len (256) on a model with a shorter context is clamped, with a warning."""
    model = build_tiny("olmoe")
    model.config.max_position_embeddings = 64
    tokenizer = AutoTokenizer.from_pretrained(DEMO_OLMOE)
    with pytest.warns(UserWarning, match="shortened from 256 to the model's 64"):
        tokens = calibration_tokens(model, {"calib_samples": 3, "calib_seq_len": 256, "tokenizer": tokenizer})
    assert tuple(tokens.shape) == (3, 64)
