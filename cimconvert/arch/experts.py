"""The routed-experts loop of transformers-5 fused expert modules, with a pluggable projection.

transformers 5 stores routed experts as fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) and lets a model switch the function that runs them
(``ALL_EXPERTS_FUNCTIONS``). The noise simulator and noise-aware training replace only the matmuls; this
loop (group tokens by expert, gate, project down, weight and scatter back) is shared by both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: ``project(param_name, expert_index, x) -> x @ W[expert]ᵀ`` for ``gate_up_proj``/``up_proj``/``down_proj``.
Projection = Callable[[str, int, torch.Tensor], torch.Tensor]


def dispatch_experts(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    project: Projection,
) -> torch.Tensor:
    """Run every hit expert of a fused experts ``module`` with ``project`` doing its matmuls.

    Mirrors transformers' eager experts function: tokens grouped by expert (stable order), gated
    activation (or plain activation without a gate), down projection, optional post-expert norm,
    routing weight, scatter-add in float32.
    """
    num_top_k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=module.num_experts)[: module.num_experts].tolist()
    routing = top_k_weights.reshape(-1)
    has_gate = getattr(module, "has_gate", True)
    first = "gate_up_proj" if has_gate else "up_proj"
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start : start + count]
        start += count
        tokens = pairs // num_top_k
        h = project(first, expert, hidden_states[tokens])
        h = module._apply_gate(h) if has_gate else module.act_fn(h)
        h = project("down_proj", expert, h)
        if getattr(module, "has_post_expert_norm", False):
            h = module.post_expert_norm(h)
        out.index_add_(0, tokens, (h * routing[pairs, None]).float())
    return out.to(hidden_states.dtype)
