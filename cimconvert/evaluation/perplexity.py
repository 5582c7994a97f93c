"""Perplexity of a causal LM on a token stream: windows of ``seq_len`` every ``stride`` tokens."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from cimconvert.devices import to_model_device
from cimconvert.progress import progress_bar


def windows(n_tokens: int, seq_len: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Yield (begin, end, n_scored) windows; each token after the first is scored exactly once.

    The first window scores all its tokens but the first; later windows score only the last
    ``stride`` tokens (the rest is context), as in the Hugging Face perplexity guide.
    """
    if seq_len < 2 or stride < 1 or stride > seq_len:
        raise ValueError("need seq_len >= 2 and 1 <= stride <= seq_len")
    begin, prev_end = 0, 0
    while prev_end < n_tokens:
        end = min(begin + seq_len, n_tokens)
        scored = end - prev_end if prev_end else end - begin - 1
        if end - begin < 2:
            break
        yield begin, end, scored
        prev_end = end
        begin += stride
        if end == n_tokens:
            break


def _row_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token NLL of one window (``logits [seq, vocab]``): one window's log-softmax at a time, so
    only one ``[seq, vocab]`` float32 temporary exists besides the model's logits."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logprobs.gather(-1, ids[1:, None]).squeeze(-1)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """(summed next-token NLL, tokens scored) of a batch ``ids [rows, seq]`` with its ``logits [rows, seq,
    vocab]``: every position but the first of each row is scored (calibration rows, each its own window)."""
    shifted = logits[:, :-1].float()
    labels = ids[:, 1:]
    nll = torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels.reshape(-1),
                                            reduction="sum")  # fmt: skip
    return float(nll), int(labels.numel())


Span = tuple[int, int, int]


def window_batches(
    tokens: torch.Tensor, seq_len: int, stride: int | None = None, batch_size: int = 8
) -> list[tuple[torch.Tensor, list[Span]]]:
    """The batches :func:`perplexity` runs, in order: ``(input_ids [B, len], spans)``.

    Up to ``batch_size`` windows per group; within a group, windows of the same length form one batch.
    """
    stride = stride or seq_len
    spans = list(windows(int(tokens.numel()), seq_len, stride))
    batches = []
    for start in range(0, len(spans), batch_size):
        group = spans[start : start + batch_size]
        for length in sorted({e - b for b, e, _ in group}):
            same = [s for s in group if s[1] - s[0] == length]
            batches.append((torch.stack([tokens[b:e] for b, e, _ in same]), same))
    return batches


def add_batch_nll(
    running: tuple[float, int], logits: torch.Tensor, batch: torch.Tensor, spans: list[Span]
) -> tuple[float, int]:
    """``running`` (NLL sum, scored tokens) plus one batch's scored tokens, added row by row."""
    total, count = running
    for row, (_, _, scored) in enumerate(spans):
        total += float(_row_nll(logits[row], batch[row])[-scored:].sum())
        count += scored
    return total, count


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    seq_len: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean negative log-likelihood) of ``tokens`` (1-D LongTensor) under ``model``."""
    batches = window_batches(tokens, seq_len, stride, batch_size)
    running = (0.0, 0)
    model.eval()
    bar = progress_bar(total=sum(len(spans) for _, spans in batches), desc=desc, enabled=progress, inner=True,
                       unit="win")  # fmt: skip
    for cpu_batch, spans in batches:
        batch = to_model_device(cpu_batch, model)
        logits = model(input_ids=batch, use_cache=False).logits
        running = add_batch_nll(running, logits, batch, spans)
        del logits
        bar.update(len(spans))
    bar.close()
    return nll_perplexity(running)


def nll_perplexity(running: tuple[float, int]) -> float:
    """exp(mean NLL) of a (NLL sum, scored tokens) pair."""
    return math.exp(running[0] / max(running[1], 1))
