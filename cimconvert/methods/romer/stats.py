"""Router statistics on calibration text: logits and expert activation counts per MoE layer.

:class:`RouterRecorder` is a context manager that hooks every router module (after any routing hook, so
it records the routing actually used) and keeps, per layer, the logits ``[T, E]`` (fp32, CPU) and the
top-k selection counts ``[E]``. :func:`collect` runs the calibration batches through the model once.

In-situ calibration on a real chip reads router logits measured on the chip from a safetensors file
(:func:`save_router_logits` writes one from a simulated chip; docs/ROMER.md documents the format):
``input_ids`` ``[N, S]`` int64 (the calibration tokens) and ``layer.{i}.router_logits`` ``[N·S, E]``
float32 for each MoE decoder layer ``i``, tokens in row-major ``(sample, position)`` order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cimconvert.devices import to_model_device
from cimconvert.errors import CimError
from cimconvert.methods.calibration import iter_batches
from cimconvert.progress import progress_bar


@dataclass
class RouterStats:
    """Per MoE layer (keyed by decoder-layer index): logits ``[T, E]`` and selection counts ``[E]``."""

    logits: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def frequencies(self) -> dict[int, torch.Tensor]:
        """Share of tokens that select each expert (sums to k per layer; uniform load is k/E)."""
        return {i: c.double() / max(self.tokens, 1) for i, c in self.counts.items()}

    @staticmethod
    def merge(parts: list[RouterStats]) -> RouterStats:
        """Pool several runs (e.g. noise draws): logits concatenated, counts summed."""
        out = RouterStats()
        for part in parts:
            for i, z in part.logits.items():
                out.logits[i] = torch.cat([out.logits[i], z]) if i in out.logits else z
            for i, c in part.counts.items():
                out.counts[i] = out.counts[i] + c if i in out.counts else c.clone()
            out.tokens += part.tokens
            out.seconds += part.seconds
        return out


class RouterRecorder:
    """Records router outputs of the given ``{layer_index: router_module}`` while active."""

    def __init__(
        self, routers: dict[int, torch.nn.Module], num_experts: int, keep_logits: bool = True
    ) -> None:
        self.routers = routers
        self.num_experts = num_experts
        self.keep_logits = keep_logits
        self._logits: dict[int, list[torch.Tensor]] = {i: [] for i in routers}
        self.counts = {i: torch.zeros(num_experts, dtype=torch.long) for i in routers}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, layer: int):
        def record(module: torch.nn.Module, args: object, output: object) -> None:
            if not isinstance(output, tuple) or len(output) < 3:
                raise CimError(
                    f"router of layer {layer} ({type(module).__name__}) does not return "
                    "(logits, top_k_weights, top_k_index)"
                )
            logits, weights, index = output[0], output[1], output[2]
            if self.keep_logits:
                self._logits[layer].append(logits.detach().float().reshape(-1, logits.shape[-1]).cpu())
            used = index[weights != 0] if weights.shape == index.shape else index.reshape(-1)
            self.counts[layer] += torch.bincount(used.reshape(-1).cpu(), minlength=self.num_experts)[
                : self.num_experts
            ]

        return record

    def __enter__(self) -> RouterRecorder:
        for i, router in self.routers.items():
            self._handles.append(router.register_forward_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def stats(self, tokens: int, seconds: float) -> RouterStats:
        """The recorded statistics (hooks must have fired for every layer)."""
        missing = [i for i, c in self.counts.items() if int(c.sum()) == 0]
        if missing:
            raise CimError(
                f"router of MoE layer {missing[0]} never ran: router not found in the forward pass"
            )
        logits = {i: torch.cat(v) for i, v in self._logits.items() if v}
        return RouterStats(logits=logits, counts=dict(self.counts), tokens=tokens, seconds=seconds)


@torch.no_grad()
def collect(
    model: torch.nn.Module,
    routers: dict[int, torch.nn.Module],
    num_experts: int,
    tokens: torch.Tensor,
    batch_size: int = 8,
    keep_logits: bool = True,
    progress: bool = False,
    desc: str = "calibration",
) -> RouterStats:
    """Run ``tokens [N, S]`` through ``model`` and record every router's logits and expert counts."""
    model.eval()
    start = time.perf_counter()
    with RouterRecorder(routers, num_experts, keep_logits) as recorder:
        for batch in progress_bar(iter_batches(tokens, batch_size), desc=desc, enabled=progress, inner=True):
            model(input_ids=to_model_device(batch, model), use_cache=False)
    return recorder.stats(int(tokens.numel()), time.perf_counter() - start)


def save_router_logits(path: str | Path, tokens: torch.Tensor, stats: RouterStats) -> None:
    """Write measured router logits in the in-situ file format (see the module docstring)."""
    data = {"input_ids": tokens.to(torch.int64).contiguous()}
    for i, z in stats.logits.items():
        data[f"layer.{i}.router_logits"] = z.float().contiguous()
    save_file(data, str(path), metadata={"format": "cimconvert-router-logits", "version": "1"})


def load_router_logits(
    path: str | Path, layers: list[int], num_experts: int
) -> tuple[torch.Tensor, RouterStats]:
    """Read an in-situ router-logits file: ``(input_ids [N, S], stats)``; CimError if malformed.

    The returned stats hold logits only; the caller derives expert counts with the routing rule.
    """
    file = Path(path)
    if not file.is_file():
        raise CimError(f"--insitu-logits: file not found: {file}")
    try:
        data = load_file(str(file))
    except Exception as exc:  # safetensors raises several types for a bad header
        raise CimError(f"--insitu-logits {file}: not a safetensors file ({exc.__class__.__name__})") from None
    ids = data.get("input_ids")
    if ids is None or ids.dim() != 2:
        raise CimError(f"--insitu-logits {file}: needs an 'input_ids' [samples, seq_len] tensor")
    stats = RouterStats(tokens=int(ids.numel()))
    for i in layers:
        z = data.get(f"layer.{i}.router_logits")
        if z is None or tuple(z.shape) != (ids.numel(), num_experts):
            raise CimError(
                f"--insitu-logits {file}: 'layer.{i}.router_logits' must be [{ids.numel()}, {num_experts}]"
            )
        stats.logits[i] = z.float()
    return ids.long(), stats
