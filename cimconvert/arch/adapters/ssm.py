"""Adapters for the state-space families: Mamba, Mamba2, FalconMamba (``backbone.layers.N.mixer``).

Matmuls: ``in_proj``, ``x_proj`` (Mamba only), ``dt_proj`` (Mamba only; applied as ``weight @ dt``, the
module is never called) and ``out_proj``. Digital-only: ``conv1d``, ``A_log``, ``D``, ``dt_bias``, norms.
"""

from __future__ import annotations

from cimconvert.arch.base import ArchAdapter, SsmScan
from cimconvert.arch.registry import register


class SsmAdapter(ArchAdapter):
    """Common layout of the Mamba family; the selective scan unless a subclass says otherwise."""

    family = "ssm"
    layers_path = "backbone.layers"
    embeddings = ("embeddings",)
    attention_projs = ()
    mlp_projs = ()
    mixer_path = "mixer"
    weight_only_modules = ("dt_proj",)
    ssm_scan = SsmScan("mamba_selective_scan", "selective")


@register
class Mamba(SsmAdapter):
    """Mamba (v1): in_proj/x_proj/dt_proj/out_proj; lm_head tied to the embedding by default."""

    model_type = "mamba"
    model_class = "MambaForCausalLM"


@register
class Mamba2(SsmAdapter):
    """Mamba2: in_proj/out_proj only (``dt_bias`` per head), gated RMSNorm in the mixer, lm_head untied."""

    model_type = "mamba2"
    model_class = "Mamba2ForCausalLM"
    ssm_scan = SsmScan("mamba2_chunk_scan", "ssd")


@register
class FalconMamba(SsmAdapter):
    """FalconMamba: Mamba layout with weightless RMSNorms on dt/B/C (buffers, not saved); lm_head tied."""

    model_type = "falcon_mamba"
    model_class = "FalconMambaForCausalLM"
