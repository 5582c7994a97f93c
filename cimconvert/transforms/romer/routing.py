"""The top-k rule of each MoE router of transformers 5.24, recomputed from (calibrated) logits.

A router module returns ``(router_logits [T, E], top_k_weights [T, k], top_k_index [T, k])``; changing
only the logits changes nothing downstream, so the calibration hook recomputes weights and indices with
the same operations, in the same order and dtypes, as the stock router. With identity calibration the
result is bit-identical to the stock routing (tested for every registered MoE architecture).

``selectable`` (a bool mask ``[E]``) excludes experts from *selection only*: the weights of the chosen
experts are the same probabilities the stock router would give them (used by replicate-and-split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from cimconvert.errors import CimError

Method = Literal["greedy", "group_max", "group_top2"]


@dataclass(frozen=True)
class RoutingRule:
    """How one router turns logits into top-k weights and indices (mirrors its stock forward)."""

    scoring: Literal["softmax", "sigmoid"]
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


def _attr(module: Any, name: str, default: Any) -> Any:
    value = getattr(module, name, None)
    return default if value is None else value


def rule_for(adapter: Any, config: Any, router: torch.nn.Module) -> RoutingRule:
    """The routing rule of ``router`` (a router module of a model of ``adapter``'s type)."""
    model_type = adapter.model_type
    num_experts = int(_attr(router, "num_experts", adapter.num_experts(config)))
    top_k = int(_attr(router, "top_k", adapter.top_k(config)))
    scoring = adapter.scoring(config)
    common = {"top_k": top_k, "num_experts": num_experts}
    if model_type in ("olmoe", "qwen2_moe", "qwen3_moe"):
        return RoutingRule("softmax", norm_topk_prob=bool(router.norm_topk_prob), **common)
    if model_type == "mixtral":
        return RoutingRule("softmax", norm_topk_prob=True, cast_to_logits=False, **common)
    if model_type == "deepseek_v2":
        method = str(_attr(router, "topk_method", "greedy"))
        if method not in ("greedy", "group_limited_greedy"):
            raise CimError(f"deepseek_v2 router topk_method '{method}' is not supported")
        return RoutingRule(
            "softmax", norm_topk_prob=False, routed_scaling_factor=float(router.routed_scaling_factor),
            method="greedy" if method == "greedy" else "group_max",
            n_group=int(_attr(router, "num_group", 1)),
            topk_group=int(_attr(router, "topk_group", 1)), sorted=False, cast_to_logits=False, **common,
        )  # fmt: skip
    if model_type == "deepseek_v3":
        return RoutingRule(
            "sigmoid", norm_topk_prob=bool(router.norm_topk_prob), norm_eps=1e-20,
            routed_scaling_factor=float(router.routed_scaling_factor), method="group_top2",
            n_group=int(_attr(router, "num_group", 1)), topk_group=int(_attr(router, "topk_group", 1)),
            sorted=False, cast_to_logits=False, **common,
        )  # fmt: skip
    if model_type == "deepseek":
        return RoutingRule(
            "softmax", norm_topk_prob=bool(router.norm_topk_prob) and top_k > 1, norm_eps=1e-20,
            sorted=False, cast_to_logits=False, **common,
        )  # fmt: skip
    # an adapter registered later: the generic rule its declarative attributes describe
    return RoutingRule(
        scoring,  # type: ignore[arg-type]
        norm_topk_prob=adapter.norm_topk_prob(config),
        routed_scaling_factor=adapter.routed_scaling_factor(config),
        cast_to_logits=False,
        **common,
    )


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
