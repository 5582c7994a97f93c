"""The digital budget as a method: keep the tensors a sensitivity scan ranks worst per cost digital.

The method changes no weight. It reads the conversion's placement, values every analog tensor the scan
names by the damage its noise alone does, costs it (analog MACs per token or weight count), and solves a
0/1 knapsack for the largest damage removed within ``--digital-budget`` percent of the total analog cost.
The chosen tensors go back to the pipeline as :attr:`MethodResult.digital` (exact tensor names), so the
bundle keeps them digital; the report says what moved and why.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from cimconvert.errors import CimError
from cimconvert.evaluation.sensitivity import FIRST_SEED, quick_layer_scan, read_scan
from cimconvert.methods.base import MethodOption, MethodResult
from cimconvert.methods.budget.knapsack import Item, fill_remaining, solve_knapsack
from cimconvert.placement import Placement, TensorInfo, current_placement, tensor_macs_per_token
from cimconvert.profiles import ChipProfile

NAME = "digital_budget"
#: Cost kinds: what the budget is a percentage of.
COSTS = {"macs": "analog MACs per token", "weights": "analog weights"}
SCAN_KEYS = ("profile", "granularity", "seeds", "tokens", "clean_ppl", "source")
VALUE = "log(PPL with noise in this tensor only / clean PPL), clipped at 0"


# ------------------------------------------------------------------------------------- options
def check_options(options: dict[str, Any]) -> tuple[float, str]:
    """The budget (percent) and cost kind, checked against the declared options (one-line CimErrors) for a
    caller that did not go through ``option_values`` (the CLI and recipes already did)."""
    declared = {opt.name: opt for opt in DigitalBudgetMethod.options}
    for name, value in options.items():
        if name in declared and value is not None:
            declared[name].check(value, f"--method {NAME}")
    return float(options.get("digital_budget", 5.0)), str(options.get("budget_cost") or "macs")


def cost_function(cost: str, adapter: Any, config: Any) -> Callable[[TensorInfo], float]:
    """The cost of one analog tensor: MACs per token (experts: × top_k / E) or its weight count."""
    if cost == "weights":
        return lambda info: float(info.params)
    return lambda info: tensor_macs_per_token(info, adapter, config)


# ---------------------------------------------------------------------------------------- scan
def scan_for(model: nn.Module, analog: Sequence[TensorInfo], profile: ChipProfile, options: dict[str, Any],
             progress: bool, perplexities: Any = None) -> dict[str, Any]:  # fmt: skip
    """The layer scan: ``budget_scan`` (a JSON of ``cimconvert analyze``), else a quick scan on ``calib``
    (``perplexities``: the scan's runner, e.g. layer by layer; see ``sensitivity_scan``)."""
    path = options.get("budget_scan")
    if path:
        scan = {**read_scan(path, "--budget-scan"), "source": str(path)}
        if scan.get("granularity") != "layer":
            raise CimError(
                f"--budget-scan: {path} is a {scan.get('granularity')}-granularity scan; the digital budget "
                "needs one value per tensor (cimconvert analyze --granularity layer)"
            )
        return scan
    seed = int(options.get("seed") or 0)
    seeds = [FIRST_SEED + seed + i for i in range(int(options.get("budget_scan_seeds") or 2))]
    missing = "--method digital_budget: no tokenizer for a quick scan in '{folder}'; pass --budget-scan"
    scan = quick_layer_scan(model, analog, profile, seeds, int(options.get("budget_scan_tokens") or 2048),
                            missing, progress=progress, perplexities=perplexities)  # fmt: skip
    return {**scan, "source": "quick scan on calib"}


def tensor_values(scan: dict[str, Any], model: nn.Module) -> tuple[dict[str, float], list[str]]:
    """Value per tensor named by the scan (see :data:`VALUE`), and the names an earlier step replaced.

    A scanned tensor that ``model`` no longer has but whose module it still has (a layer an earlier recipe
    step split, e.g. HPD) is no candidate; one whose module it lacks too is a CimError: a scan of another
    model.
    """
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    modules = {name for name, _ in model.named_modules()}
    values: dict[str, float] = {}
    replaced: list[str] = []
    for name, ppl in _scanned(scan):
        if name in params:
            values[name] = max(0.0, math.log(ppl / float(scan["clean_ppl"])))
        elif name.rpartition(".")[0] in modules:
            replaced.append(name)
        else:
            raise CimError(f"--budget-scan: the scan names '{name}', which this model does not have "
                           "(a scan of another model?)")  # fmt: skip
    return values, replaced


def _scanned(scan: dict[str, Any]) -> list[tuple[str, float]]:
    """(tensor, mean noisy PPL) for every tensor of every row; CimError when the JSON is no scan."""
    try:
        if not float(scan["clean_ppl"]) > 0:
            raise ValueError("clean_ppl")
        pairs = [(str(name), float(row["ppl_mean"])) for row in scan["rows"] for name in row["tensors"]]
    except (KeyError, TypeError, ValueError):
        raise CimError(
            "--budget-scan: not a sensitivity scan of `cimconvert analyze` (clean_ppl, rows)"
        ) from None
    if any(not ppl > 0 for _, ppl in pairs):
        raise CimError("--budget-scan: a row has a non-positive perplexity")
    return pairs


# ---------------------------------------------------------------------------------------- apply
def choose(items: Sequence[Item], capacity: float) -> list[Item]:
    """The exact knapsack, then whatever still fits (see :mod:`cimconvert.methods.budget.knapsack`)."""
    return fill_remaining(solve_knapsack(items, capacity), items, capacity)


def _whole(x: float) -> float | int:
    """``x`` as an int when it is whole (MACs and weight counts usually are), for readable reports."""
    return int(x) if float(x).is_integer() else x


def budget_report(budget: float, cost: str, total: float, chosen: Sequence[Item], items: Sequence[Item],
                  infos: dict[str, TensorInfo], scan: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The method report: budget, costs, what moved, the predicted damage removed, the scan's source."""
    moved = sum(item.cost for item in chosen)
    moved_pct = 100.0 * moved / total if total else 0.0
    removed = sum(item.value for item in chosen)
    return {
        "method": NAME,
        "summary": f"kept {len(chosen)} tensor(s) digital: {moved_pct:.2f} % of {COSTS[cost]} "
        f"(budget {budget:g} %), predicted damage removed {removed:.4f}",
        "budget_pct": budget,
        "cost": cost,
        "cost_meaning": COSTS[cost],
        "analog_cost_total": _whole(total),
        "budget_cost": total * budget / 100.0,
        "cost_moved": _whole(moved),
        "cost_moved_pct": moved_pct,
        "tensors_moved": len(chosen),
        "candidates": len(items),
        "damage_removed": removed,
        "damage_candidates": sum(item.value for item in items),
        "value": VALUE,
        "solver": "exact 0/1 knapsack (dynamic programme on the cost grid), then what still fits",
        "scan_source": str(scan.get("source")),
        "scan_profile": str(scan.get("profile")),
        "scan": {k: scan.get(k) for k in SCAN_KEYS},
        "chosen": [
            {"tensor": it.name, "kind": infos[it.name].kind, "value": it.value, "cost": _whole(it.cost)}
            for it in chosen
        ],
        "tables": ["chosen"],
    }


class DigitalBudgetMethod:
    """Keep the analog tensors with the most measured damage per cost digital, within a budget (knapsack)."""

    name = NAME
    families: tuple[str, ...] = ("dense", "moe", "ssm")
    options = (
        MethodOption("digital_budget", float, 5.0,
                     "digital budget: percent (0..100) of the analog cost kept digital",
                     minimum=0.0, maximum=100.0),
        MethodOption("budget_cost", str, "macs",
                     "digital budget: tensor cost, macs (analog MACs per token) or weights (weight count)",
                     choices=tuple(COSTS)),
        MethodOption("budget_scan", str, None,
                     "digital budget: layer sensitivity JSON from `cimconvert analyze --granularity layer` "
                     "[a quick scan on the calibration text]"),
        MethodOption("budget_scan_tokens", int, 2048, "digital budget: tokens of the quick scan", minimum=16),
        MethodOption("budget_scan_seeds", int, 2, "digital budget: noise seeds of the quick scan", minimum=1),
    )  # fmt: skip

    def apply(self, model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
              progress: bool = True, placement: Placement | None = None) -> MethodResult:  # fmt: skip
        """Choose the tensors to keep digital (no weight changes); they come back as ``digital``."""
        return budget_result(model, adapter, profile, options, placement, progress)


def budget_result(model: nn.Module, adapter: Any, profile: ChipProfile, options: dict[str, Any],
                  placement: Placement | None, progress: bool = True,
                  perplexities: Any = None) -> MethodResult:  # fmt: skip
    """The tensors a budget keeps digital, as ``digital`` (``perplexities``: see :func:`scan_for`)."""
    budget, cost = check_options(options)
    current = current_placement(model, profile, placement)
    analog = current.analog()
    costs = cost_function(cost, adapter, model.config)
    total = sum(costs(info) for info in analog)
    scan = scan_for(model, analog, profile, options, progress, perplexities) if analog else {"source": "none"}
    values, replaced = tensor_values(scan, model) if analog else ({}, [])
    items = [Item(info.name, values[info.name], costs(info)) for info in analog if info.name in values]
    chosen = choose(items, total * budget / 100.0)
    infos = {info.name: info for info in analog}
    report = {**budget_report(budget, cost, total, chosen, items, infos, scan), "scan_replaced": replaced}
    return MethodResult(report=report, digital=[item.name for item in chosen])
