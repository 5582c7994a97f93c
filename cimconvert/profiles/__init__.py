"""Chip profiles: schema, loading by name or path, validation with one-line errors."""

from cimconvert.profiles.loader import list_profiles, load_profile, profile_from_dict, shipped_profile_dir
from cimconvert.profiles.schema import (
    DIGITAL_ONLY_KINDS,
    MATMUL_KINDS,
    TENSOR_KINDS,
    ChipProfile,
    CurvePiece,
)

__all__ = [
    "DIGITAL_ONLY_KINDS",
    "MATMUL_KINDS",
    "TENSOR_KINDS",
    "ChipProfile",
    "CurvePiece",
    "list_profiles",
    "load_profile",
    "profile_from_dict",
    "shipped_profile_dir",
]
