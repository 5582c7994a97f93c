"""Checks on the trained tiny demo checkpoints and the shipped held-out text.

The checkpoints are produced by ``examples/train_tiny.py`` (see
``examples/regenerate_models.sh``).  Tests for a model folder that is absent are
skipped. The split itself is checked on a shipped excerpt (tests/data/gutenberg); only the leakage
check against the demo models' real training text needs the full Gutenberg books (marked ``shared_data``).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cimconvert.gutenberg import gutenberg_books, split_book  # noqa: E402 (after the importorskip guards)

REPO_ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO_ROOT / "examples" / "models"
DATA_DIR = REPO_ROOT / "cimconvert" / "shipped_texts"
EXCERPT = REPO_ROOT / "tests" / "data" / "gutenberg" / "sherlock_holmes_excerpt.txt"
DEMO_MODELS = ("tiny-olmoe", "tiny-mamba", "tiny-qwen2-moe", "tiny-deepseek", "tiny-mamba2")
EVAL_TOKENS = 4096
WINDOW = 256
SNIPPET = 200


def _snippets(text: str, n: int, seed: int) -> list[str]:
    """Return ``n`` deterministic 200-char snippets of ``text``."""
    rng = random.Random(seed)
    return [text[s : s + SNIPPET] for s in (rng.randrange(0, len(text) - SNIPPET) for _ in range(n))]


def _read(path: Path) -> str:
    """Read text with normalised newlines."""
    return path.read_text(encoding="utf-8").replace("\r\n", "\n").replace("\r", "\n")


@pytest.mark.parametrize("name", DEMO_MODELS)
def test_demo_model_ppl_far_below_unigram(name: str) -> None:
    """The model loads offline and its held-out PPL is < 0.5x the unigram baseline."""
    folder = MODELS_DIR / name
    if not (folder / "config.json").exists():
        pytest.skip(f"{folder} not present")
    info = json.loads((folder / "training_info.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.float32
    ).eval()
    ids = tok(_read(DATA_DIR / "heldout.txt"), add_special_tokens=False)["input_ids"]
    n_win = min(EVAL_TOKENS, len(ids)) // WINDOW
    batch = torch.tensor(ids[: n_win * WINDOW]).view(n_win, WINDOW)
    with torch.no_grad():
        logits = model(input_ids=batch).logits.float()
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    ppl = math.exp(nll.item())
    assert math.isfinite(ppl)
    assert ppl < 0.5 * info["unigram_ppl_heldout"], (ppl, info["unigram_ppl_heldout"])


def test_heldout_and_calib_disjoint() -> None:
    """No sampled 200-char snippet of heldout.txt occurs in calib.txt (and vice versa)."""
    heldout, calib = _read(DATA_DIR / "heldout.txt"), _read(DATA_DIR / "calib.txt")
    assert 100_000 < len(heldout) <= 160_000
    assert 50_000 < len(calib) <= 110_000
    for snip in _snippets(heldout, 20, seed=0):
        assert snip not in calib
    for snip in _snippets(calib, 20, seed=1):
        assert snip not in heldout


def test_split_book_on_shipped_excerpt_is_disjoint_and_complete() -> None:
    """A book between Gutenberg marker lines splits into ~90 % train + held-out tail, together the body."""
    body = _read(EXCERPT)
    raw = ("Header text\r\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\r\n" + body.replace("\n", "\r\n")
           + "\r\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\r\nLicence text\r\n")  # fmt: skip
    split = split_book(raw)
    assert split.train + split.heldout == body.strip() + "\n"
    assert "Header" not in split.train and "Licence" not in split.heldout
    assert 0.88 < len(split.train) / len(body) < 0.97 and split.train.endswith("\n\n")
    for snip in _snippets(split.heldout, 5, seed=5):
        assert snip not in split.train


@pytest.mark.shared_data
def test_heldout_not_in_training_split() -> None:
    """Sampled held-out / calibration snippets never occur in any book's TRAIN split."""
    books = gutenberg_books()
    if not books:
        pytest.skip("shared Gutenberg data not found (set CIMCONVERT_SHARED_DATA to the shared data folder)")
    train = "\n".join(split_book(_read(b)).train for b in books)
    snippets = _snippets(_read(DATA_DIR / "heldout.txt"), 10, seed=2)
    snippets += _snippets(_read(DATA_DIR / "calib.txt"), 5, seed=3)
    for snip in snippets:
        assert snip not in train, snip[:60]
    # sanity: the check itself can detect leakage
    assert _snippets(train, 1, seed=4)[0] in train
