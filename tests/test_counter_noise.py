"""Counter-based per-MVM noise (torch and ONNX give the same draws) and the paired statistical test."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper

from cimconvert.evaluation.stats import paired_log_ratio_test, t_quantile
from cimconvert.onnx import analog_op
from cimconvert.simulator.rng import CounterClock, counter_normal, key_words, node_key, run_key, xor_key

Key = tuple[int, int, int]


def _onnx_counter_normal(shape: tuple[int, ...], run: Key, node: Key) -> np.ndarray:
    """The ONNX counter body alone (``K`` input, ``noise_key`` attribute) on a zero tensor of ``shape``."""
    function = helper.make_function(
        analog_op.DOMAIN, "CounterNormal", ["Y", "K"], ["Z"],
        analog_op._counter_normal_nodes("Y", "Z"), [helper.make_opsetid("", 18)], ["noise_key"],
    )  # fmt: skip
    node_proto = helper.make_node(
        "CounterNormal", ["y", "k"], ["z"], domain=analog_op.DOMAIN, noise_key=list(node)
    )
    graph = helper.make_graph(
        [node_proto], "g",
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None),
         helper.make_tensor_value_info("k", onnx.TensorProto.UINT32, [3])],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(analog_op.DOMAIN, 1)]
    model = helper.make_model(graph, opset_imports=opsets, functions=[function])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"y": np.zeros(shape, np.float32), "k": np.array(run, np.uint32)}
    return session.run(["z"], feeds)[0]


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (2, 64, 96)])
def test_onnx_body_draws_what_torch_draws(shape: tuple[int, ...]) -> None:
    run, node = run_key(1000, 3), node_key("model.layers.0.mlp.down_proj.weight", -1)
    ref = counter_normal(shape, xor_key(run, node)).numpy()
    got = _onnx_counter_normal(shape, run, node)
    assert got.shape == ref.shape
    # integer hash and exact casts are identical; float32 log/cos/sin differ at most in the last ulps
    np.testing.assert_allclose(got, ref, rtol=0, atol=4e-6)


def test_counter_normals_are_standard_normal_and_keyed() -> None:
    z = counter_normal((400_000,), key_words("test"))
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    assert float(z.std()) == pytest.approx(1.0, abs=0.01)
    assert float((z.abs() > 3).float().mean()) == pytest.approx(0.0027, rel=0.15)
    other = counter_normal((400_000,), key_words("other"))
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.01
    assert torch.equal(counter_normal((10,), key_words("test")), counter_normal((10,), key_words("test")))


def test_clock_first_forward_is_step_zero() -> None:
    clock = CounterClock(7)
    assert clock.key == run_key(7, 0)
    assert clock.tick() == run_key(7, 0)
    assert clock.tick() == run_key(7, 1) and clock.step == 1


def test_t_quantiles_match_tables() -> None:
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.995, 1) == pytest.approx(63.657, abs=1e-3)
    assert t_quantile(0.99, 10) == pytest.approx(2.7638, abs=1e-4)


def test_paired_test_verdicts() -> None:
    base = [100.0, 110.0, 95.0, 105.0, 102.0]
    assert paired_log_ratio_test(base, base)["verdict"] == "pass"
    assert paired_log_ratio_test(base[:1], base[:1])["verdict"] == "inconclusive"
    shifted = [v * f for v, f in zip(base, [1.05, 1.052, 1.049, 1.051, 1.05], strict=True)]
    assert paired_log_ratio_test(shifted, base)["verdict"] == "fail"
    noisy = [v * f for v, f in zip(base, [1.03, 0.97, 1.02, 0.98, 1.01], strict=True)]
    assert paired_log_ratio_test(noisy, base)["verdict"] == "inconclusive"


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 5])
def test_paired_test_false_failure_rate_is_alpha(n: int) -> None:
    """Under equal runtimes (log ratios ~ N(0, s²)) the test fails a fraction ≈ alpha of the time."""
    rng = np.random.default_rng(12345)
    alpha, trials = 0.05, 4000
    fails = 0
    for _ in range(trials):
        ratios = np.exp(rng.normal(0.0, 0.03, n))
        fails += paired_log_ratio_test(list(100 * ratios), [100.0] * n, alpha=alpha)["verdict"] == "fail"
    assert 0.6 * alpha < fails / trials < 1.4 * alpha
