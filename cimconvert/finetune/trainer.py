"""The fine-tuning loop shared by both methods, and the public :func:`finetune` entry point.

AdamW over all parameters, linear warm-up then cosine decay to 10 % of ``lr``, gradient clipping,
random windows of ``seq_len + 1`` tokens, optional distillation from the clean starting model (KL at
temperature T, scaled by T², as in IBM's analog-foundation-models recipe). Each step the method
(:class:`~cimconvert.finetune.ste.SteNoise` or :class:`~cimconvert.finetune.nat.NatNoise`) supplies
the effective weights and the model runs through ``torch.func.functional_call`` — the only difference
between the two methods is where the noise comes from and how it is differentiated.

Resumable: the state file (``finetune_state.pt`` in OUT) holds tensors and plain values only — model
and optimizer tensors, step, the data sampler's and torch's RNG states, the settings as JSON — written
with ``torch.save`` and read with ``torch.load(weights_only=True)`` (never an arbitrary unpickle). Noise
is seeded from (seed, step), so an interrupted-and-resumed run is bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cimconvert.bundle.reader import is_bundle, placement_from_manifest, read_manifest
from cimconvert.checkpoint import resolve_model
from cimconvert.datasets import token_ids
from cimconvert.devices import place_model, resolve_device, resolve_dtype, to_model_device
from cimconvert.distributed import require_single_process
from cimconvert.errors import CimError
from cimconvert.finetune.base import NoiseMethod, NoNoise, Target, analog_targets, generator
from cimconvert.finetune.nat import NAT_KINDS, NatNoise
from cimconvert.finetune.ste import SteNoise
from cimconvert.finetune.training_data import check_tokens, sample_batch, training_text
from cimconvert.gutenberg import GUTENBERG_TRAIN
from cimconvert.placement import Placement, model_placement, plan_model
from cimconvert.profiles import ChipProfile, load_profile
from cimconvert.progress import progress_bar

METHODS = ("ste", "nat", "none")
STATE_FILE = "finetune_state.pt"
INFO_FILE = "finetune_info.json"
STATE_VERSION = 1
#: Settings that must match for a resume to continue the same run.
RESUME_KEYS = ("method", "batch_size", "seq_len", "seed", "lr", "nat_noise", "nat_sigma", "mvm", "distill")


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run (all plain values; recorded in the state and the info file)."""

    method: str = "ste"
    steps: int = 100
    lr: float = 3e-4
    batch_size: int = 8
    seq_len: int = 128
    seed: int = 0
    grad_clip: float = 1.0
    weight_decay: float = 0.0
    warmup: int | None = None
    distill: bool = False
    temperature: float = 1.0
    nat_noise: str = "gaussian"
    nat_sigma: float | None = None
    mvm: bool = True
    save_every: int = 50

    def validate(self) -> None:
        """CimError (one line) for an unusable setting."""
        if self.method not in METHODS:
            raise CimError(
                f"unknown fine-tuning method '{self.method}' (expected one of: {', '.join(METHODS)})"
            )
        if self.nat_noise not in NAT_KINDS:
            raise CimError(f"unknown NAT noise model '{self.nat_noise}' (expected: {', '.join(NAT_KINDS)})")
        checks = [
            (self.steps >= 1, f"steps must be >= 1, got {self.steps}"),
            (math.isfinite(self.lr) and self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.seq_len >= 2, f"seq len must be >= 2, got {self.seq_len}"),
            (self.grad_clip >= 0, f"grad clip must be >= 0, got {self.grad_clip}"),
            (self.weight_decay >= 0, f"weight decay must be >= 0, got {self.weight_decay}"),
            (self.temperature > 0, f"distillation temperature must be > 0, got {self.temperature}"),
            (self.warmup is None or self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}"),
            (self.save_every >= 0, f"save every must be >= 0, got {self.save_every}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CimError(message)

    @property
    def warmup_steps(self) -> int:
        """Warm-up length: ``warmup`` or 10 % of the steps (at most 20)."""
        return self.warmup if self.warmup is not None else min(20, self.steps // 10)


def lr_at(step: int, cfg: FinetuneConfig) -> float:
    """Learning rate of ``step`` (0-based): linear warm-up, then cosine decay to 10 % of ``cfg.lr``."""
    warm = cfg.warmup_steps
    if step < warm:
        return cfg.lr * (step + 1) / warm
    progress = (step - warm) / max(cfg.steps - warm, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def build_method(
    model: nn.Module, targets: Sequence[Target], profile: ChipProfile, cfg: FinetuneConfig
) -> NoiseMethod:
    """The noise method of ``cfg.method`` on ``targets``."""
    if cfg.method == "ste":
        return SteNoise(model, targets, profile, cfg.seed, mvm=cfg.mvm)
    if cfg.method == "none":
        return NoNoise()
    return NatNoise(model, targets, profile, cfg.seed, kind=cfg.nat_noise, sigma=cfg.nat_sigma)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ student) per token at ``temperature``, times T² (logits ``[N, V]``)."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    return F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * (t * t)


@dataclass
class StepStats:
    """What one step reports."""

    step: int
    loss: float
    ce: float
    lr: float
    seconds: float


@dataclass
class Trainer:
    """One model, one method, one token stream; :meth:`train_step` / :meth:`run`, resumable state."""

    model: nn.Module
    profile: ChipProfile
    cfg: FinetuneConfig
    tokens: torch.Tensor
    targets: list[Target]
    teacher: nn.Module | None = None
    step: int = 0
    history: list[StepStats] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.method = build_method(self.model, self.targets, self.profile, self.cfg)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)
        self.data_gen = generator(self.cfg.seed)

    # ------------------------------------------------------------------ one step
    def _loss(self, batch: torch.Tensor, weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
        inputs, labels = batch[:, :-1], batch[:, 1:]
        logits = functional_call(
            self.model, weights, args=(), kwargs={"input_ids": inputs, "use_cache": False}
        )
        flat = logits.logits.reshape(-1, logits.logits.shape[-1])
        ce = F.cross_entropy(flat.float(), labels.reshape(-1))
        if self.teacher is None:
            return ce, ce.item()
        with torch.no_grad():
            teacher = self.teacher(input_ids=inputs, use_cache=False).logits
        return distill_loss(flat, teacher.reshape(flat.shape), self.cfg.temperature), ce.item()

    def train_step(self) -> StepStats:
        """Run step ``self.step`` (sample, perturb, forward, backward, clip, AdamW) and advance."""
        start = time.perf_counter()
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(self.tokens, self.cfg.batch_size, self.cfg.seq_len, self.data_gen)
        batch = to_model_device(batch, self.model)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        with self.method.perturbed(self.step) as weights:
            loss, ce = self._loss(batch, weights)
            if not math.isfinite(loss.item()):
                raise CimError(f"loss became {loss.item()} at step {self.step}; lower --lr")
            loss.backward()
        if self.cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        stats = StepStats(self.step, loss.item(), ce, lr, time.perf_counter() - start)
        self.history.append(stats)
        self.step += 1
        return stats

    def run(self, progress: bool = True, state_path: Path | None = None) -> list[StepStats]:
        """Train up to ``cfg.steps``; saves the state every ``cfg.save_every`` steps when given a path."""
        tokens_per_step = self.cfg.batch_size * self.cfg.seq_len
        bar = progress_bar(total=self.cfg.steps, initial=self.step, desc=f"finetune {self.cfg.method}",
                           unit="step", enabled=progress)
        done: list[StepStats] = []
        try:
            while self.step < self.cfg.steps:
                stats = self.train_step()
                done.append(stats)
                bar.set_postfix(loss=f"{stats.loss:.4f}", tok_s=f"{tokens_per_step / stats.seconds:.0f}")
                bar.update(1)
                if state_path is not None and self.cfg.save_every and self.step % self.cfg.save_every == 0:
                    self.save_state(state_path)
        except KeyboardInterrupt:
            if state_path is not None:  # keep every finished step: --resume continues from here
                self.save_state(state_path)
            raise
        finally:
            bar.close()
        self.model.eval()
        return done

    # ------------------------------------------------------------------ resumable state
    def settings_json(self) -> str:
        """The run's settings (and the profile hash) as JSON, stored in the state file."""
        return json.dumps({**asdict(self.cfg), "profile_hash": self.profile.content_hash()}, sort_keys=True)

    def save_state(self, path: Path) -> None:
        """Write the resumable state atomically (tensors and plain values only)."""
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "settings": self.settings_json(),
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.data_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "losses": torch.tensor([s.loss for s in self.history], dtype=torch.float64),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_state(self, path: Path) -> None:
        """Restore a state written by :meth:`save_state` (weights_only load; settings must match)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise CimError(f"no fine-tuning state to resume from: {path}") from None
        except Exception as exc:
            raise CimError(f"cannot read fine-tuning state {path} ({exc.__class__.__name__})") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CimError(f"{path} is not a cimconvert fine-tuning state (version {STATE_VERSION})")
        self._check_settings(json.loads(state["settings"]), path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.data_gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        self.history = [
            StepStats(i, float(v), float("nan"), float("nan"), float("nan"))
            for i, v in enumerate(state["losses"].tolist())
        ]

    def _check_settings(self, saved: dict[str, Any], path: Path) -> None:
        current = json.loads(self.settings_json())
        for key in (*RESUME_KEYS, "profile_hash"):
            if saved.get(key) != current.get(key):
                raise CimError(
                    f"cannot resume from {path}: {key} was {saved.get(key)!r}, now {current.get(key)!r}"
                )


# ---------------------------------------------------------------------------------------- API
def _load(model: Any, tokenizer: Any) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer, display name) from a folder / hub id or an in-memory model."""
    if isinstance(model, nn.Module):
        return model, tokenizer, type(model).__name__

    source = resolve_model(str(model))
    loaded = source.load_model()
    if tokenizer is None and (source.dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(source.dir))
    return loaded, tokenizer, str(model)


def _placement(
    model: Any, net: nn.Module, chip: ChipProfile, analog: Sequence[str], digital: Sequence[str]
) -> Placement:
    """The placement to train for: a bundle's own (read back from its manifest), else planned here, once,
    with the ``--analog``/``--digital`` overrides."""
    if isinstance(model, nn.Module) or not is_bundle(model):
        return plan_model(net, chip, analog=analog, digital=digital)
    if analog or digital:
        raise CimError("a bundle's placement is fixed by its manifest (--analog/--digital: checkpoints only)")
    return model_placement(net, placement_from_manifest(read_manifest(Path(model))), chip)


def _tokens(
    data: Any, tokenizer: Any, cfg: FinetuneConfig, vocab: int | None, max_tokens: int | None
) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return check_tokens(data, cfg.seq_len, vocab)
    if tokenizer is None:
        raise CimError("text training data needs a tokenizer (the model folder has none); pass token ids")
    return check_tokens(token_ids(tokenizer, training_text(str(data)), max_tokens), cfg.seq_len, vocab)


def _prepare_out(out: Path | None, resume: bool | str | Path, force: bool) -> tuple[Path | None, Path | None]:
    """(output folder, state file to resume from or None)."""
    if resume and not isinstance(resume, bool):
        path = Path(resume)
        return out, path / STATE_FILE if path.is_dir() else path
    if resume:
        if out is None:
            raise CimError("--resume needs the output folder (-o) of the run to continue")
        return out, out / STATE_FILE
    if out is not None and out.exists() and any(out.iterdir()) and not force:
        raise CimError(
            f"output folder {out} is not empty (use --resume to continue a run, --force to overwrite)"
        )
    return out, None


def _write_model(model: nn.Module, tokenizer: Any, out: Path, info: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    (out / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n", encoding="utf-8")


def finetune(
    model: str | Path | nn.Module,
    profile: str | ChipProfile,
    method: str = "ste",
    out: str | Path | None = None,
    data: str | torch.Tensor = GUTENBERG_TRAIN,
    steps: int = 100,
    lr: float = 3e-4,
    batch_size: int = 8,
    seq_len: int = 128,
    seed: int = 0,
    grad_clip: float = 1.0,
    distill: bool = False,
    temperature: float = 1.0,
    resume: bool | str | Path = False,
    tokenizer: Any = None,
    analog: Sequence[str] = (),
    digital: Sequence[str] = (),
    nat_noise: str = "gaussian",
    nat_sigma: float | None = None,
    mvm: bool = True,
    warmup: int | None = None,
    weight_decay: float = 0.0,
    save_every: int = 50,
    max_tokens: int | None = None,
    threads: int | None = None,
    force: bool = False,
    progress: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, Any]:
    """Noise-aware fine-tuning of a causal LM for ``profile``; writes a HF checkpoint to ``out``.

    ``method``: ``ste`` (extended straight-through: full chip simulator forward, identity backward),
    ``nat`` (differentiable noise in autograd; ``nat_noise`` ``gaussian`` with σ matched to the profile
    or ``nat_sigma``, or ``chip``) or ``none`` (clean fine-tuning, the control). ``model``: HF folder /
    cached hub id, a bundle (trained for the placement its manifest records) or an in-memory model
    (then ``data`` must be token ids unless a ``tokenizer`` is given; the model is trained in place).
    ``data``: ``gutenberg-train`` (the demo models' training split), a dataset name, a text file or a
    1-D LongTensor. ``resume``: True continues the run in ``out`` (or a state file / folder path).
    ``device`` / ``dtype``: where and in what the model trains (``cpu``/``cuda``/``cuda:N``/``auto``;
    ``float32``/``bfloat16``/``float16``; None: as loaded, float32 on the CPU for a folder); the written
    checkpoint keeps that dtype.
    Returns a JSON-serialisable summary (losses, seconds per step, tokens/s, method settings).
    """
    require_single_process("finetune")
    where = resolve_device(device) if device is not None else None  # None: where the model is
    torch_dtype = resolve_dtype(dtype, where or torch.device("cpu")) if dtype is not None else None
    cfg = FinetuneConfig(
        method=method,
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        seq_len=seq_len,
        seed=seed,
        grad_clip=grad_clip,
        weight_decay=weight_decay,
        warmup=warmup,
        distill=distill,
        temperature=temperature,
        nat_noise=nat_noise,
        nat_sigma=nat_sigma,
        mvm=mvm,
        save_every=save_every,
    )
    cfg.validate()
    if threads:
        torch.set_num_threads(threads)
    out_dir, resume_from = _prepare_out(Path(out) if out is not None else None, resume, force)
    chip = load_profile(profile)
    net, tok, name = _load(model, tokenizer)
    place_model(net, where, torch_dtype)
    vocab = getattr(net.config, "vocab_size", None)
    tokens = _tokens(data, tok, cfg, vocab, max_tokens)
    teacher = copy.deepcopy(net).eval().requires_grad_(False) if distill else None
    targets = analog_targets(net, _placement(model, net, chip, analog, digital))
    trainer = Trainer(net, chip, cfg, tokens, targets, teacher)
    if resume_from is not None:
        trainer.load_state(resume_from)
    start_step = trainer.step
    began = time.perf_counter()
    done = trainer.run(progress=progress, state_path=out_dir / STATE_FILE if out_dir else None)
    seconds = time.perf_counter() - began
    result = _summary(
        trainer,
        name,
        chip,
        start_step,
        done,
        seconds,
        int(tokens.numel()),
        out_dir,
        data if isinstance(data, str) else "tokens",
    )
    if out_dir is not None:
        trainer.save_state(out_dir / STATE_FILE)
        _write_model(net, tok, out_dir, result)
    return result


def _summary(
    trainer: Trainer,
    name: str,
    chip: ChipProfile,
    start_step: int,
    done: list[StepStats],
    seconds: float,
    n_tokens: int,
    out: Path | None,
    data: str,
) -> dict[str, Any]:
    cfg = trainer.cfg
    tokens_per_step = cfg.batch_size * cfg.seq_len
    losses = [s.loss for s in trainer.history]
    step_seconds = [s.seconds for s in done]
    per_step = sum(step_seconds) / len(step_seconds) if step_seconds else float("nan")
    return {
        "model": name,
        "out": str(out) if out is not None else None,
        "profile": chip.name,
        "profile_hash": chip.content_hash(),
        "method": trainer.method.describe(),
        "config": asdict(cfg),
        "data": data,
        "train_tokens": n_tokens,
        "start_step": start_step,
        "steps": trainer.step,
        "tokens_per_step": tokens_per_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "losses": losses,
        "ce_last": done[-1].ce if done else None,
        "seconds": seconds,
        "seconds_per_step": per_step,
        "tokens_per_second": tokens_per_step / per_step if step_seconds else None,
        "analog_tensors": len(trainer.targets),
    }
