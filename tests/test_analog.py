"""The analog-execution layer: routes, one experts implementation, kernels plugged in and undone exactly."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build_tiny

from cimconvert.analog import EXPERTS_IMPLEMENTATION, AnalogPatch, CleanKernel, clean_scales, route_of
from cimconvert.profiles import load_profile
from cimconvert.simulator import tile_grid, weight_scales


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def test_routes_of_every_kind() -> None:
    assert route_of(build_tiny("gpt2"), "transformer.h.0.attn.c_attn.weight") == "linear"
    olmoe = build_tiny("olmoe")
    assert route_of(olmoe, "model.layers.0.mlp.experts.gate_up_proj") == "experts"
    assert route_of(olmoe, "model.layers.0.self_attn.q_proj.weight") == "linear"
    assert route_of(build_tiny("mamba"), "backbone.layers.0.mixer.dt_proj.weight") == "weight"


class _Counting(CleanKernel):
    def __init__(self) -> None:
        self.seen: set[str] = set()

    def linear(self, name: str, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(name)
        return super().linear(name, module, x)

    def expert(self, name: str, module: torch.nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
        self.seen.add(name)
        return super().expert(name, module, expert, x)


@pytest.mark.parametrize("model_type", ["gpt2", "olmoe", "mamba"])
@pytest.mark.parametrize("dispatch", ["sparse", "static"])
def test_clean_kernel_reproduces_the_model_and_closes_exactly(model_type: str, dispatch: str) -> None:
    model = build_tiny(model_type).eval()
    expected = _logits(model)
    config_before = model.config._experts_implementation_internal
    names = [n for n, p in model.named_parameters() if p.dim() >= 2 and "emb" not in n and "wte" not in n]
    kernel = _Counting()
    with AnalogPatch(model, kernel, dispatch=dispatch) as patch:  # type: ignore[arg-type]
        routes = {name: patch.route(name) for name in names}
        routed = {n for n, r in routes.items() if r != "weight"}
        assert routed
        assert all(r == "weight" for n, r in routes.items() if ".dt_proj." in n)
        if any(r == "experts" for r in routes.values()):
            assert model.config._experts_implementation_internal == EXPERTS_IMPLEMENTATION
        got = _logits(model)
    assert kernel.seen == routed and set(patch.calls) == routed
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert model.config._experts_implementation_internal == config_before
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert torch.equal(_logits(model), expected)


@pytest.mark.parametrize("shape", [(48, 40), (3, 48, 40)])
@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_clean_scales_are_mapping_scales_of_the_out_in_weight(shape: tuple[int, ...], layout: str) -> None:
    profile = load_profile("chipA")
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    w3 = w if w.dim() == 3 else w.unsqueeze(0)
    w3 = w3.transpose(-1, -2) if layout == "in_out" else w3
    scales = weight_scales(w3, profile.mapping, tile_grid(w3.shape, profile.mapping))
    expected = scales if w.dim() == 3 else scales[0]
    assert torch.equal(clean_scales(w, layout, profile), expected)  # type: ignore[arg-type]
