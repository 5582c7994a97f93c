"""The 0/1 knapsack of the digital budget: which tensors to keep digital for the most damage removed.

Each item is a tensor with a value (the damage its chip noise does, from a sensitivity scan) and a cost
(its analog MACs per token or weight count); the capacity is the budget. :func:`solve_knapsack` is exact
by dynamic programming over integer costs: costs that are integers are divided by their greatest common
divisor, and solved exactly when the capacity is then at most :data:`GRID_STEPS` units; otherwise the
grid unit is ``capacity / GRID_STEPS`` and every cost is rounded **up** to it (the choice always fits the
true budget and is optimal on that grid). :func:`fill_remaining` then adds whatever still fits, so no
budget that can keep a tensor digital is left unused. :func:`greedy_knapsack` (best value per cost
first) is the baseline the tests compare against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Grid resolution of the dynamic programme: the capacity in grid units is at most this.
GRID_STEPS = 100_000
#: Relative slack when summing float costs against the capacity (a 100 % budget must take everything).
SLACK = 1e-9


@dataclass(frozen=True)
class Item:
    """One candidate: a tensor, the damage keeping it digital removes (``value``) and its ``cost``."""

    name: str
    value: float
    cost: float


def _grid(costs: Sequence[float], capacity: float) -> tuple[list[int], int]:
    """Integer costs and capacity: exact (gcd of integer costs) when small enough, else rounded up."""
    if all(float(c).is_integer() for c in costs):
        unit = math.gcd(*(int(c) for c in costs)) or 1
        if capacity / unit <= GRID_STEPS:
            return [int(c) // unit for c in costs], math.floor(capacity / unit)
    unit = capacity / GRID_STEPS
    return [max(1, math.ceil(c / unit - 1e-9)) for c in costs], GRID_STEPS


def solve_knapsack(items: Sequence[Item], capacity: float) -> list[Item]:
    """The items of the largest total value whose total cost is at most ``capacity`` (module docstring)."""
    fitting = [item for item in items if item.cost <= capacity * (1 + SLACK)]
    if capacity <= 0 or not fitting:
        return []
    weights, slots = _grid([item.cost for item in fitting], capacity)
    best = np.zeros(slots + 1)
    taken = np.zeros((len(fitting), slots + 1), dtype=bool)
    for i, (item, weight) in enumerate(zip(fitting, weights, strict=True)):
        if weight > slots:
            continue
        with_item = best[: slots + 1 - weight] + item.value
        better = with_item > best[weight:]
        taken[i, weight:] = better
        best[weight:] = np.where(better, with_item, best[weight:])
    chosen, slot = [], slots
    for i in reversed(range(len(fitting))):
        if taken[i, slot]:
            chosen.append(fitting[i])
            slot -= weights[i]
    return chosen[::-1]


def _by_value_per_cost(items: Sequence[Item]) -> list[Item]:
    """Highest value per cost first (zero-cost items first of all), then the cheaper one."""
    return sorted(items, key=lambda it: (-(it.value / it.cost) if it.cost > 0 else -math.inf, it.cost))


def fill_remaining(chosen: Sequence[Item], items: Sequence[Item], capacity: float) -> list[Item]:
    """``chosen`` plus every other item that still fits, best value per cost first (never lowers value)."""
    picked = list(chosen)
    names = {item.name for item in picked}
    used = sum(item.cost for item in picked)
    for item in _by_value_per_cost([it for it in items if it.name not in names]):
        if used + item.cost <= capacity * (1 + SLACK):
            picked.append(item)
            used += item.cost
    return picked


def greedy_knapsack(items: Sequence[Item], capacity: float) -> list[Item]:
    """The greedy baseline: best value per cost first, each item taken while it fits."""
    return fill_remaining([], items, capacity)
