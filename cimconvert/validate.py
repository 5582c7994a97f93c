"""``cimconvert validate OUT``: run a bundle's ONNX graph in onnxruntime under chip noise, check vs torch.

For the same windows of the same tokens it reports, from onnxruntime and from the torch simulator:
clean perplexity and perplexity over ``seeds`` noise draws (seed, seed+1, ...). Programmed weights
reach onnxruntime through IO binding (:class:`~cimconvert.runtime.ort_noise.OrtNoiseRunner`) and are
checked bit-identical to the torch model's for every draw; per-MVM effects run in-graph (standard-op
per-MVM bodies on weights prepared once per draw by ``simulator.prepare_mvm``).

The verdict does not depend on luck:

* ``mvm_noise="counter"`` (default, *exact*): both runtimes draw the per-MVM noise from the same
  counter-based generator (``simulator.rng.counter_normal``, mirrored in standard ONNX ops). Per seed,
  every analog node of the runtime graph is run alone on the same input in both runtimes and must
  agree up to rare ADC-step flips (:func:`node_check`, ``NODE_MISMATCH``), and the end-to-end noisy
  perplexities must agree within ``ppl_rtol`` (a coarse guard: float32 ulp differences flip quantiser
  steps that cascade through deep networks). Every check is per seed: averaging cannot hide a wrong
  bundle. The graph's analog tensors must also be the bundle placement's;
* ``mvm_noise="native"`` (*statistical*): onnxruntime's ``RandomNormalLike`` vs torch's generator,
  compared by a paired t-test with false-failure rate ``alpha`` plus an equivalence test with margin
  ``margin`` (:func:`cimconvert.evaluation.stats.paired_log_ratio_test`).

Memory: the clean session is built from the file (onnxruntime reads the external data itself) and
dropped before the noise runner is built; the runner's graph is loaded without external data, reads
clean weights from the data file once per draw; sessions run without onnxruntime's memory arena (freed
buffers go back instead of staying reserved while torch runs), batches are 2 windows and perplexity is
scored one window at a time.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.bundle.reader import load_bundle, manifest_profile, placement_from_manifest, read_manifest
from cimconvert.checkpoint import sha256_file
from cimconvert.datasets import load_text, load_tokenizer, tokenize
from cimconvert.devices import model_device, place_model, resolve_device, resolve_dtype, to_model_device
from cimconvert.distributed import spread
from cimconvert.errors import BundleError, CimError
from cimconvert.evaluation.monte_carlo import run_fingerprint
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.evaluation.stats import paired_log_ratio_test
from cimconvert.onnx import analog_op
from cimconvert.placement import model_placement
from cimconvert.plausibility import fail_implausible
from cimconvert.profiles import ChipProfile, load_profile
from cimconvert.runtime import OrtCausalLM, OrtNoiseRunner, analog_tensors, load_model
from cimconvert.runtime.session import make_session
from cimconvert.simulator import analog_matmul
from cimconvert.simulator.rng import CounterClock, CounterNoise, node_key, stable_seed

LOGGER = logging.getLogger(__name__)

ONNX_MODEL = "onnx/model.onnx"
#: Clean ONNX vs torch logits (fp32).
ATOL = 1e-4
#: Counter mode: end-to-end noisy perplexity of every seed, onnxruntime vs torch (relative). A coarse guard:
#: float32 ulp differences flip DAC/ADC rounding steps and the flips cascade through deep networks, so
#: even with shared draws per-seed PPLs differ (measured up to 1.8 % on SmolLM2-135M over 1024 tokens);
#: the exact comparison is the per-node check (NODE_MISMATCH).
PPL_RTOL = 0.05
#: Native (statistical) mode: false-failure rate of the paired t-test / level of the equivalence test.
ALPHA = 0.01
#: Native (statistical) mode: equivalence margin on the per-seed PPL ratio (relative).
MARGIN = 0.01
#: Counter mode, each analog matmul alone on identical inputs: largest fraction of its outputs that may
#: differ between the runtimes (by an ADC step that float32 summation order flipped).
NODE_MISMATCH = 0.01
#: Input vectors per analog matmul in the node check.
NODE_ROWS = 16
#: Per-MVM noise modes (see the module docstring).
MVM_NOISE_MODES = ("counter", "native")


def check_onnx_files(out: Path, manifest: Any) -> Path:
    """The bundle's ONNX graph after checking it and its external data against the manifest."""
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
        ref = net(input_ids=to_model_device(batch, net), use_cache=False).logits.float().cpu().numpy()
    return float(np.abs(ort_logits - ref).max())


def _clean_check(
    net: torch.nn.Module, onnx_path: Path, tokens: torch.Tensor, seq_len: int, ppl: Callable[[Any], float],
    threads: int,
) -> dict[str, float]:
    """Clean logits max|Δ| and clean perplexities; the ideal session lives only inside this call."""
    session = make_session(onnx_path, threads, arena=False)
    max_diff = _clean_logits_diff(net, session, tokens, seq_len)
    ort_clean, ort_s = _timed(lambda: ppl(OrtCausalLM(session)))
    session = None  # the ideal session's weights and arena go before the noise runner is built
    torch_clean, torch_s = _timed(lambda: ppl(net))
    return {"max_diff": max_diff, "ort": ort_clean, "ort_s": ort_s, "torch": torch_clean, "torch_s": torch_s}


def node_check(handle: Any, runner: Any, seed: int, rows: int = NODE_ROWS) -> dict[str, Any]:
    """Every per-MVM node alone, onnxruntime vs torch, on the same seeded random input and draws.

    For each AnalogMatMul of the runtime graph: ``x ~ N(0, 1)`` of shape ``[rows, in_features]``
    (generator seeded from ``(seed, "validate:node-check")``), run through the node's onnxruntime body
    with the bound programmed weights and through ``simulator.analog_matmul`` with the torch handle's
    prepared weights, both with counter noise at the first forward's key. Outputs differing by more
    than 1e-4·max|y| (an ADC step flipped by float32 summation order) must be at most ``NODE_MISMATCH``
    of the elements; a wrong noise scale or a node without noise moves a large fraction.
    """
    generator = torch.Generator().manual_seed(stable_seed(seed, "validate:node-check"))
    clock = CounterClock(seed)
    worst, worst_node, untracked = 0.0, "", []
    for index, node in enumerate(runner.mvm_nodes):
        attrs = analog_op.node_attrs(node)
        tensor, expert = str(attrs["tensor"]), int(attrs["expert"])  # type: ignore[call-overload]
        prepared = handle.mvm_weights.get(tensor)
        if prepared is None:
            untracked.append(tensor)
            continue
        part = prepared.expert(expert) if expert >= 0 else prepared
        x = torch.randn(rows, int(attrs["in_features"]), generator=generator)  # type: ignore[call-overload]
        noise = CounterNoise(clock, node_key(tensor, expert))
        ref = analog_matmul(x.to(part.weight_t.device), part, noise).cpu().numpy()
        got = runner.node_output(index, x.numpy(), clock.key)
        tol = 1e-4 * float(np.abs(ref).max())
        fraction = float(np.mean(~(np.abs(got - ref) <= tol))) if got.shape == ref.shape else 1.0
        if fraction > worst or not worst_node:
            worst, worst_node = fraction, f"{tensor}[{expert}]" if expert >= 0 else tensor
    return {"nodes": len(runner.mvm_nodes), "rows": rows, "max_mismatch_fraction": worst,
            "worst_node": worst_node, "untracked": sorted(set(untracked))}  # fmt: skip


def _noisy_draws(
    net: torch.nn.Module, targets: Sequence[Any], chip: ChipProfile, seeds: Sequence[int],
    ppl: Callable[[Any], float], runner: Any, mvm_noise: str, agree: Callable[[], str],
    progress: bool = False,
) -> dict[str, Any]:
    """Per seed: torch and ORT PPL, ORT times, programmed weights bit-identical, node checks.

    The torch model is programmed first; onnxruntime's programmed weights are then compared with it
    tensor by tensor (nothing kept), each per-MVM node is checked alone (counter mode), and both
    runtimes score the same windows in the same order. Under a ``torchrun`` launch the seeds are shared
    out over the ranks (each has its own onnxruntime runner) and gathered in seed order; ``agree``: the
    digest the ranks must share (:func:`cimconvert.evaluation.monte_carlo.run_fingerprint`).
    """
    ort_model = OrtCausalLM(runner)
    check_nodes = mvm_noise == "counter" and bool(runner.mvm_nodes)

    def draw(seed: int) -> dict[str, Any]:
        with apply_chip_noise(net, targets, chip, seed, mvm_noise=mvm_noise) as handle:
            identical = runner.program_matches(seed, handle.programmed_weights(net))
            nodes = node_check(handle, runner, seed) if check_nodes else None
            value, seconds = _timed(lambda: ppl(ort_model))
            return {"identical": identical, "node": nodes, "ort": value, "ort_seconds": seconds,
                    "torch": ppl(net)}  # fmt: skip

    desc = f"validate: noise draws ({chip.name}, onnxruntime + torch)" if progress else None
    draws = spread(list(seeds), draw, model_device(net), agree, progress=desc)
    return {
        "torch": [d["torch"] for d in draws], "ort": [d["ort"] for d in draws],
        "ort_seconds": [d["ort_seconds"] for d in draws], "identical": all(d["identical"] for d in draws),
        "nodes": [d["node"] for d in draws if d["node"] is not None],
    }  # fmt: skip


def _node_summary(checks: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Worst node check over the seeds (None when not run: native mode or no per-MVM nodes)."""
    if not checks:
        return None
    worst = max(checks, key=lambda c: c["max_mismatch_fraction"])
    untracked = sorted({t for c in checks for t in c["untracked"]})
    passed = worst["max_mismatch_fraction"] <= NODE_MISMATCH and not untracked
    return {**worst, "untracked": untracked, "tolerance": NODE_MISMATCH, "passed": passed,
            "per_seed_max_mismatch_fraction": [c["max_mismatch_fraction"] for c in checks]}  # fmt: skip


def placement_targets(net: torch.nn.Module, manifest: Any) -> list[Any]:
    """The analog tensors of the bundle's own placement (its manifest's per-tensor units), for the torch side.

    Read back from the manifest, not from the graph, so that a graph missing an analog node cannot make
    torch skip that tensor's noise too.
    """
    return list(model_placement(net, placement_from_manifest(manifest), manifest_profile(manifest)).analog())


def per_mvm_random(chip: ChipProfile) -> bool:
    """Whether the profile draws random per-MVM noise (out_noise or w_noise) at all."""
    return chip.mvm.active and not chip.is_ideal and (chip.mvm.out_noise > 0 or chip.mvm.w_noise > 0)


def _rel_diffs(ort: Sequence[float], ref: Sequence[float]) -> list[float]:
    return [abs(a / b - 1.0) for a, b in zip(ort, ref, strict=True)]


def exact_test(ort: Sequence[float], ref: Sequence[float], rtol: float) -> dict[str, Any]:
    """Per-seed comparison for shared noise draws: every |PPL_ort/PPL_torch − 1| ≤ ``rtol``."""
    diffs = _rel_diffs(ort, ref)
    worst = max(diffs, default=0.0)
    return {
        "method": "per-seed: |PPL_onnxruntime/PPL_torch - 1| <= rtol for every seed (shared noise draws)",
        "n": len(diffs), "rtol": rtol, "per_seed_rel_diff": diffs, "max_rel_diff": worst,
        "verdict": "pass" if worst <= rtol else "fail",
    }  # fmt: skip


def _check_dtype(dtype: torch.dtype) -> None:
    """validate compares with the float32 ONNX graph: any other torch dtype is refused."""
    if dtype != torch.float32:
        name = str(dtype).removeprefix("torch.")
        raise CimError(f"--dtype {name}: validate compares the torch side with the float32 ONNX graph "
                       "exactly; only --dtype float32 is supported")  # fmt: skip


def _check_options(mvm_noise: str, alpha: float, margin: float) -> None:
    if mvm_noise not in MVM_NOISE_MODES:
        raise CimError(f"--mvm-noise must be one of {', '.join(MVM_NOISE_MODES)} (got '{mvm_noise}')")
    if not 0.0 < alpha < 0.5:
        raise CimError(f"--alpha must be in (0, 0.5) (got {alpha})")
    if margin <= 0.0:
        raise CimError(f"--margin must be > 0 (got {margin})")


@fail_implausible
def validate(
    out: str | Path,
    profile: str | ChipProfile | None = None,
    seeds: int = 5,
    seed: int = 1000,
    dataset: str = "heldout",
    max_tokens: int = 4096,
    seq_len: int = 256,
    batch_size: int = 2,
    threads: int | None = None,
    profile_mismatch_ok: bool = False,
    atol: float = ATOL,
    ppl_rtol: float = PPL_RTOL,
    progress: bool = False,
    mvm_noise: str = "counter",
    alpha: float = ALPHA,
    margin: float = MARGIN,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, Any]:
    """Validate bundle ``out``'s ONNX graph in onnxruntime against the torch simulator (see module doc).

    ``device``: where the torch side runs (onnxruntime runs on the CPU); ``dtype`` must be float32, the
    graph's (the comparisons are exact). Under a ``torchrun`` launch the seeds are shared out over the ranks.
    ``threads``: torch's and onnxruntime's CPU threads (None: torch's current setting for both).
    ``progress``: a status line per phase and progress over the noise draws on stderr.
    """
    _check_options(mvm_noise, alpha, margin)
    where = resolve_device(device)
    _check_dtype(resolve_dtype(dtype, where))
    folder = Path(out)
    manifest = read_manifest(folder)
    onnx_path = check_onnx_files(folder, manifest)
    chip = resolve_profile(manifest, profile, profile_mismatch_ok)
    text = load_text(dataset)
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    net = place_model(load_bundle(folder), where, None)
    tokens = tokenize(load_tokenizer(folder), text, max_tokens)
    graph = load_model(onnx_path, external_data=False)
    tensors = analog_tensors(graph)
    placed = placement_targets(net, manifest)
    placement_only = sorted({t.name for t in placed} - {t.name for t in tensors})
    graph_only = sorted({t.name for t in tensors} - {t.name for t in placed})
    graph_matches = not placement_only and not graph_only
    draws = list(range(seed, seed + seeds))

    def ppl(model: Any) -> float:
        return perplexity(model, tokens, seq_len=seq_len, batch_size=batch_size)

    if progress:
        LOGGER.info("validate: clean pass, onnxruntime and torch (%d tokens)", int(tokens.numel()))
    clean = _clean_check(net, onnx_path, tokens, seq_len, ppl, threads)
    runner = OrtNoiseRunner(graph, chip, tensors, threads=threads, noise_seed=seed, mvm_noise=mvm_noise,
                            external_dir=onnx_path.parent, copy=False, arena=False)  # fmt: skip
    del graph
    graph_sha256 = next(f.sha256 for f in manifest.files if f.name == ONNX_MODEL)
    agree = run_fingerprint(net, tokens, placed, chip, draws, mvm_noise, seq_len, batch_size, graph_sha256)
    noisy = _noisy_draws(net, placed, chip, draws, ppl, runner, mvm_noise, agree, progress)
    del runner
    torch_noisy, ort_noisy, identical = noisy["torch"], noisy["ort"], noisy["identical"]
    nodes = _node_summary(noisy["nodes"])
    exact = mvm_noise == "counter" or not per_mvm_random(chip)
    if exact:
        test = exact_test(ort_noisy, torch_noisy, ppl_rtol)
    else:
        test = paired_log_ratio_test(ort_noisy, torch_noisy, alpha, margin)
    ort_stats, torch_stats = _stats(ort_noisy), _stats(torch_noisy)
    rel = abs(ort_stats["mean"] / torch_stats["mean"] - 1.0) if draws else 0.0
    outputs_match = clean["max_diff"] <= atol
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
        "per_mvm": chip.mvm.active and not chip.is_ideal,
        "mvm_noise": mvm_noise,
        "comparison": "exact" if exact else "statistical",
        "onnxruntime": {
            "clean_ppl": clean["ort"], "noisy_ppl": ort_stats,
            "seconds": {"clean": clean["ort_s"], "per_draw": statistics.fmean(noisy["ort_seconds"] or [0.0])},
        },
        "torch": {
            "clean_ppl": clean["torch"], "noisy_ppl": torch_stats, "seconds": {"clean": clean["torch_s"]},
        },
        "summary": {
            "outputs_match": outputs_match,
            "clean_logits_max_abs_diff": clean["max_diff"],
            "atol": atol,
            "clean_ppl_rel_diff": abs(clean["ort"] / clean["torch"] - 1.0),
            "programmed_weights_bit_identical": identical,
            "graph_matches_placement": graph_matches,
            "analog_in_placement_not_graph": placement_only,
            "analog_in_graph_not_placement": graph_only,
            "noisy_ppl_rel_diff": rel,
            "noisy_ppl_max_rel_diff": max(test.get("per_seed_rel_diff") or _rel_diffs(ort_noisy, torch_noisy),
                                          default=0.0),
            "ppl_rtol": ppl_rtol,
            "node_check": nodes,
            "test": test,
            "passed": bool(outputs_match and identical and graph_matches and test["verdict"] == "pass"
                           and (nodes is None or nodes["passed"])),
        },
    }  # fmt: skip


def _verdict_lines(s: dict[str, Any]) -> list[str]:
    """The comparison part of the human report (exact or statistical)."""
    test = s["test"]
    if "rtol" in test:
        diffs = " ".join(f"{100 * d:.3f}%" for d in test["per_seed_rel_diff"])
        rtol = 100 * test["rtol"]
        lines = [f"  noisy PPL per seed, |ort/torch - 1|: {diffs} (tolerance {rtol:.2f}% each)"]
    else:
        p = "n/a" if test["p_value"] is None else f"{test['p_value']:.3g}"
        ci = "n/a"
        if test["ci_low"] is not None:
            ci = f"[{100 * test['ci_low']:+.2f}%, {100 * test['ci_high']:+.2f}%]"
        lines = [
            f"  paired t-test on ln(PPL ratio): p = {p} (alpha {test['alpha']}); "
            f"{100 * (1 - 2 * test['alpha']):.0f}% CI of the ratio {ci} "
            f"vs margin +-{100 * test['margin']:.1f}% -> {test['verdict']}"
        ]
    node = s.get("node_check")
    if node:
        lines.append(
            f"  each analog node alone ({node['nodes']} nodes): worst "
            f"{100 * node['max_mismatch_fraction']:.3f}% outputs differ ({node['worst_node']}; "
            f"tolerance {100 * node['tolerance']:.1f}%)"
        )
    if not s["graph_matches_placement"]:
        lines.append(
            "  graph analog tensors differ from the placement: "
            f"missing {s['analog_in_placement_not_graph']}, extra {s['analog_in_graph_not_placement']}"
        )
    return lines


def format_validate(res: dict[str, Any]) -> str:
    """Human-readable report of :func:`validate`."""
    ort_r, torch_r, s = res["onnxruntime"], res["torch"], res["summary"]
    n = len(res["seeds"])
    mode = "programmed weights + per-MVM DAC/ADC/noise in-graph" if res["per_mvm"] else "programmed weights"
    lines = [
        f"validate {res['bundle']}  profile {res['profile']}  dataset {res['dataset']} "
        f"({res['tokens']} tokens, seq_len {res['seq_len']}, {res['analog_tensors']} analog tensors; {mode}; "
        f"{res['mvm_noise']} per-MVM draws, {res['comparison']} comparison)",
        f"  {'':<12}{'clean PPL':>12}{'noisy PPL (' + str(n) + ' draws)':>30}",
        f"  {'onnxruntime':<12}{ort_r['clean_ppl']:>12.4f}"
        f"{ort_r['noisy_ppl']['mean']:>20.4f} +- {ort_r['noisy_ppl']['std']:.4f}",
        f"  {'torch':<12}{torch_r['clean_ppl']:>12.4f}"
        f"{torch_r['noisy_ppl']['mean']:>20.4f} +- {torch_r['noisy_ppl']['std']:.4f}",
        f"  outputs match: {'yes' if s['outputs_match'] else 'NO'} "
        f"(clean logits max|diff| {s['clean_logits_max_abs_diff']:.2e} <= {s['atol']:.0e})",
        f"  programmed weights bit-identical to torch: "
        f"{'yes' if s['programmed_weights_bit_identical'] else 'NO'}",
        *_verdict_lines(s),
        *(f"  problem: {problem}" for problem in s.get("problems", [])),
        f"  result: {'PASS' if s['passed'] else 'FAIL'}"
        + (" (inconclusive: more seeds needed)" if s["test"]["verdict"] == "inconclusive" else ""),
    ]
    return "\n".join(lines)
