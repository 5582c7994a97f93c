"""PIQA accuracy by log-likelihood comparison, as lm-eval-harness scores it.

Each item has a goal and two solutions. The context is ``"Question: {goal}\\nAnswer:"`` and each
continuation is ``" " + solution``; a solution's score is the summed log-probability of its tokens given
the context (context and continuation are tokenised together and split at the context's length, as
lm-eval-harness's ``_encode_pair`` does). ``acc`` picks the larger sum; ``acc_norm`` divides it by the
solution's length in characters first. Labels are 0/1 (``valid-labels.lst``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cimconvert.datasets import shared_data_dir
from cimconvert.devices import to_model_device
from cimconvert.errors import CimError

MAX_LEN = 256


@dataclass(frozen=True)
class PiqaItem:
    """One PIQA question: goal, the two solutions, and the index of the correct one."""

    goal: str
    solutions: tuple[str, str]
    label: int


@dataclass(frozen=True)
class PreparedPiqa:
    """Tokenised requests: ``requests[2*i + j]`` = (context ids, continuation ids) of item i, solution j."""

    requests: list[tuple[list[int], list[int]]]
    labels: list[int]
    char_lengths: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def piqa_dir() -> Path:
    """The shared PIQA folder (``<shared data>/piqa``)."""
    root = shared_data_dir()
    if root is None or not (root / "piqa").is_dir():
        raise CimError("PIQA needs the shared data folder (set CIMCONVERT_SHARED_DATA to its path)")
    return root / "piqa"


def load_piqa(limit: int | None = None, folder: str | Path | None = None) -> list[PiqaItem]:
    """The first ``limit`` items of the PIQA validation split (``valid.jsonl`` + ``valid-labels.lst``)."""
    folder = Path(folder) if folder is not None else piqa_dir()
    try:
        lines = (folder / "valid.jsonl").read_text(encoding="utf-8").splitlines()
        labels = (folder / "valid-labels.lst").read_text(encoding="utf-8").split()
    except OSError as exc:
        raise CimError(f"cannot read PIQA from {folder} ({exc.__class__.__name__})") from None
    if len(lines) != len(labels):
        raise CimError(f"PIQA in {folder}: {len(lines)} questions but {len(labels)} labels")
    items = []
    for line, label in zip(lines[:limit], labels[:limit], strict=True):
        doc = json.loads(line)
        items.append(PiqaItem(doc["goal"], (doc["sol1"], doc["sol2"]), int(label)))
    return items


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval-harness ``_encode_pair``: trailing context spaces move to the continuation; split by length."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        continuation = context[-spaces:] + continuation
        context = context[:-spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    return whole[: len(ctx)], whole[len(ctx) :]


def prepare_piqa(tokenizer: Any, items: list[PiqaItem]) -> PreparedPiqa:
    """Tokenise both solutions of every item once (reused across noise draws)."""
    requests, char_lengths = [], []
    for item in items:
        context = f"Question: {item.goal}\nAnswer:"
        for solution in item.solutions:
            requests.append(encode_pair(tokenizer, context, " " + solution))
            char_lengths.append(len(solution))
    return PreparedPiqa(requests, [item.label for item in items], char_lengths)


@torch.no_grad()
def loglikelihoods(
    model: torch.nn.Module, requests: list[tuple[list[int], list[int]]], batch_size: int = 32, pad_id: int = 0
) -> list[float]:
    """Summed log-probability of each continuation given its context (batched, right-padded)."""
    model.eval()
    seqs = [(ctx + cont)[-MAX_LEN:] for ctx, cont in requests]
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(seqs[i]) for i in chunk)
        batch = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        for row, i in enumerate(chunk):
            batch[row, : len(seqs[i])] = torch.tensor(seqs[i])
        logits = model(input_ids=to_model_device(batch, model), use_cache=False).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(chunk):
            n, k = len(seqs[i]), len(requests[i][1])
            positions = torch.arange(n - k - 1, n - 1)
            out[i] = float(logprobs[row, positions, batch[row, positions + 1]].sum())
    return out


def choose(lls: list[float], char_lengths: list[int]) -> tuple[int, int]:
    """(argmax of the log-likelihoods, argmax of log-likelihood per character) for one item."""
    acc = max(range(len(lls)), key=lambda j: lls[j])
    norm = max(range(len(lls)), key=lambda j: lls[j] / max(char_lengths[j], 1))
    return acc, norm


def score_piqa(model: torch.nn.Module, prepared: PreparedPiqa, batch_size: int = 32) -> dict[str, Any]:
    """``acc`` and ``acc_norm`` of ``model`` on prepared PIQA items, and the item count ``n``."""
    if not len(prepared):
        raise CimError("PIQA: no items to score")
    lls = loglikelihoods(model, prepared.requests, batch_size)
    correct = correct_norm = 0
    for i, label in enumerate(prepared.labels):
        acc, norm = choose(lls[2 * i : 2 * i + 2], prepared.char_lengths[2 * i : 2 * i + 2])
        correct += acc == label
        correct_norm += norm == label
    n = len(prepared)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
