"""The top-k rule of an MoE router, recomputed from (calibrated) logits.

Each architecture adapter declares its routers' rule (``ArchAdapter.routing_rule``, a
:class:`~cimconvert.arch.routing.RoutingRule`); :func:`route` replays it. A router module returns
``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])``; changing only the logits changes
nothing downstream, so the calibration hook recomputes weights and indices with
the same operations, in the same order and dtypes, as the stock router. With identity calibration the
result is bit-identical to the stock routing (tested for every registered MoE architecture).

``selectable`` (a bool mask ``[E]``) excludes experts from *selection only*: the weights of the chosen
experts are the same probabilities the stock router would give them (used by replicate-and-split; with
``topk_softmax`` scoring, the softmax over the k experts actually selected).
"""

from __future__ import annotations

import torch

from cimconvert.arch.routing import RoutingRule

__all__ = ["RoutingRule", "route"]


def _group_mask(scores: torch.Tensor, rule: RoutingRule) -> torch.Tensor:
    """Bool ``[T, E]``: experts inside the ``topk_group`` best groups (DeepSeek group-limited top-k)."""
    grouped = scores.view(-1, rule.n_group, rule.num_experts // rule.n_group)
    if rule.method == "group_max":
        group_scores = grouped.max(dim=-1).values
    else:
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=rule.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    return (
        group_mask.unsqueeze(-1)
        .expand(-1, rule.n_group, rule.num_experts // rule.n_group)
        .reshape(-1, rule.num_experts)
        .bool()
    )


def route(
    logits: torch.Tensor,
    rule: RoutingRule,
    correction_bias: torch.Tensor | None = None,
    selectable: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(top_k_weights, top_k_index)`` from ``logits [T, E]`` with the stock operations of ``rule``."""
    if rule.scoring == "topk_softmax":
        return _route_topk_softmax(logits, rule, selectable)
    if rule.scoring == "sigmoid":
        scores = logits.float().sigmoid()
        choice = scores + correction_bias if correction_bias is not None else scores
        fill = float("-inf")
    else:
        scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
        choice = scores
        fill = 0.0 if rule.method == "group_max" else -1.0
    if rule.method != "greedy":
        choice = choice.masked_fill(~_group_mask(choice, rule), fill)
    if selectable is not None:
        choice = choice.masked_fill(~selectable, float("-inf"))
    if rule.scoring == "softmax" and rule.method == "greedy" and selectable is None:
        weights, index = torch.topk(scores, rule.top_k, dim=-1, sorted=rule.sorted)
    else:
        index = torch.topk(choice, rule.top_k, dim=-1, sorted=rule.sorted)[1]
        weights = scores.gather(1, index)
    if rule.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + rule.norm_eps)
    if rule.routed_scaling_factor != 1.0:
        weights = weights * rule.routed_scaling_factor
    if rule.cast_to_logits:
        weights = weights.to(logits.dtype)
    return weights, index


def _route_topk_softmax(
    logits: torch.Tensor, rule: RoutingRule, selectable: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the float logits, then a softmax over the k selected logits (GraniteMoE's router)."""
    choice = logits.float()
    if selectable is not None:
        choice = choice.masked_fill(~selectable, float("-inf"))
    index = torch.topk(choice, rule.top_k, dim=-1, sorted=rule.sorted)[1]
    weights = torch.softmax(logits.float().gather(1, index), dim=-1)
    if rule.routed_scaling_factor != 1.0:
        weights = weights * rule.routed_scaling_factor
    if rule.cast_to_logits:
        weights = weights.to(logits.dtype)
    return weights, index
