"""What the two noise-aware training methods share: analog targets, seeds and the method protocol.

A *method* turns the model's clean parameters into the weights one training step runs with. The
trainer calls ``method.perturbed(step)`` and runs the model through ``torch.func.functional_call`` with
the returned ``{name: tensor}`` (so HF code that reads a weight directly, e.g. Mamba's
``dt_proj.weight``, sees the perturbed tensor too); while the context is open the method may also route
matmuls through hooks or an experts implementation. Everything random is seeded from (seed, step), so a
step is reproducible on its own, which is what makes resuming bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from cimconvert.errors import CimError
from cimconvert.placement import Placement
from cimconvert.simulator.program import Layout
from cimconvert.simulator.rng import stable_seed


@dataclass(frozen=True)
class Target:
    """One analog tensor to perturb: in-memory parameter ``name`` and its matmul ``layout``."""

    name: str
    layout: Layout


class NoiseMethod(Protocol):
    """A noise-aware training method (see :mod:`cimconvert.finetune.ste` / ``nat``)."""

    name: str

    def perturbed(self, step: int) -> AbstractContextManager[dict[str, torch.Tensor]]:
        """Context giving the effective weights of ``step`` (differentiable w.r.t. the parameters)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary of the method and its settings."""
        ...


class NoNoise:
    """Control: plain fine-tuning with the clean weights (no noise; same loop, data and schedule)."""

    name = "none"

    @contextmanager
    def perturbed(self, step: int) -> Iterator[dict[str, torch.Tensor]]:
        """No replacement weights: the model runs with its own parameters."""
        yield {}

    def describe(self) -> dict[str, Any]:
        """Method summary (JSON-serialisable)."""
        return {"method": self.name, "forward": "clean weights", "backward": "plain autograd"}


def analog_targets(model: nn.Module, placement: Placement) -> list[Target]:
    """The analog matmul weights of ``model`` in ``placement`` (planned once where the model entered, or
    a bundle's read back and mapped onto the model; see :mod:`cimconvert.placement`)."""
    params = dict(model.named_parameters())
    targets = [
        Target(info.name, info.layout)  # type: ignore[arg-type]
        for info in placement.analog()
        if info.name in params and info.layout in ("out_in", "in_out") and params[info.name].dim() in (2, 3)
    ]
    if not targets:
        raise CimError(f"profile '{placement.profile}' places no tensor of this model on analog tiles")
    return targets


def step_seed(seed: int, step: int, stream: str) -> int:
    """Seed of random ``stream`` ("prog", "mvm", "nat") at training ``step`` (never an eval seed)."""
    return stable_seed(seed, f"finetune:{stream}:{step}")


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def named_parameters(model: nn.Module, targets: Sequence[Target]) -> dict[str, nn.Parameter]:
    """The parameters named by ``targets`` (CimError for an unknown name)."""
    params = dict(model.named_parameters())
    missing = [t.name for t in targets if t.name not in params]
    if missing:
        raise CimError(f"analog tensor '{missing[0]}' is not a parameter of the model")
    return {t.name: params[t.name] for t in targets}


def iter_targets(
    targets: Sequence[Target], params: dict[str, nn.Parameter]
) -> Iterator[tuple[Target, nn.Parameter]]:
    """(target, parameter) pairs in target order."""
    for target in targets:
        yield target, params[target.name]
