#!/usr/bin/env python
"""Noise-aware fine-tuning of the real model, measured: SmolLM2-135M under chipA after N training steps.

For each method (``ste``: extended straight-through, ``nat``: differentiable Gaussian weight noise with σ
matched to the profile, ``none``: clean fine-tuning on the same data, the control that separates domain
adaptation from noise robustness) and training seed, ONE run of the trainer (cosine schedule over the
largest N of the ladder) is evaluated at every N of the ladder on the way: the checkpoint at step N is
measured in memory, then training continues. N = 0 is the pretrained model. Training data: the
``finetune`` default, ``gutenberg-train`` (never the held-out or WikiText text).

Each checkpoint is measured twice, on the held-out text and on WikiText-2 test (``--max-tokens`` each,
windows of 256, clean PPL and noisy PPL under ``--seeds`` unseen chipA draws from seed 5000):

* ``plain``: the checkpoint with the default chipA placement, no other method;
* ``recipe``: a copy of it after ``outlier_channels (outlier_percent 3) → output_correction`` applied in
  memory (``apply_recipe`` of ``benchmarks/robust.py``), to see whether fine-tuning and the recipe add up.

Paper metric (noisy₀ − noisy)/noisy₀ and gap closed (noisy₀ − noisy)/(noisy₀ − clean₀) are taken against
the pretrained model's plain row (noisy₀, clean₀). Rows are saved as they finish
(``benchmarks/results/robust_finetune.{json,md}`` and ``robust_finetune.png``); the trainer state of each
(method, seed) is kept at every ladder point in ``--state-dir`` (git-ignored), so a rerun skips finished
rows and resumes a run from its last saved point instead of retraining from zero (the final state is
kept too, so rows added later, e.g. ``--recipe-seeds``, need no retraining).

    CIMCONVERT_SHARED_DATA=... .venv/bin/python benchmarks/robust_finetune.py --threads 2
    .venv/bin/python benchmarks/robust_finetune.py --render        # tables and plot from the JSON only
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from real_models import fmt
from robust import FIRST_SEED, REPO, RESULTS, add_metrics, apply_recipe, evaluate, step
from torch import nn

from cimconvert.arch import load_pretrained
from cimconvert.datasets import load_text, token_ids, tokenize
from cimconvert.finetune import FinetuneConfig, Trainer, analog_targets
from cimconvert.finetune.training_data import training_text
from cimconvert.gutenberg import GUTENBERG_TRAIN
from cimconvert.placement import plan_model
from cimconvert.profiles import load_profile

DEFAULT_MODEL = REPO / "models" / "smollm2-135m-instruct"
DEFAULT_STATE_DIR = REPO / "out" / "robust_finetune_state"
NAME = "robust_finetune"
RECIPE = [step("outlier_channels", outlier_percent=3), step("output_correction")]
PRETRAINED = "pretrained"
VARIANTS = ("plain", "recipe")


# ------------------------------------------------------------------------------------------ settings
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line settings (all recorded in the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--profile", default="chipA")
    parser.add_argument(
        "--methods", nargs="*", default=["none", "ste", "nat"], choices=["ste", "nat", "none"]
    )
    parser.add_argument("--ste-seeds", nargs="*", type=int, default=[0, 1], help="training seeds of ste")
    parser.add_argument("--nat-seeds", nargs="*", type=int, default=[0, 1], help="training seeds of nat")
    parser.add_argument("--control-seeds", nargs="*", type=int, default=[0], help="seeds of none (control)")
    parser.add_argument("--ladder", nargs="*", type=int, default=[15, 40], help="N > 0 to evaluate at")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--datasets", nargs="*", default=["heldout", "wikitext2"])
    parser.add_argument("--seeds", type=int, default=5, help="chip draws per evaluation (from 5000)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--train-max-tokens", type=int, default=None, help="cap on the training stream")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the result files")
    parser.add_argument(
        "--recipe-at",
        choices=["all", "last", "none"],
        default="all",
        help="ladder points measured with the recipe too: all, N = 0 and the largest N only, or none",
    )
    parser.add_argument(
        "--recipe-seeds",
        nargs="*",
        type=int,
        default=None,
        help="training seeds measured with the recipe (all)",
    )
    parser.add_argument("--render", action="store_true", help="rewrite the markdown and plot, run nothing")
    args = parser.parse_args(argv)
    args.ladder = sorted(set(args.ladder))
    if not args.ladder or args.ladder[0] < 1:
        parser.error("--ladder needs step counts >= 1")
    return args


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """What defines a row (a rerun with other settings does not reuse rows)."""
    return {
        "model": args.model_dir.name,
        "profile": args.profile,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "max_steps": args.ladder[-1],
        "eval_seeds": args.seeds,
        "max_tokens": args.max_tokens,
        "train_max_tokens": args.train_max_tokens,
    }


#: The settings that define the pretrained model's rows (no training happened: N = 0).
EVAL_KEYS = ("model", "profile", "eval_seeds", "max_tokens")


def same_checkpoint_settings(values: dict[str, Any], steps: int) -> dict[str, Any]:
    """The settings that must match for a stored row of a checkpoint after ``steps`` steps to be reused."""
    return values if steps else {k: values.get(k) for k in EVAL_KEYS}


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces the run (shared data and model folder as placeholders)."""
    argv = [a for a in sys.argv[1:] if a != "--render"]
    return (
        "CIMCONVERT_SHARED_DATA=<shared>/data .venv/bin/python benchmarks/robust_finetune.py "
        + " ".join(shlex.quote(a) for a in _redact_model_dir(argv))
    ).strip()


def _redact_model_dir(argv: list[str]) -> list[str]:
    """``--model-dir`` as ``<model-dir>/NAME`` (no machine path in the result file)."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--model-dir":
            out[i + 1] = f"<models>/{Path(out[i + 1]).name}"
    return out


# ------------------------------------------------------------------------------------------- storage
class Results:
    """The rows measured so far, saved (JSON, markdown, plot) after every new row."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.json_path = args.out / f"{NAME}.json"
        self.rows: list[dict[str, Any]] = []
        self.step_seconds: dict[str, list[float]] = {}
        self.commands: list[str] = []
        self.reload()

    def reload(self) -> None:
        """Read the rows saved so far (another process may be measuring other runs into the same file)."""
        if self.json_path.is_file():
            saved = json.loads(self.json_path.read_text(encoding="utf-8"))
            self.rows = saved.get("rows", [])
            self.step_seconds = saved.get("step_seconds", {})
            self.commands = saved.get("commands", [])

    def find(self, method: str, seed: int | None, steps: int, variant: str) -> dict[str, Any] | None:
        """The row of that checkpoint and variant under the current settings, if measured."""
        current = same_checkpoint_settings(settings(self.args), steps)
        return next(
            (
                r
                for r in self.rows
                if same_checkpoint_settings(r["settings"], steps) == current
                and r["method"] == method
                and r["seed"] == seed
                and r["steps"] == steps
                and r["variant"] == variant
            ),
            None,
        )

    def baseline(self) -> dict[str, Any] | None:
        """The pretrained model's plain row (reference of the paper metric and the gap closed)."""
        return self.find(PRETRAINED, None, 0, "plain")

    def add(self, row: dict[str, Any]) -> None:
        """Store a row and rewrite every output."""
        self.reload()
        self.rows.append(row)
        self.save()

    def add_step_times(self, key: str, seconds: list[float]) -> None:
        """Wall seconds of the training steps of one (method, seed) run, appended as they come."""
        self.reload()
        self.step_seconds.setdefault(key, []).extend(seconds)
        self.save()

    def save(self) -> None:
        """JSON (full settings, command, rows, step times), markdown table and plot."""
        self.args.out.mkdir(parents=True, exist_ok=True)
        if not self.args.render and command(self.args) not in self.commands:
            self.commands.append(command(self.args))
        payload = {
            "command": command(self.args),
            "commands": self.commands,
            "settings": settings(self.args),
            "args": {
                k: str(v) if isinstance(v, Path) else v
                for k, v in vars(self.args).items()
                if k not in ("model_dir", "state_dir", "out", "render")
            },
            "recipe": RECIPE,
            "eval_seeds": f"{FIRST_SEED}..{FIRST_SEED + self.args.seeds - 1}",
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "step_seconds": self.step_seconds,
            "rows": self.rows,
        }
        tmp = self.json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.json_path)
        (self.args.out / f"{NAME}.md").write_text(markdown(self.rows, payload) + "\n", encoding="utf-8")
        plot(self.rows, self.args.out / f"{NAME}.png")


# ------------------------------------------------------------------------------------------ measuring
def load(model_dir: Path) -> tuple[nn.Module, Any]:
    """(fp32 model, tokenizer) from a Hugging Face folder; a clear message when it is missing."""
    from transformers import AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"{model_dir} missing: run scripts/get_models.sh first (or pass --model-dir)")
    return load_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(str(model_dir))


class Bench:
    """The real model, its evaluation tokens and the result rows."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.results = Results(args)
        self.model, self.tokenizer = load(args.model_dir)
        self.model.eval()
        self.chip = load_profile(args.profile)
        self.eval_seeds = list(range(FIRST_SEED, FIRST_SEED + args.seeds))
        self.eval_tokens = {d: tokenize(self.tokenizer, load_text(d), args.max_tokens) for d in args.datasets}
        self._train_tokens: torch.Tensor | None = None

    def train_tokens(self) -> torch.Tensor:
        """The training stream (``gutenberg-train``, tokenised once)."""
        if self._train_tokens is None:
            text = training_text(GUTENBERG_TRAIN)
            self._train_tokens = token_ids(self.tokenizer, text, self.args.train_max_tokens)
        return self._train_tokens

    def variants(self, steps: int, seed: int | None) -> tuple[str, ...]:
        """The variants measured after ``steps`` steps (``--recipe-at``, ``--recipe-seeds``)."""
        at_step = self.args.recipe_at == "all" or (
            self.args.recipe_at == "last" and steps in (0, self.args.ladder[-1])
        )
        of_seed = seed is None or self.args.recipe_seeds is None or seed in self.args.recipe_seeds
        return VARIANTS if at_step and of_seed else VARIANTS[:1]

    def measure(self, model: nn.Module, method: str, seed: int | None, steps: int) -> None:
        """Rows of one checkpoint (plain, then with the recipe on a copy); finished rows are skipped."""
        model.eval()
        for variant in self.variants(steps, seed):
            if self.results.find(method, seed, steps, variant) is not None:
                continue
            start = time.perf_counter()
            subject, recipe = (model, []) if variant == "plain" else (copy.deepcopy(model), RECIPE)
            placement, reports = apply_recipe(subject, self.args.profile, recipe)
            row = {
                "method": method,
                "seed": seed,
                "steps": steps,
                "variant": variant,
                "settings": settings(self.args),
                "recipe": recipe,
                "reports": reports,
                "analog_tensors": len(placement.analog()),
                "datasets": evaluate(
                    subject, placement, self.args.profile, self.eval_tokens, self.eval_seeds
                ),
            }
            row["seconds"] = round(time.perf_counter() - start, 1)
            add_metrics(row, self.results.baseline() or row)
            self.results.add(row)
            del subject
            report(row)

    def done(self, method: str, seed: int) -> bool:
        """Every row of that run is measured."""
        return all(
            self.results.find(method, seed, n, v) is not None
            for n in self.args.ladder
            for v in self.variants(n, seed)
        )

    def run(self, method: str, seed: int) -> None:
        """One training run, evaluated at every ladder point (resumed from its last saved point)."""
        if self.done(method, seed):
            return
        model = copy.deepcopy(self.model)
        cfg = FinetuneConfig(
            method=method,
            steps=self.args.ladder[-1],
            lr=self.args.lr,
            batch_size=self.args.batch_size,
            seq_len=self.args.seq_len,
            seed=seed,
        )
        trainer = Trainer(
            model, self.chip, cfg, self.train_tokens(), analog_targets(model, plan_model(model, self.chip))
        )
        state = self.state_path(method, seed)
        if state.is_file():
            trainer.load_state(state)
            print(f"{method} seed {seed}: resumed at step {trainer.step}", flush=True)
        for target in self.args.ladder:
            if trainer.step > target:
                continue
            if trainer.step < target:
                self.train_to(trainer, target, f"{method}/{seed}")
                trainer.save_state(state)
            self.measure(model, method, seed, target)

    def train_to(self, trainer: Trainer, target: int, key: str) -> None:
        """Train until ``trainer.step == target``, logging loss and time per step."""
        seconds = []
        while trainer.step < target:
            stats = trainer.train_step()
            seconds.append(stats.seconds)
            print(
                f"  {key} step {stats.step + 1}: loss {stats.loss:.4f}  lr {stats.lr:.2e}  "
                f"{stats.seconds:.1f} s",
                flush=True,
            )
        if seconds:
            self.results.add_step_times(key, seconds)

    def state_path(self, method: str, seed: int) -> Path:
        """Where the resumable trainer state of one run lives between ladder points."""
        return self.args.state_dir / f"{method}_seed{seed}.pt"


def report(row: dict[str, Any]) -> None:
    """One line per measured row."""
    figures = "  ".join(
        f"{d}: {fmt(r['clean_ppl'])} → {fmt(r['noisy_ppl_mean'])}"
        f" (paper {r.get('paper_metric_pct', 0):.0f} %)"
        for d, r in row["datasets"].items()
    )
    print(
        f"{row['method']:10s} seed {row['seed']} N={row['steps']:3d} {row['variant']:6s} {figures}  "
        f"[{row['seconds']} s]",
        flush=True,
    )


# ------------------------------------------------------------------------------------------ rendering
def groups(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """Rows by (method, N, variant) over training seeds; the pretrained model counts as every method's N=0."""
    out: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault((r["method"], r["steps"], r["variant"]), []).append(r)
    return out


def mean_of(rows: list[dict[str, Any]], dataset: str, key: str) -> float | None:
    """Mean of ``datasets[dataset][key]`` over rows (None when missing)."""
    values = [r["datasets"][dataset].get(key) for r in rows if dataset in r["datasets"]]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def pct(value: float | None) -> str:
    """A percentage for a table."""
    return "n/a" if value is None else f"{value:.0f} %"


def markdown(rows: list[dict[str, Any]], payload: dict[str, Any]) -> str:
    """The mean table over training seeds, the per-seed table, and the time per step."""
    datasets = sorted({d for r in rows for d in r["datasets"]}, key=lambda d: (d != "heldout", d))
    head = "| method | N | variant | training seeds |" + "".join(
        f" {d} clean | {d} noisy | {d} noisy/clean | {d} paper | {d} gap closed |" for d in datasets
    )
    lines = [
        f"# Noise-aware fine-tuning of {payload['settings']['model']} under {payload['settings']['profile']}",
        "",
        "\n\n".join(f"`{c}`" for c in payload["commands"]),
        "",
        f"Eval: {payload['settings']['max_tokens']} tokens per dataset, seq 256, chip draws "
        f"{payload['eval_seeds']}; training batch {payload['settings']['batch_size']} × "
        f"{payload['settings']['seq_len']}, lr {payload['settings']['lr']:g}, cosine over "
        f"{payload['settings']['max_steps']} steps. Paper metric and gap closed against the pretrained "
        "model's plain row; noisy/clean against the same checkpoint's clean PPL. "
        "`recipe` = outlier_channels 3 % → output_correction on the checkpoint.",
        "",
        "## Mean over training seeds (noisy = mean of the per-seed means; ± = spread over seeds)",
        "",
        head,
        "|" + "---|" * (4 + 5 * len(datasets)),
    ]
    for (method, steps, variant), members in sorted(groups(rows).items(), key=_order):
        cells = "".join(_mean_cells(members, d) for d in datasets)
        seeds = ",".join(str(r["seed"]) for r in members) if method != PRETRAINED else "-"
        lines.append(f"| {method} | {steps} | {variant} | {seeds} |{cells}")
    lines += [
        "",
        "## Time per training step (wall s, this machine)",
        "",
        "| run | steps | median s/step | mean s/step |",
        "|---|---|---|---|",
    ]
    for key, seconds in sorted(payload["step_seconds"].items()):
        lines.append(
            f"| {key} | {len(seconds)} | {statistics.median(seconds):.2f} | {statistics.fmean(seconds):.2f} |"
        )
    return "\n".join(lines)


def _order(item: tuple[tuple[str, int, str], Any]) -> tuple:
    method, steps, variant = item[0]
    rank = [PRETRAINED, "none", "ste", "nat"]
    return (variant, rank.index(method) if method in rank else 9, steps)


def _mean_cells(members: list[dict[str, Any]], dataset: str) -> str:
    noisy = [r["datasets"][dataset]["noisy_ppl_mean"] for r in members if dataset in r["datasets"]]
    noisy = [v for v in noisy if v is not None]
    spread = f" ± {fmt(statistics.stdev(noisy))}" if len(noisy) > 1 else ""
    return (
        f" {fmt(mean_of(members, dataset, 'clean_ppl'))} | {fmt(statistics.fmean(noisy) if noisy else None)}"
        f"{spread} | {_ratio(members, dataset)} | {pct(mean_of(members, dataset, 'paper_metric_pct'))} | "
        f"{pct(mean_of(members, dataset, 'gap_closed_pct'))} |"
    )


def _ratio(members: list[dict[str, Any]], dataset: str) -> str:
    """Noisy over the same checkpoint's clean PPL, mean over the rows (the "within 10 % of clean" target)."""
    ratios = [
        r["datasets"][dataset]["noisy_ppl_mean"] / r["datasets"][dataset]["clean_ppl"]
        for r in members
        if dataset in r["datasets"] and r["datasets"][dataset]["noisy_ppl_mean"] is not None
    ]
    return f"{statistics.fmean(ratios):.2f}×" if ratios else "n/a"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Noisy PPL vs N per method (mean over training seeds), one panel per dataset; dashed = with recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({d for r in rows for d in r["datasets"]}, key=lambda d: (d != "heldout", d))
    if not datasets:
        return
    grouped = groups(rows)
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        for method, color in (("none", "tab:gray"), ("ste", "tab:blue"), ("nat", "tab:orange")):
            for variant, style in (("plain", "-o"), ("recipe", "--s")):
                points = [(0, grouped.get((PRETRAINED, 0, variant)))]
                points += [
                    (n, m) for (meth, n, var), m in grouped.items() if meth == method and var == variant
                ]
                xy = sorted((n, mean_of(m, dataset, "noisy_ppl_mean")) for n, m in points if m)
                if len(xy) > 1:
                    ax.plot(*zip(*xy, strict=True), style, color=color, label=f"{method} {variant}")
        ax.set_title(dataset)
        ax.set_xlabel("fine-tuning steps N")
        ax.set_ylabel("noisy PPL (chipA, mean over draws and training seeds)")
        if ax.get_lines():
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    """Pretrained rows, then every (method, seed) run: control first, then ste, then nat (cut first)."""
    args = parse_args(argv)
    if args.render:
        Results(args).save()
        return
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    bench.measure(bench.model, PRETRAINED, None, 0)
    seeds = {"none": args.control_seeds, "ste": args.ste_seeds, "nat": args.nat_seeds}
    runs = [(m, s) for m in ("none", "ste", "nat") if m in args.methods for s in seeds[m]]
    for method, seed in runs:
        bench.run(method, seed)
    print(f"wrote {bench.results.json_path}", flush=True)


if __name__ == "__main__":
    main()
