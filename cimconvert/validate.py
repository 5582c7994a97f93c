"""``cimconvert validate OUT``: run a bundle's ONNX graph in onnxruntime under chip noise, check vs torch.

For the same windows of the same tokens it reports, from onnxruntime and from the torch simulator:
clean perplexity and perplexity over ``seeds`` noise draws (seed, seed+1, ...). Programmed weights
reach onnxruntime through IO binding (:class:`~cimconvert.runtime.noise.OrtNoiseRunner`) and are
checked bit-identical to the torch model's for every draw; per-MVM effects run in-graph (standard-op
per-MVM bodies on weights prepared once per draw by ``simulator.prepare_mvm``). The summary
(optimum-style) says whether the outputs match: clean logits max|Δ| ≤ ``atol`` and noisy mean
perplexities within ``ppl_rtol``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cimconvert.errors import BundleError, CimError
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.plausibility import fail_implausible
from cimconvert.profiles import ChipProfile, load_profile

ONNX_MODEL = "onnx/model.onnx"
#: Clean ONNX vs torch logits (fp32).
ATOL = 1e-4
#: Noisy mean perplexity, onnxruntime vs torch simulator (relative).
PPL_RTOL = 0.005


def check_onnx_files(out: Path, manifest: Any) -> Path:
    """The bundle's ONNX graph after checking it and its external data against the manifest."""
    from cimconvert.checkpoint import sha256_file

    entries = [f for f in manifest.files if f.name.startswith("onnx/")]
    if not any(f.name == ONNX_MODEL for f in entries):
        raise BundleError(f"bundle {out} has no ONNX graph ({ONNX_MODEL} is not in the manifest)")
    for entry in entries:
        path = out / entry.name
        if not path.is_file():
            raise BundleError(f"bundle {out}: {entry.name} is missing")
        if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
            raise BundleError(
                f"bundle {out}: {entry.name} does not match its sha256 in the manifest (altered)"
            )
    return out / ONNX_MODEL


def resolve_profile(manifest: Any, profile: str | ChipProfile | None, mismatch_ok: bool) -> ChipProfile:
    """The validation profile; refuses one whose hash differs from the bundle's unless ``mismatch_ok``."""
    from cimconvert.bundle.reader import manifest_profile

    if profile is None:
        return manifest_profile(manifest)
    chip = load_profile(profile)
    if chip.content_hash() != manifest.profile.content_hash and not mismatch_ok:
        raise CimError(
            f"profile '{chip.name}' ({chip.content_hash()[:15]}) does not match the bundle's profile "
            f"'{manifest.profile.name}' ({manifest.profile.content_hash[:15]}); pass --profile-mismatch-ok"
        )
    return chip


def _stats(values: Sequence[float]) -> dict[str, Any]:
    mean = statistics.fmean(values) if values else float("nan")
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"per_seed": list(values), "mean": mean, "std": std}


def _timed(fn: Callable[[], float]) -> tuple[float, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def _clean_logits_diff(net: torch.nn.Module, session: Any, tokens: torch.Tensor, seq_len: int) -> float:
    """max|Δ| of clean logits, torch vs onnxruntime, on two windows (batch 2)."""
    n = min(seq_len, int(tokens.numel()) // 2)
    batch = tokens[: 2 * n].reshape(2, n)
    ids = batch.numpy().astype(np.int64)
    ort_logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    with torch.no_grad():
        ref = net(input_ids=batch, use_cache=False).logits.float().numpy()
    return float(np.abs(ort_logits - ref).max())


def _torch_draws(
    net: torch.nn.Module,
    tensors: Sequence[Any],
    chip: ChipProfile,
    seeds: Sequence[int],
    ppl: Callable[[Any], float],
    runner: Any,
) -> tuple[list[float], list[float], list[float], bool]:
    """Per seed: torch PPL, ORT PPL, their times, and whether programmed weights were bit-identical."""
    from cimconvert.noise import apply_chip_noise
    from cimconvert.runtime.noise import OrtCausalLM, bound_equal

    torch_ppl, ort_ppl, ort_seconds, identical = [], [], [], True
    ort_model = OrtCausalLM(runner)
    for seed in seeds:
        bound = runner.program(seed)
        value, seconds = _timed(lambda: ppl(ort_model))
        ort_ppl.append(value)
        ort_seconds.append(seconds)
        with apply_chip_noise(net, tensors, chip, seed):
            identical &= bound_equal(bound, dict(net.named_parameters()))
            torch_ppl.append(ppl(net))
    return torch_ppl, ort_ppl, ort_seconds, identical


@fail_implausible
def validate(
    out: str | Path,
    profile: str | ChipProfile | None = None,
    seeds: int = 5,
    seed: int = 1000,
    dataset: str = "heldout",
    max_tokens: int = 4096,
    seq_len: int = 128,
    batch_size: int = 8,
    threads: int = 1,
    profile_mismatch_ok: bool = False,
    atol: float = ATOL,
    ppl_rtol: float = PPL_RTOL,
    progress: bool = False,
) -> dict[str, Any]:
    """Validate bundle ``out``'s ONNX graph in onnxruntime against the torch simulator (see module doc)."""
    from transformers import AutoTokenizer

    from cimconvert.api import load_bundle, tokenize
    from cimconvert.bundle.reader import read_manifest
    from cimconvert.data import load_text
    from cimconvert.runtime import OrtCausalLM, OrtNoiseRunner, analog_tensors, load_model
    from cimconvert.runtime.session import make_session

    folder = Path(out)
    manifest = read_manifest(folder)
    onnx_path = check_onnx_files(folder, manifest)
    chip = resolve_profile(manifest, profile, profile_mismatch_ok)
    text = load_text(dataset)
    torch.set_num_threads(threads)
    net = load_bundle(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokens = tokenize(tokenizer, text, max_tokens)
    proto = load_model(onnx_path)
    tensors = analog_tensors(proto)
    draws = list(range(seed, seed + seeds))

    def ppl(model: Any) -> float:
        return perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size)

    session = make_session(proto, threads)
    max_diff = _clean_logits_diff(net, session, tokens, seq_len)
    ort_clean, ort_clean_s = _timed(lambda: ppl(OrtCausalLM(session)))
    torch_clean, torch_clean_s = _timed(lambda: ppl(net))
    runner = OrtNoiseRunner(proto, chip, tensors, threads=threads, noise_seed=seed)
    torch_noisy, ort_noisy, ort_noisy_s, identical = _torch_draws(net, tensors, chip, draws, ppl, runner)
    ort_stats, torch_stats = _stats(ort_noisy), _stats(torch_noisy)
    rel = abs(ort_stats["mean"] / torch_stats["mean"] - 1.0) if draws else 0.0
    clean_rel = abs(ort_clean / torch_clean - 1.0)
    outputs_match = max_diff <= atol
    return {
        "bundle": str(folder),
        "onnx": str(onnx_path),
        "profile": chip.name,
        "profile_hash": chip.content_hash(),
        "bundle_profile_hash": manifest.profile.content_hash,
        "dataset": dataset,
        "tokens": int(tokens.numel()),
        "seq_len": seq_len,
        "seeds": draws,
        "analog_tensors": len(tensors),
        "per_mvm": runner.mvm,
        "onnxruntime": {
            "clean_ppl": ort_clean, "noisy_ppl": ort_stats,
            "seconds": {"clean": ort_clean_s, "per_draw": statistics.fmean(ort_noisy_s or [0.0])},
        },
        "torch": {"clean_ppl": torch_clean, "noisy_ppl": torch_stats, "seconds": {"clean": torch_clean_s}},
        "summary": {
            "outputs_match": outputs_match,
            "clean_logits_max_abs_diff": max_diff,
            "atol": atol,
            "clean_ppl_rel_diff": clean_rel,
            "programmed_weights_bit_identical": identical,
            "noisy_ppl_rel_diff": rel,
            "ppl_rtol": ppl_rtol,
            "passed": bool(outputs_match and identical and rel <= ppl_rtol),
        },
    }  # fmt: skip


def format_validate(res: dict[str, Any]) -> str:
    """Human-readable report of :func:`validate`."""
    ort_r, torch_r, s = res["onnxruntime"], res["torch"], res["summary"]
    n = len(res["seeds"])
    mode = "programmed weights + per-MVM DAC/ADC/noise in-graph" if res["per_mvm"] else "programmed weights"
    lines = [
        f"validate {res['bundle']}  profile {res['profile']}  dataset {res['dataset']} "
        f"({res['tokens']} tokens, seq_len {res['seq_len']}, {res['analog_tensors']} analog tensors; {mode})",
        f"  {'':<12}{'clean PPL':>12}{'noisy PPL (' + str(n) + ' draws)':>30}",
        f"  {'onnxruntime':<12}{ort_r['clean_ppl']:>12.4f}"
        f"{ort_r['noisy_ppl']['mean']:>20.4f} +- {ort_r['noisy_ppl']['std']:.4f}",
        f"  {'torch':<12}{torch_r['clean_ppl']:>12.4f}"
        f"{torch_r['noisy_ppl']['mean']:>20.4f} +- {torch_r['noisy_ppl']['std']:.4f}",
        f"  outputs match: {'yes' if s['outputs_match'] else 'NO'} "
        f"(clean logits max|diff| {s['clean_logits_max_abs_diff']:.2e} <= {s['atol']:.0e})",
        f"  programmed weights bit-identical to torch: "
        f"{'yes' if s['programmed_weights_bit_identical'] else 'NO'}",
        f"  noisy PPL rel. diff {100 * s['noisy_ppl_rel_diff']:.3f}% (tolerance {100 * s['ppl_rtol']:.1f}%)",
        *(f"  problem: {problem}" for problem in s.get("problems", [])),
        f"  result: {'PASS' if s['passed'] else 'FAIL'}",
    ]
    return "\n".join(lines)
