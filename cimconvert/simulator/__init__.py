"""Pure-torch simulator of analog CIM crossbars (never imports transformers).

Once per programming: :func:`program_weight` (mapping, faults, programming noise, drift, 1/f read
noise, drift compensation). Per MVM: :func:`prepare_mvm` + :func:`analog_matmul` (noise management,
DAC/ADC, out_noise, w_noise, clipping). See docs/SIMULATOR.md for the formulas.
"""

from cimconvert.simulator.curves import eval_curve, eval_poly
from cimconvert.simulator.drift import (
    add_read_noise,
    apply_drift,
    compensation_gain,
    draw_nu,
    drift_factor,
    read_noise_sigma,
    read_noise_time_factor,
)
from cimconvert.simulator.mapping import (
    conductances_to_weights,
    expand_scales,
    normalised_weights,
    quantise_levels,
    weight_scales,
    weights_to_conductances,
)
from cimconvert.simulator.mvm import MvmWeights, analog_matmul, prepare_mvm, quantise_
from cimconvert.simulator.program import program_weight
from cimconvert.simulator.programming import add_poly_noise, add_relative_gaussian, coeffs_at, poly_sigma
from cimconvert.simulator.tiles import TileGrid, split_sizes, tile_grid

__all__ = [
    "MvmWeights",
    "TileGrid",
    "add_poly_noise",
    "add_read_noise",
    "add_relative_gaussian",
    "analog_matmul",
    "apply_drift",
    "coeffs_at",
    "compensation_gain",
    "conductances_to_weights",
    "draw_nu",
    "drift_factor",
    "eval_curve",
    "eval_poly",
    "expand_scales",
    "normalised_weights",
    "poly_sigma",
    "prepare_mvm",
    "program_weight",
    "quantise_",
    "quantise_levels",
    "read_noise_sigma",
    "read_noise_time_factor",
    "split_sizes",
    "tile_grid",
    "weight_scales",
    "weights_to_conductances",
]
