"""Perplexity windows and the perplexity of a real (tiny) transformers model against its own loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from cimconvert.evaluation import perplexity, windows


@pytest.mark.parametrize(("n", "seq", "stride"), [(100, 16, 16), (100, 16, 8), (17, 16, 4), (5, 16, 16)])
def test_windows_score_every_token_once(n: int, seq: int, stride: int) -> None:
    scored = []
    for begin, end, k in windows(n, seq, stride):
        assert end - begin <= seq
        scored.extend(range(end - k, end))
    assert scored == list(range(1, n))


def test_windows_reject_bad_stride() -> None:
    with pytest.raises(ValueError):
        list(windows(10, 4, 5))


def test_perplexity_matches_model_loss() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()
    tokens = torch.randint(0, 64, (64,))
    with torch.no_grad():
        loss = model(input_ids=tokens[None], labels=tokens[None]).loss
    assert perplexity(model, tokens, seq_len=64) == pytest.approx(math.exp(float(loss)), rel=1e-5)
    # Overlapping windows, batched 3 at a time: the same as scoring each window alone, every token once.
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin, end, scored in windows(64, 32, 8):
            window = tokens[begin:end]
            logits = model(input_ids=window[None]).logits[0, :-1]
            nll += float(F.cross_entropy(logits, window[1:], reduction="none")[-scored:].sum())
            count += scored
    assert count == 63
    strided = perplexity(model, tokens, seq_len=32, stride=8, batch_size=3)
    assert strided == pytest.approx(math.exp(nll / count), rel=1e-5)
