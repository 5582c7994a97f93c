"""Command-line interface: a thin click layer over cimconvert.api (parse, call, print human or --json).

One flag vocabulary across commands (docs/CLI.md): the options that mean the same thing are declared once
below (``noisy_run_options``, ``THREADS_OPTION``, ``JSON_OPTION``, ...), so every command spells and
defaults them alike. Results go to stdout; progress, status lines and warnings to stderr (``-q`` / ``-v``).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from cimconvert import __version__, api
from cimconvert.analysis import analyze, format_table
from cimconvert.bundle.integrity import read_key_file
from cimconvert.devices import DTYPES, set_threads
from cimconvert.distributed import is_main_rank
from cimconvert.errors import CimError
from cimconvert.finetune import finetune
from cimconvert.finite import dumps, nulls_for_non_finite
from cimconvert.methods import MethodOption, all_options
from cimconvert.profiles.schema import ChipProfile
from cimconvert.progress import PACKAGE_LOGGER
from cimconvert.recipe import Recipe, dump_recipe, recipe_text
from cimconvert.validate import format_validate, validate

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}


def emit(result: Any, as_json: bool, human: Callable[[Any], str]) -> None:
    """Print ``result`` as indented strict JSON (stable keys) or through its human formatter.

    JSON is always valid JSON: a NaN or infinite figure in it is an error (exit 2), never a literal.
    Under a ``torchrun`` launch only rank 0 prints (every rank holds the same gathered result).
    """
    if not is_main_rank():
        return
    if as_json:
        click.echo(dumps(result, indent=2, sort_keys=False))
    else:
        click.echo(human(result))


KEY_OPTION = click.option(
    "--key", "key_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
    help="file holding the bundle signing key (HMAC in bundle.lock) [$CIMCONVERT_SIGNING_KEY]",
)


#: Defaults of the evaluation flags, the same in eval, validate and analyze (docs/CLI.md).
EVAL_SEEDS = 5
EVAL_FIRST_SEED = 1000
EVAL_DATASET = "heldout"
EVAL_MAX_TOKENS = 4096
EVAL_SEQ_LEN = 256

JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="machine-readable result on stdout")
THREADS_OPTION = click.option("--threads", default=None, type=click.IntRange(1),
                              help="CPU threads (torch, and onnxruntime in validate) [torch's default]")


def dataset_option(default: str, what: str = "text") -> Callable[[Callable], Callable]:
    """``--dataset``: a dataset name (``heldout``, ``calib``, ``wikitext2``, ...) or a UTF-8 text file."""
    return click.option("--dataset", default=default, show_default=True,
                        help=f"{what}: dataset name (heldout, calib, wikitext2, ...) or a UTF-8 text file")


def _stacked(options: list[Callable[[Callable], Callable]]) -> Callable[[Callable], Callable]:
    """One decorator applying ``options`` in order (the first is the first in ``--help``)."""

    def decorate(func: Callable) -> Callable:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def device_options(
    dtype_help: str = "dtype the model runs in", dtype_default: str = "float32"
) -> Callable[[Callable], Callable]:
    """``--device`` and ``--dtype``, the same on every command that runs a model (checked by
    ``cimconvert.devices``: a device that is not there, or a dtype it does not support, is one line)."""
    return _stacked([
        click.option("--device", default="cpu", show_default=True,
                     help="where torch runs: cpu, cuda (this rank's GPU), cuda:N, auto (a GPU if visible)"),
        click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
                     help=f"{dtype_help} [{dtype_default}]"),
    ])  # fmt: skip


def noisy_run_options(draws_help: str = "number of noise draws") -> Callable[[Callable], Callable]:
    """The options of a run under noise draws (eval, validate, analyze), with the same defaults everywhere:
    --seeds, --seed, --dataset, --max-tokens, --seq-len."""
    return _stacked([
        click.option("--seeds", default=EVAL_SEEDS, show_default=True, type=click.IntRange(1),
                     help=draws_help),
        click.option("--seed", default=EVAL_FIRST_SEED, show_default=True,
                     help="first noise seed (draws: seed, seed+1, ...)"),
        dataset_option(EVAL_DATASET, "evaluation text"),
        click.option("--max-tokens", default=EVAL_MAX_TOKENS, show_default=True, type=click.IntRange(16),
                     help="token budget (the first N tokens of the text)"),
        click.option("--seq-len", default=EVAL_SEQ_LEN, show_default=True, type=click.IntRange(2),
                     help="tokens per evaluation window"),
    ])  # fmt: skip


#: ``--layer-by-layer/--whole-model`` (default: auto, by the model's size; README "Large models").
LAYERWISE_OPTION = click.option(
    "--layer-by-layer/--whole-model", "layer_by_layer", default=None,
    help="run one decoder layer at a time (models larger than memory) or the whole model [auto: layer by "
    "layer when the float32 model exceeds half the available memory]",
)  # fmt: skip


def _layerwise(flag: bool | None) -> bool | str:
    """The API's ``layerwise`` value of the ``--layer-by-layer/--whole-model`` flag (unset: auto)."""
    return "auto" if flag is None else flag


def _key(key_file: Path | None) -> bytes | None:
    """The signing key read from ``--key FILE`` (None: the environment's, if any)."""
    return read_key_file(key_file) if key_file is not None else None


#: Old flag spellings, still accepted (hidden) with a warning: command → {old: new}.
DEPRECATED_FLAGS = {
    "convert": {"--calib-data": "--dataset"},
    "finetune": {"--data": "--dataset"},
}
#: Options of the group itself (given before the command).
_GLOBAL_FLAG = re.compile(r"-q|--quiet|-v+|--verbose")
_GROUP_ONLY = ("-h", "--help", "--version")


def _renamed(command: str, args: list[str]) -> list[str]:
    """``args`` of ``command`` with deprecated flag spellings replaced (a warning line on stderr for each)."""
    renames = DEPRECATED_FLAGS.get(command, {})
    out = []
    for arg in args:
        flag, eq, value = arg.partition("=")
        if flag in renames:
            click.echo(f"warning: {flag} is deprecated: use {renames[flag]}", err=True)
            arg = renames[flag] + eq + value
        out.append(arg)
    return out


def _refuse_typo(word: str, commands: list[str]) -> None:
    """A first word that is no command and no existing path but close to a command (or ``help``) is a typo:
    one usage error naming the command meant, instead of reading it as a model id."""
    if Path(word).exists():
        return
    if word == "help":
        raise click.UsageError("no command 'help': use 'cimconvert --help' or 'cimconvert COMMAND --help'")
    close = difflib.get_close_matches(word, commands, n=1, cutoff=0.6)
    if close:
        raise click.UsageError(f"no command '{word}': did you mean 'cimconvert {close[0]}'?")


class DefaultToConvert(click.Group):
    """A group whose first argument, when it is not a subcommand, is a MODEL for ``convert``; options may
    come before MODEL (``cimconvert --profile chipA MODEL``) and a mistyped command is refused."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        """Route ``cimconvert [OPTIONS] MODEL ...`` to ``convert``, map deprecated flags, refuse typos."""
        lead = 0
        while lead < len(args) and _GLOBAL_FLAG.fullmatch(args[lead]):
            lead += 1
        rest = args[lead:]
        if rest and rest[0] not in self.commands and rest[0] not in _GROUP_ONLY:
            if not rest[0].startswith("-"):
                _refuse_typo(rest[0], sorted(self.commands))
            rest = ["convert", *rest]
        if rest and rest[0] in self.commands:
            rest = [rest[0], *_renamed(rest[0], rest[1:])]
        return super().parse_args(ctx, [*args[:lead], *rest])


@click.group(cls=DefaultToConvert, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="cimconvert")
@click.option("-q", "--quiet", is_flag=True,
              help="no progress or status lines on stderr (errors and warnings only)")
@click.option("-v", "--verbose", count=True,
              help="more detail on stderr (debug lines of cimconvert's loggers)")
def cli(quiet: bool, verbose: int) -> None:
    """Convert Hugging Face LMs into bundles for analog compute-in-memory chips.

    \b
    cimconvert MODEL --profile chipA [-o OUT]     convert (same as `cimconvert convert ...`)
    cimconvert eval MODEL --profile chipA        perplexity, clean and under chip noise
    cimconvert MODEL -p chipA --recipe R.yaml    convert with a recipe (ordered method steps)
    cimconvert inspect OUT                       verify and summarise a bundle
    cimconvert recipe OUT [-o R.yaml]            the recipe a bundle was converted with (to replay)
    cimconvert validate OUT --seeds 5            run the ONNX graph in onnxruntime under chip noise
    cimconvert analyze MODEL --profile chipA     per-layer noise sensitivity (for HPD)
    cimconvert finetune MODEL --profile chipA -o OUT_MODEL   noise-aware fine-tuning (STE / NAT)
    cimconvert profiles [show NAME]              list or print chip profiles

    Options may come before MODEL (`cimconvert --profile chipA MODEL`); -q / -v go before the command.
    Flags and defaults shared by the commands: docs/CLI.md.
    """
    PACKAGE_LOGGER.setLevel(logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO)


# ----------------------------------------------------------------------------------------- convert
def _format_convert(res: dict) -> str:
    if res.get("dry_run"):
        return res["table"]
    totals = res["totals"]
    lines = [
        f"wrote {res['out']}",
        f"  profile {res['profile']}  method {res['method']}: {_method_line(res)}",
        f"  analog: {totals['analog_tensors']} tensors, {totals['analog_tiles']} crossbar arrays, "
        f"{totals['analog_bytes'] / 1e6:.2f} MB; "
        f"digital: {totals['digital_tensors']} tensors, {totals['digital_bytes'] / 1e6:.2f} MB",
        *(f"  {key}: {line}" for key, line in _step_summaries(res)),
        *(f"  recovered: {line}" for line in res.get("recovered", [])),
        *(f"  auto skipped {step}: the model has no tokenizer" for step in res.get("auto_skipped", [])),
    ]
    return "\n".join(lines)


def _step_summaries(res: dict) -> list[tuple[str, str]]:
    """(step key, summary) of every recipe step that says what it did and measured, when transforms ran
    (without transforms the method line carries them)."""
    if not res.get("transforms"):
        return []
    reports = (res.get("method_report") or {}).items()
    return [(key, r["summary"]) for key, r in reports if isinstance(r, dict) and r.get("summary")]


def _option_type(opt: MethodOption) -> Any:
    """The click type of a method option: its choices, its range (``minimum``/``maximum``) or its type."""
    if opt.choices:
        return click.Choice(opt.choices)
    ranged = opt.minimum is not None or opt.maximum is not None
    if ranged and opt.type in (int, float):
        kind = click.IntRange if opt.type is int else click.FloatRange
        return kind(opt.minimum, opt.maximum)
    return opt.type


#: Method options whose flag is the shared vocabulary's (calibration text is the convert's --dataset).
METHOD_FLAGS = {"calib_data": "--dataset"}


def method_options(func: Callable) -> Callable:
    """Add every registered method's options (declared as data in the method) to a command."""
    for opt in reversed(all_options()):
        flag = METHOD_FLAGS.get(opt.name, opt.flag)
        func = click.option(flag, opt.name, type=_option_type(opt), default=opt.default,
                            multiple=opt.multiple, show_default=not opt.multiple, help=opt.help)(func)
    return func


def _given_method_options(ctx: click.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The method options the user set on the command line (not click's defaults)."""
    default = click.core.ParameterSource.DEFAULT
    return {name: value for name, value in options.items() if ctx.get_parameter_source(name) != default}


def _method_line(res: dict) -> str:
    if res["method"] == "none":
        return "placement only"
    reports = [r for r in (res.get("method_report") or {}).values() if isinstance(r, dict)]
    if res["transforms"]:
        macs = sum(r.get("digital_macs_per_token", 0) for r in reports)
        extra_bytes = sum(r.get("digital_extra_bytes", 0) for r in reports)
        cost = f" (digital overhead {macs:,} MACs/token, +{extra_bytes / 1e3:.0f} kB digital)" if macs else ""
        return "applied " + ", ".join(res["transforms"]) + cost
    summaries = [r["summary"] for r in reports if r.get("summary")]
    if summaries:  # steps that only place tensors and say what they chose (the digital budget)
        return "; ".join(summaries)
    if all(r.get("method", "").startswith("keep_") for r in reports):
        return "placement steps only"
    return "no step changed the model (each step's summary below; REPORT.md says why)"


@cli.command("convert", context_settings=CONTEXT)
@click.argument("model")
@click.option("--profile", "-p", required=True, help="chip profile: shipped name (`profiles`) or YAML path")
@click.option("-o", "--out", type=click.Path(path_type=Path), help="output folder [./<model>-<profile>/]")
@click.option(
    "--method",
    default="auto",
    show_default=True,
    help="robustness method: auto (the family's default recipe: outlier channels + output correction for "
    "dense and MoE models, HPD for SSMs), none, or a method name (a one-step recipe)",
)
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="run the steps of a recipe file (YAML/JSON, docs/RECIPES.md) instead of --method")
@click.option("--analog", multiple=True, help="force tensors analog: exact name or regex (repeatable)")
@click.option("--digital", multiple=True, help="keep tensors digital: exact name or regex (repeatable)")
@click.option("--dry-run", is_flag=True, help="print the placement table and totals; write nothing")
@click.option("--force", is_flag=True, help="replace a non-empty OUT")
@click.option("--onnx/--no-onnx", default=True, show_default=True, help="also export onnx/model.onnx")
@click.option("--seed", default=0, show_default=True, help="seed for every random draw (recorded)")
@device_options("dtype the recipe's steps (calibration) run in and GGUF input is dequantised to (the bundle "
                "keeps the source's dtype)", "float32; GGUF: its float type, float32 if quantised")
@KEY_OPTION
@LAYERWISE_OPTION
@JSON_OPTION
@method_options
@click.pass_context
def convert_cmd(ctx: click.Context, model: str, profile: str, out: Path | None, method: str,
                recipe_file: Path | None, analog: tuple[str, ...], digital: tuple[str, ...], dry_run: bool,
                force: bool, onnx: bool, seed: int, device: str, dtype: str | None, key_file: Path | None,
                layer_by_layer: bool | None, as_json: bool, **method_opts: Any) -> None:
    """Convert MODEL (local HF folder, .gguf file or cached hub id) into a bundle for the chip PROFILE."""
    res = api.convert(
        model, profile, out=out, method=method, analog=analog, digital=digital, dry_run=dry_run,
        force=force, seed=seed, progress=_progress(as_json), recipe=recipe_file,
        method_options=_given_method_options(ctx, method_opts), onnx=onnx, dtype=dtype, key=_key(key_file),
        device=device, layerwise=_layerwise(layer_by_layer),
    )
    emit(res, as_json, _format_convert)


# ------------------------------------------------------------------------------------------ recipe
@cli.command("recipe", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-o", "--output", "output", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="write the recipe to this file (.json: JSON, else YAML) instead of printing it")
@click.option("--json", "as_json", is_flag=True, help="print the recipe as JSON")
def recipe_cmd(out: Path, output: Path | None, as_json: bool) -> None:
    """Print (or write) the recipe bundle OUT was converted with; replay it with `convert --recipe FILE`."""
    data = api.recipe_of(out)
    if output is not None:
        written = dump_recipe(Recipe.model_validate(data), output)
        emit({"recipe": data, "written": str(written)}, as_json, lambda r: f"wrote {r['written']}")
    else:
        emit(data, as_json, lambda r: recipe_text(Recipe.model_validate(r)).rstrip())


# -------------------------------------------------------------------------------------------- eval
def _format_eval(res: dict) -> str:
    lines = [
        f"model {res['model']}  profile {res['profile']}  dataset {res['dataset']} "
        f"({res['tokens']} tokens, seq_len {res['seq_len']}, stride {res['stride']})",
        f"  clean perplexity   {res['clean_ppl']:.3f}",
        *([f"  noise-free, calibrated routing ({res['calibrated_routing_layers']} layers)  "
           f"{res['noise_free_ppl']:.3f}"] if res.get("calibrated_routing_layers") else []),
        f"  noisy perplexity   {res['noisy_ppl_mean']:.3f} +- {res['noisy_ppl_std']:.3f} "
        f"over {len(res['seeds'])} draws (seeds {res['seeds'][0]}..{res['seeds'][-1]}), "
        f"{res['degradation_pct']:+.1f}%",
        f"  analog tensors     {res['analog_tensors']}",
    ]
    if res.get("layer_by_layer"):
        lines.append("  run layer by layer (one decoder layer in memory at a time)")
    return "\n".join(lines)


@cli.command("eval", context_settings=CONTEXT)
@click.argument("model")
@click.option("--profile", "-p", default=None, help="chip profile [a bundle's own profile, else required]")
@noisy_run_options()
@click.option("--stride", default=None, type=click.IntRange(1), help="window stride [seq-len]")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@THREADS_OPTION
@device_options()
@LAYERWISE_OPTION
@JSON_OPTION
def eval_cmd(model: str, profile: str | None, seeds: int, seed: int, dataset: str, max_tokens: int,
             seq_len: int, stride: int | None, batch_size: int, threads: int | None, device: str,
             dtype: str | None, layer_by_layer: bool | None, as_json: bool) -> None:
    """Perplexity of MODEL (HF folder, hub id or bundle), clean and under chip noise.

    Under `torchrun --nproc_per_node N -m cimconvert eval ...` the draws are shared out over the ranks.
    """
    res = api.evaluate(
        model, profile, seeds=seeds, seed=seed, dataset=dataset, max_tokens=max_tokens, seq_len=seq_len,
        stride=stride, batch_size=batch_size, threads=threads, progress=_progress(as_json), device=device,
        dtype=dtype, layerwise=_layerwise(layer_by_layer),
    )
    emit(res, as_json, _format_eval)


# ---------------------------------------------------------------------------------------- validate
@cli.command("validate", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--profile", "-p", default=None, help="chip profile [the bundle's own]")
@noisy_run_options()
@THREADS_OPTION
@click.option("--profile-mismatch-ok", is_flag=True, help="allow a profile other than the bundle's")
@click.option("--mvm-noise", default="counter", show_default=True,
              help="per-MVM noise draws: counter = the same draws in both runtimes, compared per seed "
                   "(exact); native = each runtime's own generator, compared by a paired statistical test")
@click.option("--alpha", default=0.01, show_default=True, type=float,
              help="native mode: false-failure rate of the test (and level of the equivalence test)")
@click.option("--margin", default=0.01, show_default=True, type=float,
              help="native mode: equivalence margin on the per-seed PPL ratio")
@device_options("dtype of the torch side (only float32: the comparison with the ONNX graph is exact)")
@JSON_OPTION
def validate_cmd(out: Path, profile: str | None, seeds: int, seed: int, dataset: str, max_tokens: int,
                 seq_len: int, threads: int | None, profile_mismatch_ok: bool, mvm_noise: str, alpha: float,
                 margin: float, device: str, dtype: str | None, as_json: bool) -> None:
    """Run bundle OUT's ONNX graph in onnxruntime under chip noise and compare with the torch simulator."""
    res = validate(out, profile, seeds=seeds, seed=seed, dataset=dataset, max_tokens=max_tokens,
                   seq_len=seq_len, threads=threads, profile_mismatch_ok=profile_mismatch_ok,
                   mvm_noise=mvm_noise, alpha=alpha, margin=margin, progress=_progress(as_json),
                   device=device, dtype=dtype)
    emit(nulls_for_non_finite(res) if as_json else res, as_json, format_validate)  # a FAIL may hold NaN
    if not res["summary"]["passed"]:
        sys.exit(1)


# ----------------------------------------------------------------------------------------- inspect
def _format_inspect(res: dict) -> str:
    status = "checksums OK" if res["verified"] else "ALTERED: " + "; ".join(res["problems"])
    if res.get("signed"):
        status += ", signature OK" if res.get("signature_verified") else ", signed (no key set: not checked)"
    lines = [
        f"bundle {res['bundle']}: {status}",
        f"  source     {res['model']} ({res['model_type']})",
        f"  profile    {res['profile']} {res['profile_hash'][:19]}",
        f"  producer   {res['producer']}, created {res['created']}",
    ]
    for unit, info in res["units"].items():
        lines.append(
            f"  {unit:<8}   {info['tensors']} tensors, {info['bytes'] / 1e6:.2f} MB, {info['tiles']} arrays, "
            f"kinds: {', '.join(info['kinds'])}"
        )
    recipe = res.get("recipe")
    steps = ("+".join(s["step"] for s in recipe["steps"]) or "none") if recipe is not None else "not recorded"
    transforms = ", ".join(t.get("type", "?") for t in res["transforms"]) or "none"
    lines.append(f"  recipe     {steps}")
    lines.append(f"  transforms {transforms}")
    lines += _deployment_lines(res.get("deployment"))
    lines += [f"  warning    {w}" for w in res.get("warnings") or []]
    return "\n".join(lines)


def _deployment_lines(figures: dict | None) -> list[str]:
    """Arrays, per-token counts and the energy estimate of ``inspect`` (details: REPORT.md, --json)."""
    if figures is None:
        return ["  deployment unknown (config.json unreadable)"]
    arrays, per_token = figures["arrays"], figures["per_token"]
    used = arrays["utilisation"]
    energy = figures["estimate"]["energy_per_token"]
    total = energy["total_pj"]
    analog = energy["components"]["analog"]["pj"]
    return [
        f"  arrays     {arrays['tiles']} of {arrays['tile_rows']}x{arrays['tile_cols']}, utilisation "
        + (f"{100 * used:.1f} %" if used is not None else "n/a"),
        f"  per token  {per_token['analog_macs']:,.0f} analog MACs, {per_token['adc_conversions']:,.0f} "
        f"ADC / {per_token['dac_conversions']:,.0f} DAC conversions, {per_token['digital_macs']:,.0f} "
        "digital MACs",
        "  energy     total " + (f"{total / 1e3:,.1f} nJ/token" if total is not None else "unknown")
        + (f", analog {analog / 1e3:,.1f} nJ/token" if analog is not None else ", analog unknown"),
    ]


@cli.command("inspect", context_settings=CONTEXT)
@click.argument("out", type=click.Path(path_type=Path))
@KEY_OPTION
@JSON_OPTION
def inspect_cmd(out: Path, key_file: Path | None, as_json: bool) -> None:
    """Verify every checksum of bundle OUT and print a summary (exit 2 when a file was altered)."""
    res = api.inspect(out, key=_key(key_file))
    emit(res, as_json, _format_inspect)
    if not res["verified"]:
        sys.exit(2)


# ----------------------------------------------------------------------------------------- analyze
def _format_analyze(res: dict) -> str:
    return format_table(res) + "\n\nwrote " + ", ".join(res["files"].values())


@cli.command("analyze", context_settings=CONTEXT)
@click.argument("model")
@click.option("--profile", "-p", default=None, help="chip profile [a bundle's own profile, else required]")
@noisy_run_options("noise draws per layer (or block)")
@click.option("--granularity", type=click.Choice(["layer", "block"]), default="layer", show_default=True,
              help="noise in one analog tensor (layer) or one decoder block at a time")
@click.option("-o", "--out", type=click.Path(path_type=Path),
              help="folder for sensitivity.json/.md/.png [./<model>-sensitivity-<profile>/]")
@click.option("--analog", multiple=True, help="force tensors analog: exact name or regex (repeatable)")
@click.option("--digital", multiple=True, help="keep tensors digital: exact name or regex (repeatable)")
@THREADS_OPTION
@device_options()
@LAYERWISE_OPTION
@JSON_OPTION
def analyze_cmd(model: str, profile: str | None, seeds: int, seed: int, dataset: str, max_tokens: int,
                seq_len: int, granularity: str, out: Path | None, analog: tuple[str, ...],
                digital: tuple[str, ...], threads: int | None, device: str, dtype: str | None,
                layer_by_layer: bool | None, as_json: bool) -> None:
    """Noise sensitivity of MODEL: chip noise in one layer (or block) at a time, PPL change over seeds.

    The JSON it writes feeds `--method hpd --hpd-layers auto --hpd-scan OUT/sensitivity.json`.
    """
    set_threads(threads)
    res = analyze(model, profile, seeds=seeds, seed=seed, granularity=granularity, out=out, dataset=dataset,
                  max_tokens=max_tokens, seq_len=seq_len, analog=analog, digital=digital,
                  progress=_progress(as_json), device=device, dtype=dtype,
                  layerwise=_layerwise(layer_by_layer))
    emit(res, as_json, _format_analyze)


# ---------------------------------------------------------------------------------------- profiles
def _format_profiles(rows: list[dict]) -> str:
    width = max(len(r["name"]) for r in rows)
    return "\n".join(f"{r['name']:<{width}}  {r['description']}" for r in rows)


@cli.group("profiles", invoke_without_command=True, context_settings=CONTEXT)
@JSON_OPTION
@click.pass_context
def profiles_cmd(ctx: click.Context, as_json: bool) -> None:
    """List the shipped chip profiles."""
    if ctx.invoked_subcommand is None:
        emit(api.profiles(), as_json, _format_profiles)


@profiles_cmd.command("show", context_settings=CONTEXT)
@click.argument("name")
@JSON_OPTION
def profiles_show_cmd(name: str, as_json: bool) -> None:
    """Print one profile (shipped name, NAME:key=value,... or a YAML path), fully resolved."""
    import yaml

    res = api.show_profile(name)
    emit(res, as_json, lambda r: yaml.safe_dump(r, sort_keys=False, allow_unicode=True).rstrip())


@profiles_cmd.command("schema", context_settings=CONTEXT)
def profiles_schema_cmd() -> None:
    """Print the JSON Schema of chip profiles."""
    click.echo(json.dumps(ChipProfile.model_json_schema(), indent=2))


# ---------------------------------------------------------------------------------------- finetune
def _format_finetune(res: dict) -> str:
    method = res["method"]
    loss = "n/a" if res["loss_first"] is None else f"{res['loss_first']:.4f} -> {res['loss_last']:.4f}"
    speed = "" if res["tokens_per_second"] is None else (
        f", {res['seconds_per_step']:.3f} s/step, {res['tokens_per_second']:.0f} tokens/s")
    return (
        f"wrote {res['out']}\n"
        f"  method {method['method']} ({method['forward']}; backward {method['backward']})\n"
        f"  profile {res['profile']}, {res['analog_tensors']} analog tensors\n"
        f"  steps {res['start_step']} -> {res['steps']}, loss {loss}{speed}"
    )


@cli.command("finetune", context_settings=CONTEXT)
@click.argument("model")
@click.option("--profile", "-p", required=True, help="chip profile: shipped name or YAML path")
@click.option("--method", type=click.Choice(["ste", "nat", "none"]), default="ste", show_default=True,
              help="ste: full chip model forward, straight-through backward; nat: differentiable noise; "
                   "none: clean fine-tuning (control)")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path), help="output model folder")
@dataset_option("gutenberg-train", "training text")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(1), help="total optimizer steps")
@click.option("--lr", default=3e-4, show_default=True, type=float, help="peak learning rate (AdamW)")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--seq-len", default=128, show_default=True, type=click.IntRange(2),
              help="tokens per training window")
@click.option("--seed", default=0, show_default=True, help="seed of data order and every noise draw")
@click.option("--grad-clip", default=1.0, show_default=True, type=float, help="max grad norm (0: off)")
@click.option("--distill", is_flag=True, help="distil from the clean model (KL at --temperature)")
@click.option("--temperature", default=1.0, show_default=True, type=float, help="distillation temperature")
@click.option("--nat-noise", type=click.Choice(["gaussian", "chip"]), default="gaussian", show_default=True,
              help="nat only: W + sigma*max|W_row|*eps, or the chip's weight chain inside autograd")
@click.option("--nat-sigma", default=None, type=float, help="nat gaussian sigma [matched to the profile]")
@click.option("--save-every", default=50, show_default=True, type=click.IntRange(0),
              help="write the resumable state every N steps (0: only at the end)")
@click.option("--max-tokens", default=None, type=click.IntRange(16),
              help="token budget: use at most the first N training tokens [all]")
@click.option("--resume", is_flag=True, help="continue the run whose state is in OUT")
@click.option("--force", is_flag=True, help="write into a non-empty OUT")
@THREADS_OPTION
@device_options("dtype the model trains in (the written checkpoint keeps it)")
@JSON_OPTION
def finetune_cmd(model: str, profile: str, method: str, out: Path, dataset: str, steps: int, lr: float,
                 batch_size: int, seq_len: int, seed: int, grad_clip: float, distill: bool,
                 temperature: float, nat_noise: str, nat_sigma: float | None, save_every: int,
                 max_tokens: int | None, resume: bool, force: bool, threads: int | None, device: str,
                 dtype: str | None, as_json: bool) -> None:
    """Noise-aware fine-tuning of MODEL for the chip PROFILE; writes a HF checkpoint to OUT."""
    res = finetune(
        model, profile, method=method, out=out, data=dataset, steps=steps, lr=lr, batch_size=batch_size,
        seq_len=seq_len, seed=seed, grad_clip=grad_clip, distill=distill, temperature=temperature,
        resume=resume, nat_noise=nat_noise, nat_sigma=nat_sigma, save_every=save_every,
        max_tokens=max_tokens, threads=threads, force=force, progress=_progress(as_json), device=device,
        dtype=dtype,
    )
    res = {k: v for k, v in res.items() if k != "losses"} if not as_json else res
    emit(res, as_json, _format_finetune)


def _progress(as_json: bool) -> bool:
    """Whether a command shows progress on stderr: not with --json (its consumers read stdout only)."""
    return not as_json


class _StderrHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is at the time (pytest's capture swaps it per test)."""

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


@contextmanager
def _logging_to_stderr() -> Iterator[None]:
    """Route the ``cimconvert`` loggers to stderr (plain ``message`` lines) for one CLI run, then undo it."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    level, propagate = PACKAGE_LOGGER.level, PACKAGE_LOGGER.propagate
    PACKAGE_LOGGER.addHandler(handler)
    PACKAGE_LOGGER.setLevel(logging.INFO)
    PACKAGE_LOGGER.propagate = False
    try:
        yield
    finally:
        PACKAGE_LOGGER.removeHandler(handler)
        PACKAGE_LOGGER.setLevel(level)
        PACKAGE_LOGGER.propagate = propagate


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI; bad input is one line on stderr and exit code 2, never a traceback."""
    # transformers' load reports and kernel fallbacks are noise here: cimconvert checks keys itself.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # cimconvert draws its own progress; transformers' "Loading weights" bars would add stderr lines.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (in-process use): switch its bars off directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    with warnings.catch_warnings(record=True) as caught, _logging_to_stderr():
        code = _run(argv)
    if code != CimError.exit_code:  # a failed run says one line; a finished one shows its warnings too
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    if code:
        sys.exit(code)


def _run(argv: list[str] | None) -> int:
    """Run the click group; returns the exit code (errors printed as one ``error:`` line)."""
    try:
        cli.main(args=argv, prog_name="cimconvert", standalone_mode=False)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except CimError as exc:
        click.echo(f"error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:  # usage errors: one line too (``--help`` shows the usage)
        click.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
        return 2
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    main()
