"""Noise-aware fine-tuning: extended STE and the NAT baseline on tiny OLMoE (fused experts) and Mamba."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import build_tiny

from cimconvert import api
from cimconvert.cli import main
from cimconvert.errors import CimError
from cimconvert.finetune import (
    AnalogMatmulSTE,
    FinetuneConfig,
    NatNoise,
    SteNoise,
    Trainer,
    analog_targets,
    finetune,
)
from cimconvert.finetune.nat import row_absmax
from cimconvert.finetune.trainer import STATE_FILE
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile
from cimconvert.simulator import prepare_mvm

CHIP = load_profile("chipA")
#: Weight-level only (no per-MVM effects): the STE forward is exactly x·W̃ᵀ.
WEIGHT_ONLY = load_profile("gaussian:sigma=0.05")
#: A learnable token stream: a repeating pattern over the tiny vocabulary.
TOKENS = torch.arange(0, 128).repeat(40)
FAST = {"batch_size": 4, "seq_len": 16, "lr": 1e-2, "warmup": 0}


def _trainer(model_type: str, method: str, profile=CHIP, **kw) -> Trainer:
    model = build_tiny(model_type)
    cfg = FinetuneConfig(method=method, steps=kw.pop("steps", 8), **{**FAST, **kw})
    return Trainer(model, profile, cfg, TOKENS, analog_targets(model, plan_model(model, profile)))


@pytest.mark.parametrize("model_type", ["olmoe", "mamba"])
@pytest.mark.parametrize("method", ["ste", "nat"])
def test_loss_decreases(model_type: str, method: str) -> None:
    trainer = _trainer(model_type, method)
    losses = [s.loss for s in trainer.run(progress=False)]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1


@pytest.mark.parametrize(("model_type", "n_experts"), [("olmoe", 4), ("qwen2_moe", 2), ("gpt2", 0)])
def test_ste_routes_every_analog_matmul_and_cleans_up(model_type: str, n_experts: int) -> None:
    trainer = _trainer(model_type, "ste", steps=2)
    config = trainer.model.config
    before = getattr(config, "_experts_implementation_internal", None)
    losses = [s.loss for s in trainer.run(progress=False)]
    assert len(losses) == 2 and all(math.isfinite(loss) and loss > 0 for loss in losses)  # cross-entropy
    method = trainer.method
    assert isinstance(method, SteNoise)
    experts = [t.name for t in trainer.targets if t.name.endswith(("gate_up_proj", "down_proj"))]
    assert len(experts) == n_experts  # fused 3-D expert tensors are analog (GPT-2: Conv1D in_out)
    assert set(method.calls) == {t.name for t in trainer.targets}  # every analog matmul simulated
    assert getattr(config, "_experts_implementation_internal", None) == before
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in trainer.model.modules())


def test_ste_mamba_dt_proj_weight_level_and_grads_reach_weights() -> None:
    trainer = _trainer("mamba", "ste", steps=1)
    method = trainer.method
    assert isinstance(method, SteNoise)
    dt = [n for n, route in method.routes.items() if route == "weight"]
    assert dt and all(".dt_proj." in n for n in dt)
    with method.perturbed(0) as weights:
        loss, _ = trainer._loss(TOKENS[:17].reshape(1, 17), weights)
        loss.backward()
    for name, param in method.params.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert set(method.calls) == {n for n, route in method.routes.items() if route != "weight"}


def test_ste_gradient_equals_clean_gradient_at_programmed_weights() -> None:
    trainer = _trainer("olmoe", "ste", profile=WEIGHT_ONLY)
    model, method = trainer.model, trainer.method
    assert isinstance(method, SteNoise) and not method.mvm
    batch = TOKENS[:34].reshape(2, 17)
    with method.perturbed(3) as weights:
        loss, _ = trainer._loss(batch, weights)
        loss.backward()
    ste_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    # the clean forward evaluated at W̃ = H(W), with W̃ as independent leaves
    leaves = {n: h.clone().requires_grad_(True) for n, h in method.programmed(3).items()}
    loss2, _ = Trainer._loss(trainer, batch, leaves)  # same loss code, clean forward at W̃
    loss2.backward()
    assert torch.allclose(loss, loss2)
    for name, leaf in leaves.items():
        assert not torch.equal(leaf.detach(), dict(model.named_parameters())[name].detach())
        torch.testing.assert_close(ste_grads[name], leaf.grad, rtol=1e-5, atol=1e-7)


def test_analog_matmul_ste_backward_is_linear_at_programmed_weights() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 40)
    mw = prepare_mvm(w, CHIP, "out_in")
    x = torch.randn(3, 5, 40, requires_grad=True)
    wt = w.clone().requires_grad_(True)
    y = AnalogMatmulSTE.apply(x, wt, mw, torch.Generator().manual_seed(1))
    assert not torch.allclose(y, x @ w.t())  # forward is the analog simulation (DAC/ADC, noise)
    g = torch.randn_like(y)
    y.backward(g)
    x2, w2 = x.detach().clone().requires_grad_(True), w.clone().requires_grad_(True)
    (torch.nn.functional.linear(x2, w2) * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(wt.grad, w2.grad)


def test_noise_redrawn_each_step_and_seeded() -> None:
    model = build_tiny("olmoe")
    targets = analog_targets(model, plan_model(model, CHIP))
    a, b, c = (SteNoise(model, targets, CHIP, seed) for seed in (0, 0, 1))
    name = targets[0].name
    step0, step1 = a.programmed(0)[name], a.programmed(1)[name]
    assert not torch.equal(step0, step1)
    assert torch.equal(step0, b.programmed(0)[name])
    assert not torch.equal(step0, c.programmed(0)[name])
    nat_a, nat_b = (NatNoise(model, targets, CHIP, 0) for _ in range(2))
    with nat_a.perturbed(0) as w0, nat_a.perturbed(1) as w1, nat_b.perturbed(0) as v0:
        assert not torch.equal(w0[name], w1[name])
        assert torch.equal(w0[name], v0[name])


def test_nat_gradient_includes_noise_path() -> None:
    model = build_tiny("olmoe")
    targets = analog_targets(model, plan_model(model, CHIP))
    nat = NatNoise(model, targets, CHIP, 0)
    assert 0.005 < nat.sigma < 0.2  # matched to chipA's effective relative weight noise
    name = "model.layers.0.self_attn.q_proj.weight"
    w = nat.params[name]
    coeff = torch.randn(w.shape)
    with nat.perturbed(0) as weights:
        noisy = weights[name]
        (noisy * coeff).sum().backward()
    eps = (noisy.detach() - w.detach()) / (nat.sigma * row_absmax(w.detach()))
    # d/dW of Σ C·(W + σ·max|W_row|·ε) = C + σ·(Σ_j C_ij ε_ij)·sign(W)·onehot(argmax_row)
    row_term = nat.sigma * (coeff * eps).sum(-1, keepdim=True)
    onehot = torch.zeros_like(w).scatter_(-1, w.detach().abs().argmax(-1, keepdim=True), 1.0)
    expected = coeff + row_term * onehot * w.detach().sign()
    assert not torch.allclose(w.grad, coeff)
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-5)
    chip = NatNoise(model, targets, CHIP, 0, kind="chip")
    w.grad = None
    with chip.perturbed(0) as weights:
        weights[name].sum().backward()
    assert w.grad is not None and not torch.allclose(w.grad, torch.ones_like(w))


def test_resume_continues_identically(tmp_path, monkeypatch) -> None:
    kw = {"data": TOKENS, "steps": 5, "progress": False, "save_every": 2, **FAST}
    full = finetune(build_tiny("olmoe"), CHIP, out=tmp_path / "full", **kw)
    original = Trainer.train_step

    def interrupted(self: Trainer):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune(build_tiny("olmoe"), CHIP, out=tmp_path / "part", **kw)
    monkeypatch.setattr(Trainer, "train_step", original)
    resumed_model = build_tiny("olmoe")
    resumed = finetune(resumed_model, CHIP, out=tmp_path / "part", resume=True, **kw)
    assert resumed["start_step"] == 3 and resumed["steps"] == 5
    assert resumed["losses"] == full["losses"]
    reference = torch.load(tmp_path / "full" / STATE_FILE, weights_only=True)["model"]
    for name, tensor in resumed_model.state_dict().items():
        assert torch.equal(tensor, reference[name]), name
    with pytest.raises(CimError, match=r"cannot resume .* seed"):
        finetune(build_tiny("olmoe"), CHIP, out=tmp_path / "part", resume=True, **{**kw, "seed": 1})


def test_distillation_runs(tmp_path) -> None:
    res = finetune(build_tiny("olmoe"), CHIP, data=TOKENS, steps=2, distill=True, temperature=2.0,
                   progress=False, **FAST)
    assert res["config"]["distill"] and res["loss_first"] >= 0  # KL to the clean model
    assert res["loss_first"] < res["ce_last"]


@pytest.mark.slow
def test_cli_finetune_writes_a_checkpoint_the_converter_accepts(tmp_path, repo_root, capsys) -> None:
    out = tmp_path / "ft"
    main(["finetune", str(repo_root / "examples" / "models" / "tiny-olmoe"), "--profile", "chipA",
          "--method", "ste", "-o", str(out), "--data", "calib", "--max-tokens", "4000", "--steps", "2",
          "--batch-size", "2", "--seq-len", "16", "--json"])
    res = json.loads(capsys.readouterr().out)
    assert res["steps"] == 2 and res["method"]["method"] == "ste"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    summary = api.convert(str(out), "chipA", out=tmp_path / "bundle", method="none", progress=False)
    assert summary["totals"]["analog_tensors"] > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"method": "sgd"}, "unknown fine-tuning method"),
        ({"steps": 0}, "steps must be >= 1"),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"nat_noise": "uniform"}, "unknown NAT noise model"),
        ({"data": TOKENS[:10]}, "need at least seq_len"),
        ({"data": TOKENS.float()}, "1-D LongTensor"),
        ({"data": TOKENS + 1000}, "outside the model's vocabulary"),
        ({"data": "calib"}, "needs a tokenizer"),
        ({"method": "nat", "nat_sigma": -0.1}, "sigma must be"),
        ({"resume": True}, "--resume needs the output folder"),
    ],
)
def test_bad_input(kwargs: dict, message: str) -> None:
    args = {"data": TOKENS, "steps": 1, "progress": False, **FAST, **kwargs}
    with pytest.raises(CimError, match=message):
        finetune(build_tiny("olmoe"), CHIP, **args)


def test_bad_output_folder_and_state(tmp_path, capsys) -> None:
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(CimError, match="not empty"):
        finetune(build_tiny("olmoe"), CHIP, out=tmp_path / "busy", data=TOKENS, progress=False, **FAST)
    with pytest.raises(CimError, match="no fine-tuning state"):
        finetune(build_tiny("olmoe"), CHIP, out=tmp_path / "busy", resume=True, data=TOKENS, progress=False,
                 **FAST)
    with pytest.raises(SystemExit) as exc:
        main(["finetune", str(tmp_path / "missing"), "--profile", "chipA", "-o", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err
