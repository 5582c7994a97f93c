"""HPD: Hybrid Projection Decomposition for analog CIM (SVD split of noise-sensitive projections).

Importing this package registers the ``hpd`` method (``--method auto`` picks it for SSM models). The split
layer and the ``hpd_split`` bundle loader live in :mod:`cimconvert.transforms.hpd_split`.
"""

from cimconvert.methods.base import register_layerwise, register_method
from cimconvert.methods.hpd.layerwise import hpd_layer_step
from cimconvert.methods.hpd.method import HpdMethod, apply_hpd, hpd_placement, split_layer
from cimconvert.methods.hpd.split import FACTORS, Factors, build_split, decompose, hadamard_matrix
from cimconvert.transforms.hpd_split import TRANSFORM_TYPE, HpdLinear, expected_key_changes, load_hpd_split

register_method(HpdMethod())
register_layerwise(HpdMethod.name, hpd_layer_step)

__all__ = [
    "FACTORS",
    "TRANSFORM_TYPE",
    "Factors",
    "HpdLinear",
    "HpdMethod",
    "apply_hpd",
    "build_split",
    "decompose",
    "expected_key_changes",
    "hadamard_matrix",
    "hpd_placement",
    "load_hpd_split",
    "split_layer",
]
