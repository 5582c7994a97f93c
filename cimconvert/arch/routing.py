"""The routing rule an MoE adapter declares: how a router turns logits into top-k weights and indices.

Pure data (no torch): :meth:`cimconvert.arch.base.ArchAdapter.routing_rule` builds one per router from
the model's config and the router module, and :func:`cimconvert.transforms.romer.routing.route` replays it
(with the same operations, in the same order and dtypes, as the stock router).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

#: How experts are selected: plain top-k, or DeepSeek's group-limited top-k (best expert / best two
#: experts per group decide which groups are kept).
Method = Literal["greedy", "group_max", "group_top2"]

#: ``softmax`` / ``sigmoid``: the scores of all experts, then top-k of the scores; ``topk_softmax``: top-k
#: of the raw logits, then a softmax over the k selected logits (GraniteMoE).
Scoring = Literal["softmax", "sigmoid", "topk_softmax"]


@dataclass(frozen=True)
class RoutingRule:
    """How one router turns logits into top-k weights and indices (mirrors its stock forward)."""

    scoring: Scoring
    top_k: int
    num_experts: int
    norm_topk_prob: bool
    #: 0 (olmoe/qwen: plain sum) or 1e-20 (DeepSeek v1/v3) added to the renormalisation denominator
    norm_eps: float = 0.0
    routed_scaling_factor: float = 1.0
    method: Method = "greedy"
    n_group: int = 1
    topk_group: int = 1
    #: torch.topk(sorted=...) as the stock router calls it
    sorted: bool = True
    #: cast the weights back to the logits dtype (olmoe/qwen) or keep fp32 (mixtral, deepseek)
    cast_to_logits: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON form, recorded in the manifest for reference."""
        return dict(self.__dict__)
