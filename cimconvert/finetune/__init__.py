"""Noise-aware fine-tuning: extended straight-through estimation (``ste``) vs. standard NAT (``nat``)."""

from cimconvert.finetune.base import Target, analog_targets
from cimconvert.finetune.nat import NatNoise, matched_sigma
from cimconvert.finetune.ste import AnalogMatmulSTE, SteNoise
from cimconvert.finetune.trainer import FinetuneConfig, Trainer, finetune

__all__ = [
    "AnalogMatmulSTE",
    "FinetuneConfig",
    "NatNoise",
    "SteNoise",
    "Target",
    "Trainer",
    "analog_targets",
    "finetune",
    "matched_sigma",
]
