"""HPD: Hybrid Projection Decomposition for analog CIM (SVD split of noise-sensitive projections).

Importing this package registers the ``hpd`` method (``--method auto`` picks it for SSM models) and the
``hpd_split`` bundle transform loader.
"""

from cimconvert.methods.base import register_method
from cimconvert.methods.hpd.method import (
    TRANSFORM_TYPE,
    HpdMethod,
    apply_hpd,
    expected_key_changes,
    hpd_placement,
    load_hpd_split,
    split_layer,
)
from cimconvert.methods.hpd.split import FACTORS, Factors, HpdLinear, build_split, decompose, hadamard_matrix


def _register_loader() -> None:
    """Add the bundle loader and the keys the split replaces, so ``load_bundle`` can rebuild it."""
    from cimconvert.bundle.reader import TRANSFORM_KEY_CHANGES, TRANSFORM_LOADERS

    TRANSFORM_LOADERS[TRANSFORM_TYPE] = load_hpd_split
    TRANSFORM_KEY_CHANGES[TRANSFORM_TYPE] = expected_key_changes


register_method(HpdMethod(), auto_for=("ssm",))
_register_loader()

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
