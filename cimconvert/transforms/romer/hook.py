"""The digital routing hook: calibrate router logits, recompute top-k, apply masks and replicas.

Installed as a forward hook on each router module. It takes the router's logits (whatever unit computed
them: a digital router, or an analog one under the noise simulation), applies the layer's calibration
(per-expert affine ``a_e·z_e + b_e`` or per-token percentile normalisation), recomputes top-k with the
architecture's rule, excludes masked experts from selection, and sends the tokens of a replicated expert
to the expert and its replica (``mean``: both, each with half the weight; ``alternate``: every other
token to the replica). It returns ``(calibrated_logits, top_k_weights, top_k_index)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from cimconvert.transforms.romer.routing import RoutingRule, route

Calibration = Literal["none", "affine", "token_norm"]
Split = Literal["mean", "alternate"]
#: attribute on the router module holding the installed hook handle
HOOK_ATTR = "_romer_routing_hook"


@dataclass
class LayerRouting:
    """Routing-time parameters of one MoE layer (all JSON-serialisable through :meth:`to_dict`)."""

    layer: int
    num_experts: int
    calibration: Calibration = "none"
    #: per-expert affine map (``affine``)
    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    #: per-token normalisation (``token_norm``): z' = (z − median) / (P_q − P_{1−q}) · scale + shift
    q: float = 0.75
    scale: float = 1.0
    shift: float = 0.0
    #: experts never selected (replicate-and-split: their arrays hold replicas)
    masked: list[int] = field(default_factory=list)
    #: [donor, replica] pairs: the donor's tokens also go to the replica
    replicas: list[list[int]] = field(default_factory=list)
    split: Split = "mean"

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the manifest."""
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerRouting:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    @property
    def is_identity(self) -> bool:
        """True when the hook would reproduce the stock routing."""
        return self.calibration == "none" and not self.masked and not self.replicas


def token_normalise(logits: torch.Tensor, q: float, scale: float, shift: float) -> torch.Tensor:
    """Per-token percentile normalisation of ``logits [T, E]`` (computed in fp32)."""
    z = logits.float()
    median = z.median(dim=-1, keepdim=True).values
    bounds = torch.quantile(z, torch.tensor([1.0 - q, q], dtype=z.dtype, device=z.device), dim=-1)
    spread = (bounds[1] - bounds[0]).unsqueeze(-1).clamp_min(1e-6)
    return (z - median) / spread * scale + shift


def calibrate_logits(logits: torch.Tensor, spec: LayerRouting) -> torch.Tensor:
    """Apply the layer's logit calibration (identity for ``none``)."""
    if spec.calibration == "affine":
        a = torch.tensor(spec.a, dtype=torch.float32, device=logits.device)
        b = torch.tensor(spec.b, dtype=torch.float32, device=logits.device)
        return (logits.float() * a + b).to(logits.dtype)
    if spec.calibration == "token_norm":
        return token_normalise(logits, spec.q, spec.scale, spec.shift).to(logits.dtype)
    return logits


def split_to_replicas(
    weights: torch.Tensor, index: torch.Tensor, replicas: list[list[int]], split: Split, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Send a donor's tokens to its replica too (``mean``: ``[T, 2k]``) or instead (``alternate``)."""
    replica_of = torch.full((num_experts,), -1, dtype=index.dtype, device=index.device)
    for donor, replica in replicas:
        replica_of[donor] = replica
    mapped = replica_of[index]
    has = mapped >= 0
    if split == "alternate":
        odd = (torch.arange(index.shape[0], device=index.device) % 2 == 1).unsqueeze(-1)
        return weights, torch.where(has & odd, mapped, index)
    half = torch.where(has, weights / 2, weights)
    second = torch.where(has, weights / 2, torch.zeros_like(weights))
    return torch.cat([half, second], dim=-1), torch.cat([index, torch.where(has, mapped, index)], dim=-1)


class RoutingHook:
    """Forward hook on a router module that applies a :class:`LayerRouting` (see the module docstring)."""

    def __init__(self, spec: LayerRouting, rule: RoutingRule, router: nn.Module) -> None:
        self.spec = spec
        self.rule = rule
        self.router = router
        selectable = torch.ones(spec.num_experts, dtype=torch.bool)
        if spec.masked:
            selectable[spec.masked] = False
        self.selectable = selectable if spec.masked else None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> tuple[torch.Tensor, ...]:
        """Replace the router output by the calibrated routing."""
        logits, stock_weights = output[0], output[1]
        z = calibrate_logits(logits, self.spec)
        bias = getattr(module, "e_score_correction_bias", None)
        selectable = self.selectable.to(z.device) if self.selectable is not None else None
        weights, index = route(z, self.rule, bias, selectable)
        if self.spec.replicas:
            weights, index = split_to_replicas(
                weights, index, self.spec.replicas, self.spec.split, self.rule.num_experts
            )
        return z, weights.to(stock_weights.dtype), index


def install_hook(router: nn.Module, spec: LayerRouting, rule: RoutingRule) -> RoutingHook:
    """Install (or replace) the routing hook on ``router``; returns the hook object."""
    remove_hook(router)
    hook = RoutingHook(spec, rule, router)
    setattr(router, HOOK_ATTR, router.register_forward_hook(hook))
    return hook


def remove_hook(router: nn.Module) -> None:
    """Remove the routing hook from ``router`` if one is installed."""
    handle = getattr(router, HOOK_ATTR, None)
    if handle is not None:
        handle.remove()
        delattr(router, HOOK_ATTR)


def _routing_hooks(model: nn.Module) -> Iterator[RoutingHook]:
    """The routing hooks installed on ``model``'s routers."""
    for module in model.modules():
        handle = getattr(module, HOOK_ATTR, None)
        hook = module._forward_hooks.get(handle.id) if handle is not None else None
        if isinstance(hook, RoutingHook):
            yield hook


def calibrated_routing_layers(model: nn.Module) -> int:
    """How many of ``model``'s routing hooks carry a logit calibration."""
    return sum(hook.spec.calibration != "none" for hook in _routing_hooks(model))


@contextmanager
def routing_calibration_off(model: nn.Module) -> Iterator[int]:
    """``model``'s routing hooks with their logit calibration switched off for the block (masks and replicas
    kept): the noise-free model as a clean router routes it. Yields how many layers had a calibration."""
    changed = [(hook, hook.spec) for hook in _routing_hooks(model) if hook.spec.calibration != "none"]
    for hook, spec in changed:
        hook.spec = replace(spec, calibration="none")
    try:
        yield len(changed)
    finally:
        for hook, spec in changed:
            hook.spec = spec
