"""Adapters for the state-space families: Mamba, Mamba2, FalconMamba (``backbone.layers.N.mixer``).

Matmuls: ``in_proj``, ``x_proj`` (Mamba only), ``dt_proj`` (Mamba only; applied as ``weight @ dt``, the
module is never called) and ``out_proj``. Digital-only: ``conv1d``, ``A_log``, ``D``, ``dt_bias``, norms.
"""

from __future__ import annotations

from typing import ClassVar

from cimconvert.arch.base import ArchAdapter, Family
from cimconvert.arch.registry import register


class SsmAdapter(ArchAdapter):
    """Common layout of the Mamba family."""

    family: ClassVar[Family] = "ssm"
    layers_path: ClassVar[str] = "backbone.layers"
    embeddings: ClassVar[tuple[str, ...]] = ("embeddings",)
    attention_projs: ClassVar[tuple[str, ...]] = ()
    mlp_projs: ClassVar[tuple[str, ...]] = ()
    mixer_path: ClassVar[str | None] = "mixer"


@register
class Mamba(SsmAdapter):
    """Mamba (v1): lm_head tied to the embedding by default."""

    model_type = "mamba"
    model_class = "MambaForCausalLM"
    note = "Mamba: in_proj/x_proj/dt_proj/out_proj; lm_head tied by default"


@register
class Mamba2(SsmAdapter):
    """Mamba2: no x_proj/dt_proj (``dt_bias`` per head), gated RMSNorm in the mixer, lm_head untied."""

    model_type = "mamba2"
    model_class = "Mamba2ForCausalLM"
    note = "Mamba2: in_proj/out_proj, dt_bias per head; lm_head untied by default"


@register
class FalconMamba(SsmAdapter):
    """FalconMamba: Mamba layout with weightless RMSNorms on dt/B/C (buffers, not saved)."""

    model_type = "falcon_mamba"
    model_class = "FalconMambaForCausalLM"
    note = "FalconMamba: Mamba layout; lm_head tied by default"
