"""Monte-Carlo over the processes of a ``torchrun`` launch (torch.distributed: gloo on CPU, nccl on GPU).

A launch is detected by the environment torchrun sets (``RANK``, ``WORLD_SIZE``; ``MASTER_ADDR`` /
``MASTER_PORT`` for the rendezvous); without it everything runs in this one process, as before.
:func:`spread` is the one entry point: the caller lists its independent tasks (noise draws, a clean pass,
(layer, seed) pairs), every rank runs the tasks ``rank, rank + world, ...`` (disjoint, by index), and the
results come back in task order on every rank, so each number is computed exactly as a single process
computes it. Before any work the ranks compare a digest of what they were asked (model, tokens, profile,
seeds, options): ranks that disagree all raise the same one-line CimError (exit 2), nothing written.
Only rank 0 prints and writes (:func:`is_main_rank`).
"""

from __future__ import annotations

import atexit
import hashlib
import io
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from cimconvert.errors import CimError
from cimconvert.progress import progress_bar

T = TypeVar("T")
R = TypeVar("R")


def world_size() -> int:
    """Processes in this launch (1 without torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def rank() -> int:
    """This process's rank (0 without torchrun)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def is_main_rank() -> bool:
    """Whether this process prints and writes results (rank 0, or no launcher)."""
    return rank() == 0


def launched() -> bool:
    """Whether this process is one of several ranks of a launch."""
    return world_size() > 1


def require_single_process(command: str) -> None:
    """CimError when ``command`` (which writes one output) is run by several ranks of a launch."""
    if launched():
        raise CimError(f"{command} runs in one process: launch it without torchrun (eval, validate, "
                       "analyze and convert share their noise draws over the ranks of a launch)")  # fmt: skip


def backend_for(device: torch.device) -> str:
    """The collective backend for ranks computing on ``device``: nccl for CUDA, gloo otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def _init(device: torch.device) -> None:
    """Join the launch's process group once (destroyed at exit)."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend_for(device), rank=rank(), world_size=world_size())
    atexit.register(_close)


def _close() -> None:
    """Leave the process group (at exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _encode(value: Any) -> torch.Tensor:
    """``value`` (tensors and plain containers of numbers, strings, None) as bytes in a uint8 tensor."""
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)


def _decode(data: torch.Tensor) -> Any:
    """Inverse of :func:`_encode`; a weights-only load: nothing but tensors and plain containers is built."""
    return torch.load(io.BytesIO(data.cpu().numpy().tobytes()), weights_only=True)


def _gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank (no pickle: see :func:`_decode`)."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    data = _encode(value).to(device)
    size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(parts, padded)
    return [_decode(part[: int(s.item())]) for part, s in zip(parts, sizes, strict=True)]


def fingerprint(*parts: Any) -> str:
    """sha256 of the ``repr`` of ``parts`` (what the ranks must agree on)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(repr(part).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module) -> str:
    """Digest of a model's parameters: names, shapes, dtypes and a float64 sum of each (cheap, exact on
    identical inputs)."""
    rows = [(name, tuple(p.shape), str(p.dtype), float(p.detach().double().sum()))
            for name, p in model.named_parameters()]  # fmt: skip
    return fingerprint(rows)


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's values (e.g. the evaluation tokens)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _check_agreement(digest: str, what: str) -> None:
    """CimError on every rank when the ranks' digests differ."""
    digests = _gather(digest)
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise CimError(f"torchrun ranks disagree on {what} (rank {differ[0]} differs from rank 0): launch "
                       "every rank with the same model, arguments and data")  # fmt: skip


def spread(
    tasks: Sequence[T],
    run: Callable[[T], R],
    device: torch.device,
    agree: Callable[[], str],
    what: str = "the model or seeds",
    progress: str | None = None,
) -> list[R]:
    """``[run(t) for t in tasks]``, its tasks shared out over the ranks of a launch.

    Rank r runs tasks r, r + W, r + 2W, ... (W ranks); the results are gathered in task order on every
    rank; a result holds tensors and plain containers of numbers and strings only (sent without pickle).
    ``agree`` returns a digest (:func:`fingerprint`) of everything the results depend on (called only
    under a launch); ranks whose digests differ all raise the same CimError (``what`` they disagree on)
    before any task runs. Without a launch: a plain loop. ``progress``: the description of a progress bar
    (rank 0 only), None for none.
    """
    if not launched():
        return [run(tasks[index]) for index in _bar(range(len(tasks)), progress)]
    _init(device)
    _check_agreement(fingerprint(agree(), len(tasks)), what)
    mine: dict[int, R] = {}
    failure: BaseException | None = None
    try:
        for index in _bar(range(rank(), len(tasks), world_size()), progress):
            mine[index] = run(tasks[index])
    except Exception as exc:  # every rank must reach the gather, or the others wait forever
        failure = exc
    parts = _gather((mine, None if failure is None else exc_line(failure)))
    _raise_failures(parts, failure)
    merged: dict[int, R] = {}
    for part, _ in parts:
        merged.update(part)
    return [merged[index] for index in range(len(tasks))]


def _bar(indices: range, progress: str | None) -> Iterator[int]:
    """``indices``, under a progress display on rank 0 when ``progress`` names one."""
    shown = progress is not None and is_main_rank()
    yield from progress_bar(indices, desc=progress or "", enabled=shown, unit="pass")


def exc_line(exc: BaseException) -> str:
    """The first line of an exception's message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _raise_failures(parts: list[tuple[Any, str | None]], own: BaseException | None) -> None:
    """Re-raise this rank's own failure; on the other ranks, a CimError naming the first failed rank."""
    if own is not None:
        raise own
    failed = [(r, message) for r, (_, message) in enumerate(parts) if message is not None]
    if failed:
        r, message = failed[0]
        raise CimError(f"torchrun rank {r} failed: {message}")
