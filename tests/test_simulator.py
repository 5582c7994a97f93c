"""Pure-torch simulator: tiles, mapping, programming noise, drift, 1/f noise, faults, levels, MVM."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import cimconvert.simulator.program as program_module
from cimconvert.profiles import load_profile
from cimconvert.profiles.schema import ChipProfile
from cimconvert.simulator import (
    add_poly_noise,
    add_read_noise,
    analog_matmul,
    apply_drift,
    draw_nu,
    poly_sigma,
    prepare_mvm,
    program_weight,
    quantise_,
    read_noise_sigma,
    split_sizes,
    tile_grid,
    weight_scales,
)
from cimconvert.simulator.curves import eval_curve, eval_poly

torch.set_num_threads(1)

QUIET = {"drift.kind": "none", "read_noise.kind": "none", "mvm.dac_bits": "null", "mvm.adc_bits": "null"}


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def profile(name: str, **overrides: str) -> ChipProfile:
    return load_profile(name, {k.replace("__", "."): v for k, v in overrides.items()})


def unit_rows(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Uniform weights in [-1, 1] with every row's abs-max pinned to exactly 1."""
    w = torch.rand(rows, cols, generator=gen(seed)) * 2 - 1
    w[:, 0] = 1.0
    return w


# --- tiles


@pytest.mark.parametrize(
    ("n", "size", "expected"),
    [
        (1000, 512, [500, 500]),
        (1001, 512, [501, 500]),
        (512, 512, [512]),
        (1, 512, [1]),
        (1025, 512, [342] * 2 + [341]),
    ],
)
def test_split_sizes(n: int, size: int, expected: list[int]) -> None:
    assert split_sizes(n, size) == expected


def test_tile_grid_2d_and_experts() -> None:
    mapping = load_profile("chipA").mapping
    grid = tile_grid((1000, 700), mapping)
    assert grid.out_sizes == (500, 500) and grid.in_sizes == (350, 350) and grid.n_tiles == 4
    grid3 = tile_grid((8, 300, 1024), mapping)
    assert grid3.out_sizes == (300,) and grid3.in_sizes == (512, 512) and grid3.n_tiles == 16


def test_tile_scale_uses_per_tile_absmax() -> None:
    p = profile("chipA", mapping__scale="tile")
    w = torch.randn(1000, 700, generator=gen())
    w[10, 20] = 50.0  # only tile (0, 0) sees this value
    grid = tile_grid(w.shape, p.mapping)
    scales = weight_scales(w, p.mapping, grid)
    assert scales.shape == (1000, 2)
    for ro, (r0, r1) in enumerate([(0, 500), (500, 1000)]):
        for ci, (c0, c1) in enumerate([(0, 350), (350, 700)]):
            block = scales[r0:r1, ci]
            assert torch.all(block == w[r0:r1, c0:c1].abs().max()), (ro, ci)
    assert scales[0, 0] == 50.0 and scales[0, 1] < 50.0


def test_channel_scale_is_per_row_within_input_tile() -> None:
    p = load_profile("chipA")
    w = torch.randn(4, 1000, generator=gen())
    scales = weight_scales(w, p.mapping, tile_grid(w.shape, p.mapping))
    expected = torch.stack([w[:, :500].abs().amax(1), w[:, 500:].abs().amax(1)], dim=1)
    assert torch.equal(scales, expected)


def test_expert_scales_are_per_expert() -> None:
    p = profile("chipA", mapping__scale="tensor")
    w = torch.randn(3, 16, 32, generator=gen())
    w[1] *= 100
    scales = weight_scales(w, p.mapping, tile_grid(w.shape, p.mapping))
    assert scales.shape == (3, 16, 1)
    assert torch.all(scales == w.abs().max())  # 'tensor' = one scale for the whole tensor
    p = profile("chipA", mapping__scale="tile")
    scales = weight_scales(w, p.mapping, tile_grid(w.shape, p.mapping))
    assert torch.allclose(scales[:, 0, 0], w.abs().amax(dim=(1, 2)))


# --- programming


@pytest.mark.parametrize("name", ["chipA", "hermes", "chipB"])
def test_programming_std_matches_polynomial(name: str) -> None:
    p = profile(name, programming__clamp_nonnegative="false", **QUIET)
    w = unit_rows(512, 512)
    w_prog = program_weight(w, p, gen(1))
    span = p.mapping.g_max - p.mapping.g_min
    dg = (w_prog - w) * span  # scale = 1 per row: conductance error of g+ − g−
    x = w.abs()
    # both devices of the pair are programmed: the idle one at g_min = 0 gets σ(0)
    expected = torch.sqrt(poly_sigma(x, p) ** 2 + poly_sigma(torch.zeros(1), p) ** 2)
    z = dg / expected
    edges = torch.linspace(0, 1, 11)
    for lo, hi in itertools.pairwise(edges):
        sel = (x >= lo) & (x < hi)
        n = int(sel.sum())
        assert abs(z[sel].std().item() - 1.0) < 5 / math.sqrt(2 * n), (name, float(lo))
        assert abs(z[sel].mean().item()) < 5 / math.sqrt(n)


def test_poly_sigma_rescales_with_g_max() -> None:
    p = load_profile("chipA")
    x = torch.tensor([0.0, 0.5, 1.0])
    assert torch.allclose(poly_sigma(x, p), torch.tensor([0.26348, 0.952705, 1.05538]), atol=1e-5)
    p2 = profile("chipA", mapping__g_max="50", prog_scale="2")
    assert torch.allclose(poly_sigma(x, p2), 4 * poly_sigma(x, p))


def test_chipb_coefficients_follow_t_inference() -> None:
    x = torch.tensor([0.25, 0.5, 1.0])
    one_day = poly_sigma(x, load_profile("chipB"))
    one_sec = poly_sigma(x, profile("chipB", t_inference="1"))
    assert torch.allclose(one_day, torch.tensor([3.72, 3.91, 2.65]), atol=0.02)
    assert torch.allclose(one_sec, torch.tensor([2.26, 2.02, 1.10]), atol=0.02)


def test_clamp_keeps_conductances_nonnegative() -> None:
    p = load_profile("chipA")
    g = torch.zeros(2, 1000)
    g_prog = add_poly_noise(g, p, gen())
    assert g_prog.min() >= 0 and g_prog.mean() > 0.05  # the small-weight bias is real and kept


def test_relative_gaussian_std_per_channel_and_per_tile() -> None:
    for granularity in ("channel", "tile"):
        p = load_profile(f"gaussian:sigma=0.2,granularity={granularity}")
        w = torch.randn(1000, 700, generator=gen())
        scales = weight_scales(w, p.mapping, tile_grid(w.shape, p.mapping))
        scale_full = scales.repeat_interleave(350, dim=1)
        z = (program_weight(w, p, gen(3)) - w) / scale_full
        assert abs(z.std().item() - 0.2) < 0.002, granularity
        assert abs(z.mean().item()) < 0.002


# --- drift / 1/f


def fixed_nu_profile(compensation: str) -> ChipProfile:
    return profile(
        "chipA",
        programming__kind="none",
        read_noise__kind="none",
        drift__nu_mean="[{poly: [0.05]}]",
        drift__nu_std="[{poly: [0.0]}]",
        drift__compensation=compensation,
    )


def test_drift_factor_for_fixed_nu() -> None:
    p = fixed_nu_profile("none")
    w = torch.randn(64, 64, generator=gen())
    factor = ((3600 + 20) / 20) ** -0.05
    assert torch.allclose(program_weight(w, p, gen()), w * factor, rtol=1e-5, atol=1e-7)
    nu = draw_nu(torch.full((2, 100), 10.0), p.drift, 25.0, gen())
    assert torch.all(nu == 0.05)
    assert torch.allclose(
        apply_drift(torch.ones(3), torch.tensor([0.0, 0.05, 0.1]), 1000, 20),
        (1020 / 20) ** -torch.tensor([0.0, 0.05, 0.1]),
    )


def test_global_compensation_restores_fixed_drift() -> None:
    w = torch.randn(64, 64, generator=gen())
    assert torch.allclose(program_weight(w, fixed_nu_profile("global"), gen()), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["global", "per_column"])
def test_compensation_restores_mean_abs_weight(mode: str) -> None:
    p = profile(
        "chipA",
        programming__kind="none",
        read_noise__kind="none",
        mapping__scale="tile",
        drift__compensation=mode,
    )
    w = torch.randn(600, 700, generator=gen())
    w_t = program_weight(w, p, gen(5))
    for r0, r1 in [(0, 300), (300, 600)]:
        for c0, c1 in [(0, 350), (350, 700)]:
            ref, now = w[r0:r1, c0:c1].abs(), w_t[r0:r1, c0:c1].abs()
            if mode == "global":
                assert torch.allclose(now.mean(), ref.mean(), rtol=1e-4)
            else:
                assert torch.allclose(now.mean(1), ref.mean(1), rtol=1e-4)
    uncompensated = program_weight(
        w,
        profile("chipA", programming__kind="none", read_noise__kind="none", drift__compensation="none"),
        gen(5),
    )
    assert uncompensated.abs().mean() < 0.85 * w.abs().mean()  # drift at 1 h shrinks |W| by ~0.78


def test_drift_curves_match_aihwkit_pcm() -> None:
    drift = load_profile("chipA").drift
    x = torch.tensor([0.01, 0.1, 0.5, 1.0])
    assert torch.allclose(
        eval_curve(drift.nu_mean, x), torch.tensor([0.0958, 0.0601, 0.049, 0.049]), atol=2e-4
    )
    hermes = load_profile("hermes").drift
    assert torch.allclose(
        eval_curve(hermes.nu_mean, torch.tensor([0.5, 1.0])), torch.tensor([0.0564, 0.0174]), atol=2e-4
    )
    # x = 0: ln is floored to a large finite value, then clipped to the top of the piece's range
    assert torch.equal(eval_curve(drift.nu_mean, torch.zeros(3)), torch.full((3,), drift.nu_mean[0].clip[1]))


def test_one_over_f_formula_and_sampled_std() -> None:
    p = load_profile("chipA")
    read, t, t0 = p.read_noise, p.t_inference, p.drift.t0
    g_prog = torch.tensor([25.0, 12.5, 2.5])
    g_drift = g_prog * 0.8
    q_s = (0.0088 / (g_prog / 25.0) ** 0.65).clamp(max=0.2)
    expected = g_drift * q_s * math.sqrt(math.log((t + t0 + read.t_read) / (2 * read.t_read)))
    assert torch.allclose(read_noise_sigma(g_drift, g_prog, read, 25.0, t, t0), expected, rtol=1e-5)
    g = torch.full((200_000,), 12.5)
    noisy = add_read_noise(g, g, read, 25.0, t, t0, gen())
    sigma = read_noise_sigma(g[:1], g[:1], read, 25.0, t, t0).item()
    assert abs(noisy.std().item() / sigma - 1) < 0.01
    assert noisy.min() >= 0


# --- levels, faults


def test_levels_quantise_conductances() -> None:
    p = load_profile("ideal", {"mapping.levels": "5"})
    assert not p.is_ideal
    w = unit_rows(32, 64)
    w_q = program_weight(w, p, gen())
    assert set(torch.unique(w_q).tolist()) <= {-1.0, -0.75, -0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0}
    assert torch.allclose(w_q, torch.round(w * 4) / 4)


def test_stuck_faults() -> None:
    w = unit_rows(256, 256)
    off = program_weight(w, profile("ideal", faults__stuck_off="1"), gen())
    assert torch.all(off == 0)
    on = program_weight(w, profile("ideal", faults__stuck_on="1"), gen())
    assert torch.all(on == 0)  # both devices at g_max cancel
    some = program_weight(w, profile("ideal", faults__stuck_off="0.3"), gen(11))
    lost = (some == 0) & (w != 0)
    assert abs(lost.float().mean().item() - 0.3) < 0.01  # only the weight-holding device matters
    kept = some != 0
    assert torch.allclose(some[kept], w[kept], rtol=1e-6, atol=1e-7)


# --- program_weight


def test_ideal_is_bit_exact_and_dtype_kept() -> None:
    w = torch.randn(40, 30, dtype=torch.bfloat16)
    out = program_weight(w, load_profile("ideal"), gen())
    assert out.dtype == torch.bfloat16 and torch.equal(out, w)
    noisy = program_weight(w, load_profile("chipA"), gen())
    assert noisy.dtype == torch.bfloat16 and noisy.shape == w.shape and not torch.equal(noisy, w)


def test_seeding_and_layouts() -> None:
    p = load_profile("chipA")
    w = torch.randn(300, 200, generator=gen())
    a, b = program_weight(w, p, gen(7)), program_weight(w, p, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, program_weight(w, p, gen(8)))
    assert torch.equal(program_weight(w.t().contiguous(), p, gen(7), layout="in_out"), a.t())
    w3 = torch.randn(4, 30, 20, generator=gen())
    out3 = program_weight(w3, p, gen(7))
    assert out3.shape == w3.shape and torch.equal(
        program_weight(w3.transpose(1, 2), p, gen(7), "in_out"), out3.transpose(1, 2)
    )


def test_relative_error_magnitude_chip_a() -> None:
    w = torch.randn(512, 512, generator=gen())
    w_p = program_weight(w, load_profile("chipA"), gen())
    rel = ((w_p - w).norm() / w.norm()).item()
    assert 0.05 < rel < 0.25  # aihwkit reports ≈10 % output error for PCM at 1 h with per-channel mapping


# --- MVM


def mvm_profile(**overrides: str) -> ChipProfile:
    base = {"programming.kind": "none", "drift.kind": "none", "read_noise.kind": "none", "mvm.out_noise": "0"}
    base.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_profile("chipA", base)


def test_quantise_grid() -> None:
    y = torch.linspace(-10, 10, 1001)
    step = 20 / 254
    q = quantise_(y.clone(), 8, 10.0)
    assert torch.allclose(q / step, torch.round(q / step), atol=1e-4)
    assert (q - y).abs().max() <= step / 2 + 1e-6
    assert torch.unique(q).numel() == 255


def test_dac_outputs_on_grid() -> None:
    p = mvm_profile(mvm__dac_bits="4", mvm__adc_bits="null")
    mw = prepare_mvm(torch.eye(8), p)
    x = torch.randn(16, 8, generator=gen())
    y = analog_matmul(x, mw, gen())
    ratio = y / x.abs().amax(1, keepdim=True)
    step = 2 / 14
    assert torch.allclose(ratio / step, torch.round(ratio / step), atol=1e-4)


def test_adc_grid_and_out_bound_clipping() -> None:
    p = mvm_profile(mvm__dac_bits="null", mvm__adc_bits="8", mvm__out_bound="2")
    w = torch.ones(4, 8)
    mw = prepare_mvm(w, p)
    x = torch.rand(5, 8, generator=gen()) + 0.5
    y = analog_matmul(x, mw, gen()) / x.abs().amax(1, keepdim=True)
    assert torch.allclose(y, torch.full_like(y, 2.0))  # Σ x̂ > 2 → clipped at out_bound
    x_small = torch.zeros(5, 8)
    x_small[:, 0] = torch.linspace(0.1, 1, 5)
    x_small[:, 1] = -torch.linspace(0.05, 0.9, 5)
    y = analog_matmul(x_small, mw, gen()) / x_small.abs().amax(1, keepdim=True)
    step = 4 / 254
    assert torch.allclose(y / step, torch.round(y / step), atol=1e-3)


def test_high_resolution_mvm_matches_matmul_across_tiles() -> None:
    p = mvm_profile(mvm__dac_bits="16", mvm__adc_bits="16", mvm__out_bound="50")
    w = torch.randn(300, 1000, generator=gen())
    x = torch.randn(7, 3, 1000, generator=gen(1))
    y = analog_matmul(x, prepare_mvm(w, p), gen())
    assert y.shape == (7, 3, 300)
    ref = x @ w.t()
    assert ((y - ref).norm() / ref.norm()) < 1e-3


def test_out_noise_and_w_noise_statistics() -> None:
    w = torch.zeros(64, 32)
    w[:, 0] = 1.0
    x = torch.zeros(4000, 32)
    x[:, 0] = 1.0
    out = analog_matmul(
        x,
        prepare_mvm(w, mvm_profile(mvm__dac_bits="null", mvm__adc_bits="null", mvm__out_noise="0.04")),
        gen(),
    )
    assert abs((out - 1).std().item() - 0.04) < 0.002
    pcm = mvm_profile(mvm__dac_bits="null", mvm__adc_bits="null", mvm__w_noise="0.1", mvm__out_bound="100")
    w2 = torch.full((64, 32), 1.0)
    w2[:, 16:] = 0.25
    x2 = torch.ones(4000, 32)
    out = analog_matmul(x2, prepare_mvm(w2, pcm), gen())
    expected = 0.1 * math.sqrt(16 * 1.0 + 16 * 0.25)
    assert abs((out - 20).std().item() / expected - 1) < 0.05
    add = mvm_profile(
        mvm__dac_bits="null",
        mvm__adc_bits="null",
        mvm__w_noise="0.1",
        mvm__w_noise_type="additive_constant",
        mvm__out_bound="100",
    )
    out = analog_matmul(x2, prepare_mvm(w2, add), gen())
    assert abs((out - 20).std().item() / (0.1 * math.sqrt(32)) - 1) < 0.05


def test_mvm_seeding() -> None:
    p = load_profile("chipA")
    mw = prepare_mvm(torch.randn(64, 64, generator=gen()), p)
    x = torch.randn(8, 64, generator=gen(1))
    assert torch.equal(analog_matmul(x, mw, gen(3)), analog_matmul(x, mw, gen(3)))
    assert not torch.equal(analog_matmul(x, mw, gen(3)), analog_matmul(x, mw, gen(4)))


def test_eval_poly() -> None:
    assert torch.allclose(eval_poly([1.0, 2.0, 3.0], torch.tensor([2.0])), torch.tensor([17.0]))


def test_block_processing_matches_whole_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large tensors are programmed in blocks of whole output tiles; deterministic effects must agree."""
    p = profile(
        "ideal", mapping__levels="9", mapping__scale="tile", mapping__tile_cols="64", mapping__tile_rows="64"
    )
    w2 = torch.randn(300, 200, generator=gen())
    w3 = torch.randn(5, 70, 90, generator=gen(1))
    whole2, whole3 = program_weight(w2, p, gen()), program_weight(w3, p, gen())
    monkeypatch.setattr(program_module, "BLOCK_ELEMENTS", 64 * 200)
    assert torch.equal(program_weight(w2, p, gen()), whole2)
    monkeypatch.setattr(program_module, "BLOCK_ELEMENTS", 2 * 70 * 90)
    assert torch.equal(program_weight(w3, p, gen()), whole3)
    monkeypatch.setattr(program_module, "BLOCK_ELEMENTS", 10)
    assert torch.equal(program_weight(w3, p, gen()), whole3)
