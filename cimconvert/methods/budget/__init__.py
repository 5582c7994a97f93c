"""Digital budget: keep the analog tensors a sensitivity scan ranks most damaging per cost digital.

Importing this package registers the ``digital_budget`` method (never picked by ``--method auto``).
"""

from cimconvert.methods.base import register_layerwise, register_method
from cimconvert.methods.budget.knapsack import Item, fill_remaining, greedy_knapsack, solve_knapsack
from cimconvert.methods.budget.layerwise import budget_layer_step
from cimconvert.methods.budget.method import COSTS, DigitalBudgetMethod, tensor_values

register_method(DigitalBudgetMethod())
register_layerwise(DigitalBudgetMethod.name, budget_layer_step)

__all__ = [
    "COSTS",
    "DigitalBudgetMethod",
    "Item",
    "fill_remaining",
    "greedy_knapsack",
    "solve_knapsack",
    "tensor_values",
]
