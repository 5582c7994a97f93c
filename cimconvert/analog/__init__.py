"""One analog-execution layer: every analog matmul of a model routed through a pluggable kernel.

* :mod:`~cimconvert.analog.routes` — which matmul owns an analog tensor (``linear`` / ``experts`` /
  ``weight``; the ``dt_proj`` rule);
* :mod:`~cimconvert.analog.experts` — the one experts implementation registered with transformers and
  the token dispatch loops (``sparse`` to run, ``static`` to export);
* :mod:`~cimconvert.analog.patch` — :class:`AnalogPatch`: routes Linear/Conv1D forwards and fused
  experts through an :class:`AnalogKernel` and undoes it exactly;
* :mod:`~cimconvert.analog.chip_noise` — the simulator kernel (:func:`apply_chip_noise`).

Kernels: :class:`CleanKernel` (exact, the reference), the simulator's ``MvmKernel``;
plugged in elsewhere: straight-through (``finetune.ste.SteKernel``) and the ONNX AnalogMatMul
marker (``onnx.export.ExportKernel``). Layout and clean-scale helpers (``to_out_in``, ``out_in_view``,
``clean_scales``) live in :mod:`cimconvert.simulator.program` and are re-exported here.
"""

from cimconvert.analog.chip_noise import NoiseHandle, apply_chip_noise
from cimconvert.analog.experts import EXPERTS_IMPLEMENTATION
from cimconvert.analog.patch import AnalogKernel, AnalogPatch, CleanKernel
from cimconvert.analog.routes import EXPERT_PARAMS, Route, is_weight_only, route_of
from cimconvert.simulator.program import clean_scales, out_in_view, to_out_in

__all__ = [
    "EXPERTS_IMPLEMENTATION",
    "EXPERT_PARAMS",
    "AnalogKernel",
    "AnalogPatch",
    "CleanKernel",
    "NoiseHandle",
    "Route",
    "apply_chip_noise",
    "clean_scales",
    "is_weight_only",
    "out_in_view",
    "route_of",
    "to_out_in",
]
