"""PIQA scoring: log-likelihood comparison as lm-eval-harness does; accuracy in [0, 1], right count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import VOCAB, build_tiny

from cimconvert.datasets import shared_data_dir
from cimconvert.evaluation.piqa import (
    PiqaItem,
    PreparedPiqa,
    choose,
    encode_pair,
    load_piqa,
    loglikelihoods,
    prepare_piqa,
    score_piqa,
)


class CharTokenizer:
    """One token per character (ids modulo the tiny vocabulary)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % VOCAB for c in text]}


class FixedLM(torch.nn.Module):
    """Always predicts token 5 with probability ~1 (any other token is very unlikely)."""

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        logits = torch.full((*input_ids.shape, VOCAB), -20.0)
        logits[..., 5] = 20.0
        return type("Out", (), {"logits": logits})()


def test_encode_pair_moves_trailing_space_to_continuation() -> None:
    ctx, cont = encode_pair(CharTokenizer(), "ab ", "cd")
    assert (len(ctx), len(cont)) == (2, 3)


def test_loglikelihood_comparison_on_a_crafted_example() -> None:
    likely, unlikely = [5, 5, 5], [7, 7]
    lls = loglikelihoods(FixedLM(), [([1, 2], likely), ([1, 2], unlikely)])
    assert lls[0] > -1e-3 and lls[1] < -30
    prepared = PreparedPiqa(
        [([1], likely), ([1], unlikely), ([1], unlikely), ([1], likely)], [0, 1], [3, 2, 2, 3]
    )
    assert score_piqa(FixedLM(), prepared) == {"acc": 1.0, "acc_norm": 1.0, "n": 2}
    # per-character normalisation flips the choice: -6/2 = -3 < -10/10 = -1
    assert choose([-6.0, -10.0], [2, 10]) == (0, 1)


#: The first 50 PIQA validation items (tests/data/README.md: source and licence).
FIXTURE = Path(__file__).resolve().parent / "data" / "piqa"


def test_piqa_fixture_loads_50_labelled_items() -> None:
    items = load_piqa(folder=FIXTURE)
    assert len(items) == 50 and all(isinstance(i, PiqaItem) and i.label in (0, 1) for i in items)
    assert {i.label for i in items} == {0, 1}
    assert all(i.goal and all(i.solutions) for i in items)


def test_piqa_on_tiny_model_counts_items() -> None:
    items = load_piqa(limit=6, folder=FIXTURE)
    assert len(items) == 6
    result = score_piqa(build_tiny("mamba"), prepare_piqa(CharTokenizer(), items), batch_size=4)
    assert result["n"] == 6 and 0.0 <= result["acc"] <= 1.0 and 0.0 <= result["acc_norm"] <= 1.0


@pytest.mark.shared_data
@pytest.mark.skipif(
    shared_data_dir() is None or not (shared_data_dir() / "piqa").is_dir(),
    reason="full PIQA split not found (set CIMCONVERT_SHARED_DATA to the shared data folder)",
)
def test_piqa_fixture_is_the_start_of_the_full_split() -> None:
    full = load_piqa()
    assert len(full) == 1838
    assert full[:50] == load_piqa(folder=FIXTURE)
