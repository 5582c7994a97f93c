"""Adapter for GraniteMoE (IBM Granite 3.x MoE, ``model_type: "granitemoe"``).

The MoE block is ``model.layers.N.block_sparse_moe``: a router with a bare ``weight [E, H]`` and experts
fused like every transformers-5 MoE (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``).
On disk the experts stay fused under their original names (``input_linear.weight``,
``output_linear.weight``) and the router weight is ``router.layer.weight``. The router takes the top-k of
the float logits and a softmax over the k selected ones (no shared expert, no scaling factor); the
embedding, residual, attention and logits multipliers are ordinary model code.
"""

from __future__ import annotations

from cimconvert.arch.adapters.moe import MoeAdapter
from cimconvert.arch.registry import register


@register
class GraniteMoe(MoeAdapter):
    """GraniteMoE: top-k of the logits then softmax over the k; experts fused on disk as in memory."""

    model_type = "granitemoe"
    model_class = "GraniteMoeForCausalLM"
    moe_block = "block_sparse_moe"
    router = "router"
    num_experts_key = "num_local_experts"
    scoring_default = "topk_softmax"
    disk_renames = (
        ("block_sparse_moe.input_linear.weight", "block_sparse_moe.experts.gate_up_proj"),
        ("block_sparse_moe.output_linear.weight", "block_sparse_moe.experts.down_proj"),
        ("block_sparse_moe.router.layer.weight", "block_sparse_moe.router.weight"),
    )
