"""Monte-Carlo evaluation: clean perplexity and perplexity under independent chip-noise draws."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.devices import model_device
from cimconvert.distributed import fingerprint, model_fingerprint, spread, tensor_fingerprint
from cimconvert.errors import CimError
from cimconvert.evaluation.perplexity import perplexity
from cimconvert.profiles import ChipProfile
from cimconvert.progress import progress_bar
from cimconvert.transforms.romer.hook import calibrated_routing_layers, routing_calibration_off


@dataclass
class NoisyEvalResult:
    """Clean and noisy perplexities; ``per_seed`` lists the draws in seed order.

    ``clean_ppl`` is the model without chip noise as a clean router routes it: a ROMER bundle's router
    calibration (fitted for noisy logits) is off for it. ``noise_free_ppl`` is the model as deployed without
    chip noise (calibration on); the two differ only when ``calibrated_routing_layers`` > 0.
    """

    profile: str
    profile_hash: str
    seeds: list[int]
    clean_ppl: float
    per_seed: list[float] = field(default_factory=list)
    analog_tensors: int = 0
    noise_free_ppl: float | None = None
    calibrated_routing_layers: int = 0

    @property
    def noisy_mean(self) -> float:
        """Mean perplexity over the noise draws."""
        return statistics.fmean(self.per_seed) if self.per_seed else float("nan")

    @property
    def noisy_std(self) -> float:
        """Sample standard deviation over the noise draws (0 for a single draw)."""
        return statistics.stdev(self.per_seed) if len(self.per_seed) > 1 else 0.0

    def check_finite(self) -> NoisyEvalResult:
        """Return self, or raise CimError when the clean or a noisy perplexity is NaN or infinite."""
        if not math.isfinite(self.clean_ppl):
            raise CimError(
                f"clean perplexity is {self.clean_ppl}: the model's logits are not finite "
                "(overflow in its weights or activations)"
            )
        if self.noise_free_ppl is not None and not math.isfinite(self.noise_free_ppl):
            raise CimError(f"noise-free perplexity (calibrated routing) is {self.noise_free_ppl}: the logits "
                           "are not finite")  # fmt: skip
        for seed, value in zip(self.seeds, self.per_seed, strict=False):
            if not math.isfinite(value):
                raise CimError(
                    f"noisy perplexity under profile '{self.profile}' is {value} for seed {seed}: the "
                    "simulated analog outputs are not finite (check the profile's noise and mapping values)"
                )
        return self

    def to_dict(self) -> dict:
        """Stable JSON keys (documented in docs/JSON.md)."""
        out = asdict(self)
        out["noise_free_ppl"] = self.clean_ppl if self.noise_free_ppl is None else self.noise_free_ppl
        out["noisy_ppl_mean"] = self.noisy_mean
        out["noisy_ppl_std"] = self.noisy_std
        out["degradation_pct"] = 100.0 * (self.noisy_mean / self.clean_ppl - 1.0)
        return out


def noisy_perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    targets: Sequence,
    profile: ChipProfile,
    seed: int,
    ppl_fn: Callable[[torch.nn.Module, torch.Tensor], float],
) -> float:
    """Perplexity under one seed's programmed chip; the clean weights are restored afterwards."""
    with apply_chip_noise(model, targets, profile, seed):
        return ppl_fn(model, tokens)


def noisy_perplexities(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    targets: Sequence,
    profile: ChipProfile,
    seeds: Sequence[int],
    ppl_fn: Callable[[torch.nn.Module, torch.Tensor], float] | None = None,
    progress: bool = False,
) -> list[float]:
    """Perplexity under each seed's programmed chip; the clean weights are restored after each draw."""
    ppl_fn = ppl_fn or (lambda m, t: perplexity(m, t))
    results = []
    draws = progress_bar(list(seeds), desc=f"noise draws ({profile.name})", enabled=progress, unit="draw")
    for seed in draws:
        results.append(noisy_perplexity(model, tokens, targets, profile, seed, ppl_fn))
    return results


def run_fingerprint(
    model: torch.nn.Module, tokens: torch.Tensor, targets: Sequence, profile: ChipProfile, *options: object
) -> Callable[[], str]:
    """What the ranks of a launch must agree on before a Monte-Carlo run: model, tokens, profile, analog
    targets and ``options`` (seeds, window settings, ...); computed only under a launch."""

    def digest() -> str:
        names = sorted(str(t.name) for t in targets)
        return fingerprint(model_fingerprint(model), tensor_fingerprint(tokens), profile.content_hash(),
                           names, options)  # fmt: skip

    return digest


def evaluate_model(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    targets: Sequence,
    profile: ChipProfile,
    seeds: Sequence[int],
    seq_len: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> NoisyEvalResult:
    """Clean perplexity plus one perplexity per noise seed, on the same tokens and windows (and, for a model
    with calibrated routing, its noise-free perplexity as deployed: see :class:`NoisyEvalResult`).

    Under a ``torchrun`` launch these passes are shared out over the ranks
    (:func:`cimconvert.distributed.spread`); every rank returns the full, identical result.
    """

    def ppl_fn(m: torch.nn.Module, t: torch.Tensor) -> float:
        return perplexity(m, t, seq_len=seq_len, stride=stride, batch_size=batch_size)

    calibrated = calibrated_routing_layers(model)

    def run(task: int | str) -> float:
        if task == "clean":  # as a clean router routes it
            with routing_calibration_off(model):
                return ppl_fn(model, tokens)
        if task == "noise_free":  # as deployed, without chip noise
            return ppl_fn(model, tokens)
        return noisy_perplexity(model, tokens, targets, profile, int(task), ppl_fn)

    passes: list[int | str] = ["clean", *(["noise_free"] if calibrated else []), *seeds]
    agree = run_fingerprint(model, tokens, targets, profile, list(seeds), seq_len, stride, batch_size)
    desc = f"clean + noise draws ({profile.name})" if progress else None
    clean, *rest = spread(passes, run, model_device(model), agree, progress=desc)
    noise_free, noisy = (rest[0], rest[1:]) if calibrated else (clean, rest)
    return NoisyEvalResult(
        profile=profile.name,
        profile_hash=profile.content_hash(),
        seeds=list(seeds),
        clean_ppl=clean,
        per_seed=noisy,
        analog_tensors=len(targets),
        noise_free_ppl=noise_free,
        calibrated_routing_layers=calibrated,
    )
