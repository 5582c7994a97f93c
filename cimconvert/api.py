"""The public Python API: convert(), evaluate(), load_bundle(), inspect(), profiles().

``import cimconvert`` exposes these together with ``validate``, ``analyze`` and ``finetune`` (their own
modules, at this layer) as ``cimconvert.convert`` etc.

Every function returns plain, JSON-serialisable dicts with stable keys (docs/JSON.md) and raises
``CimError`` (one line) on bad input. The CLI only formats what these return.

The facade only calls down: helpers that lower layers need live in those layers and are re-exported
here (``is_bundle``, ``load_for_eval``, ``tokenize``, ``check_weights_finite``) so ``cimconvert.api.X``
keeps working.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from cimconvert.arch import get_adapter
from cimconvert.bundle.outdir import out_lock, tmp_path
from cimconvert.bundle.reader import inspect_bundle, is_bundle, model_from_bundle, read_manifest
from cimconvert.bundle.reader import load_bundle as read_bundle
from cimconvert.bundle.writer import check_out_dir, write_bundle
from cimconvert.checkpoint import check_weights_finite, has_tokenizer, resolve_model
from cimconvert.datasets import load_text, tokenize
from cimconvert.devices import describe, model_device, place_model, resolve_device, resolve_dtype, set_threads
from cimconvert.distributed import is_main_rank
from cimconvert.errors import BundleError, CimError, failure_detail
from cimconvert.evaluation.loading import load_for_eval
from cimconvert.evaluation.monte_carlo import evaluate_model
from cimconvert.layerwise import LayerwiseModel, evaluate_layerwise
from cimconvert.layerwise.memory import check_onnx_fits, layerwise_source, open_layerwise, use_layerwise_here
from cimconvert.methods import all_options
from cimconvert.methods.defaults import calibration_free
from cimconvert.onnx.export import export_bundle_onnx
from cimconvert.placement import Placement, plan_model, plan_tensors, replan_tensors
from cimconvert.profiles import ChipProfile, list_profiles, load_profile
from cimconvert.recipe import (
    Recipe,
    check_layerwise,
    load_recipe,
    method_recipe,
    recipe_label,
    recipe_of_manifest,
    resolve_recipe,
    run_recipe,
    run_recipe_layerwise,
)

__all__ = [
    "check_weights_finite",
    "convert",
    "default_out_dir",
    "evaluate",
    "inspect",
    "is_bundle",
    "load_bundle",
    "load_for_eval",
    "profiles",
    "recipe_of",
    "show_profile",
    "tokenize",
]


def profiles() -> list[dict[str, Any]]:
    """One row per shipped profile: name, description, content hash, tile shape, noise kinds."""
    return [
        {
            "name": p.name,
            "description": p.description,
            "content_hash": p.content_hash(),
            "tile": [p.mapping.tile_rows, p.mapping.tile_cols],
            "programming": p.programming.kind,
            "drift": p.drift.kind,
            "read_noise": p.read_noise.kind,
            "mvm": p.mvm.active,
            "digital_kinds": list(p.placement.digital),
        }
        for p in list_profiles()
    ]


def show_profile(spec: str) -> dict[str, Any]:
    """The fully resolved profile as a dict (defaults filled in) plus its content hash."""
    profile = load_profile(spec)
    return {**profile.model_dump(mode="json"), "content_hash": profile.content_hash()}


def default_out_dir(model: str, profile: ChipProfile) -> Path:
    """``./<model>-<profile>/`` with the model's last path component (a GGUF file without its suffix)
    and a filesystem-safe profile name."""
    path = Path(model.rstrip("/"))
    model_name = (path.stem if path.suffix.lower() == ".gguf" else path.name) or "model"
    safe_profile = re.sub(r"[^A-Za-z0-9_.=-]+", "_", profile.name).strip("_")
    return Path.cwd() / f"{model_name}-{safe_profile}"


def _plan(source: Any, adapter: Any, chip: ChipProfile, analog: Sequence[str], digital: Sequence[str]):
    return plan_tensors(source.tensor_shapes(), adapter, chip, analog=analog, digital=digital,
                        tied_lm_head=adapter.tied_embeddings(source.config))


def _dry_run_result(model: str, chip: ChipProfile, recipe: Recipe, placement: Any) -> dict[str, Any]:
    return {
        "dry_run": True,
        "model": model,
        "profile": chip.name,
        "profile_hash": chip.content_hash(),
        "method": recipe_label(recipe),
        "recipe": recipe.model_dump(mode="json"),
        "totals": placement.totals(),
        "tensors": placement.to_json(),
        "table": placement.format_table(),
    }


def _cast_to_source_dtype(net: torch.nn.Module, source: Any, keep: Sequence[str]) -> None:
    """Store the transformed model in the source's float dtype (a bf16 checkpoint stays bf16).

    Tensors a method created (``keep``, e.g. HPD's SVD factors) stay float32: rounding them would
    break the exact reconstruction of the layer they replace.
    """
    dtype = source.storage_dtype()
    if dtype is None:
        return
    kept = set(keep)
    for name, param in net.named_parameters():
        if name not in kept and param.is_floating_point():
            param.data = param.data.to(dtype)


def _save_transformed(net: torch.nn.Module, source: Any, folder: Path, keep: Sequence[str]) -> Any:
    """Save a transformed model as a checkpoint (plus the source's tokenizer files) and resolve it."""
    _cast_to_source_dtype(net, source, keep)
    net.save_pretrained(folder, safe_serialization=True)
    for name in source.aux_files:
        target = folder / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source.dir / name, target)
    return resolve_model(str(folder), check_shapes=False)


def _onnx_exporter(net_factory: Any, progress: bool) -> Any:
    """A ``write_bundle`` finalize hook that exports ``onnx/model.onnx`` from ``net_factory(folder,
    manifest)`` (the bundle folder being written and its manifest)."""

    def export(folder: Path, manifest: Any) -> dict[str, Any]:
        return {"onnx": export_bundle_onnx(folder, net_factory(folder, manifest), manifest, progress)["onnx"]}

    return export


def _created_tensors(net: torch.nn.Module, planned: Placement, result: Any) -> list[str]:
    """The parameters the steps created (HPD's factors) that they also named for a unit: these stay float32
    when the model is saved (a placement-only step naming an existing tensor does not change its dtype)."""
    known = {name for info in planned for name in (info.memory_name or info.name, info.name, *info.aliases)}
    named = {*result.analog, *result.digital}
    return [name for name, _ in net.named_parameters() if name not in known and name in named]


@contextlib.contextmanager
def _scratch_beside(out_dir: Path) -> Iterator[Path]:
    """A temporary folder ``.OUT.src-<pid>-*`` beside OUT, removed afterwards (a transformed checkpoint)."""
    with tempfile.TemporaryDirectory(prefix=f"{tmp_path(out_dir, 'src').name}-", dir=out_dir.parent) as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def _writing_beside(out_dir: Path, what: str) -> Iterator[None]:
    """An OSError or SafetensorError inside the block (a full disk): one BundleError naming ``what``."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"writing {what} beside {out_dir} failed: {failure_detail(exc)}") from None


def _replanned(stepped: Placement, bundled: Any, adapter: Any, chip: ChipProfile) -> Placement:
    """The placement of the checkpoint a recipe left (``replan_tensors``: every tensor keeps ``stepped``'s
    unit)."""
    return replan_tensors(stepped, bundled.tensor_shapes(), adapter, chip,
                          tied_lm_head=adapter.tied_embeddings(bundled.config))  # fmt: skip


def _write_stepped(bundled: Any, source: Any, out_dir: Path, chip: ChipProfile, placement: Placement,
                   result: Any, extra: dict[str, Any], hook: Any, opts: dict[str, Any]) -> Any:  # fmt: skip
    """Write the bundle of the checkpoint a recipe left (``origin``: the source) with the recipe's
    transforms and seeds."""
    return write_bundle(bundled, out_dir, chip, placement, transforms=result.transforms,
                        seeds={"global": opts["seed"], **result.seeds}, extra=extra, force=opts["force"],
                        progress=opts["progress"], origin=source, finalize=hook, key=opts["key"],
                        recipe=opts["recipe"])  # fmt: skip


def _bundle_transformed(
    net: torch.nn.Module,
    result: Any,
    source: Any,
    out_dir: Path,
    chip: ChipProfile,
    adapter: Any,
    placements: tuple[Placement, Placement],
    extra: dict[str, Any],
    opts: dict[str, Any],
) -> tuple[Any, Any]:
    """Save a recipe's transformed model to ``.OUT.src-<pid>-*`` beside OUT and bundle it from there;
    returns (BundleSummary, placement). ``placements``: the source's plan and the placement after the last
    step, which every tensor keeps (see ``replan_tensors``). A full disk while saving is a one-line
    BundleError."""
    planned, stepped = placements
    extra["method_report"] = result.report
    with _scratch_beside(out_dir) as tmp:
        with _writing_beside(out_dir, "the transformed model"):
            transformed = _save_transformed(net, source, tmp, keep=_created_tensors(net, planned, result))
        placement = _replanned(stepped, transformed, adapter, chip)
        # the ONNX graph is exported from the model as load_bundle gives it
        exported = _onnx_exporter(lambda folder, manifest: net.float(), opts["progress"])
        hook = exported if opts["onnx"] else None
        summary = _write_stepped(transformed, source, out_dir, chip, placement, result, extra, hook, opts)
    return summary, placement


def _given_recipe(
    recipe: str | Path | Recipe | None, method: str, method_options: dict[str, Any] | None
) -> Recipe | None:
    """The recipe passed to :func:`convert` (a file is loaded and checked), refused together with an
    explicit method other than ``auto`` or with method options."""
    if recipe is None:
        return None
    if method != "auto":
        raise CimError(f"--recipe cannot be combined with --method {method} (the recipe names its steps)")
    if method_options:
        flags = ", ".join("--" + name.replace("_", "-") for name in sorted(method_options))
        raise CimError(f"--recipe cannot be combined with method options ({flags}): set them in the recipe")
    return recipe if isinstance(recipe, Recipe) else load_recipe(recipe)


def _without_calibration(recipe: Recipe, model: str) -> tuple[Recipe, list[str]]:
    """The ``auto`` recipe without the steps that need calibration text, for a checkpoint that has no
    tokenizer (a one-line warning names what was skipped)."""
    kept, dropped = calibration_free([step.model_dump(exclude_none=True) for step in recipe.steps])
    if dropped:
        warnings.warn(f"{model} has no tokenizer: --method auto skips {', '.join(dropped)} (they fit on "
                      "calibration text)", stacklevel=4)  # fmt: skip
    return Recipe.model_validate({"steps": kept}), dropped


def _check_method_options(method_options: dict[str, Any] | None) -> None:
    """Every given method option must be declared by some registered method (one-line CimError naming it)."""
    known = {opt.name for opt in all_options()}
    unknown = sorted(set(method_options or {}) - known)
    if unknown:
        flags = ", ".join(f"'{name}'" for name in unknown)
        raise CimError(f"unknown method option {flags} (options: {', '.join(sorted(known))})")


def _in_memory_label(net: torch.nn.Module) -> str:
    """How the manifest names an in-memory model: ``in-memory:<its name_or_path or class>``."""
    name = getattr(net, "name_or_path", "") or getattr(getattr(net, "config", None), "_name_or_path", "")
    return f"in-memory:{name or type(net).__name__}"


@contextlib.contextmanager
def _saved_in_memory(net: torch.nn.Module, tokenizer: Any) -> Iterator[Path]:
    """An in-memory Hugging Face model (and its tokenizer) saved to a temporary checkpoint folder."""
    if not hasattr(net, "save_pretrained") or getattr(net, "config", None) is None:
        kind = type(net).__name__
        raise CimError(f"an in-memory model must be a Hugging Face PreTrainedModel (got {kind})")
    with tempfile.TemporaryDirectory(prefix="cimconvert-in-memory-") as tmp:
        folder = Path(tmp)
        try:
            net.save_pretrained(folder, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise CimError(f"saving the in-memory model failed: {failure_detail(exc)}") from None
        yield folder


def _run_steps(
    source: Any, compute: tuple[torch.device, torch.dtype], adapter: Any, chip: ChipProfile, resolved: Recipe,
    placement: Placement, progress: bool,
) -> tuple[torch.nn.Module, Any, Placement]:
    """Load the source model, run the recipe's steps on ``compute`` (device, dtype); the model comes back
    on the CPU. Under a torchrun launch every rank runs this (the steps share their noise draws)."""
    net = check_weights_finite(source.load_model(dtype=torch.float32))
    place_model(net, *compute)
    result, stepped = run_recipe(net, adapter, chip, resolved, placement, progress)
    place_model(net, torch.device("cpu"), None)  # saved and exported from the CPU
    return net, result, stepped


def convert(
    model: str | Path | torch.nn.Module,
    profile: str | ChipProfile,
    out: str | Path | None = None,
    method: str = "auto",
    analog: Sequence[str] = (),
    digital: Sequence[str] = (),
    dry_run: bool = False,
    force: bool = False,
    seed: int = 0,
    progress: bool = True,
    method_options: dict[str, Any] | None = None,
    onnx: bool = True,
    dtype: str | None = None,
    key: bytes | str | None = None,
    recipe: str | Path | Recipe | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    layerwise: bool | str = "auto",
) -> dict[str, Any]:
    """Convert a checkpoint into a bundle for ``profile`` (or only plan it with ``dry_run``).

    ``model`` is a checkpoint folder, a ``.gguf`` file, a cached hub id, or an in-memory Hugging Face
    model (``nn.Module`` with ``save_pretrained``; pass its ``tokenizer`` too, which calibrating methods
    and ``evaluate`` need): that one is saved to a temporary checkpoint first and the manifest names it
    ``in-memory:<name_or_path>``. ``method_options`` unknown to every method are a one-line CimError.

    A conversion runs a recipe (docs/RECIPES.md): ``recipe`` (a YAML/JSON file or a :class:`Recipe`), or
    ``method`` as one (a method name with its ``method_options`` → one step; ``none`` → no step; ``auto``
    → the family's default steps, e.g. ROMER for MoE and HPD for SSM models). With steps, the model is
    loaded, transformed in place step by step, saved to a temporary checkpoint beside OUT and bundled from
    there; the manifest names the original checkpoint as its source and records the resolved recipe and
    the steps' transforms and seeds. Without steps the checkpoint is streamed, never materialised.
    ``onnx`` also writes ``onnx/model.onnx`` (analog matmuls as ``ai.cimconvert.AnalogMatMul`` nodes).
    ``model`` may be a GGUF file, dequantised to ``dtype`` first (see :mod:`cimconvert.gguf`).
    ``device`` / ``dtype``: where and in what the recipe's steps (calibration) run (default: the CPU,
    float32); the bundle stores the source's dtype whatever ``dtype`` is. Under a ``torchrun`` launch
    every rank runs the steps (ROMER shares its calibration draws out over the ranks) and rank 0 alone
    locks and writes OUT.
    OUT is locked against other writers for the whole run; leftovers of killed runs on OUT are removed
    first and listed under ``recovered``. ``key`` (or ``$CIMCONVERT_SIGNING_KEY``) signs ``bundle.lock``.
    ``layerwise`` (True, False or ``"auto"``: when the float32 model exceeds half the available memory)
    runs the steps one decoder layer at a time in float32 on ``device`` (:mod:`cimconvert.layerwise`;
    ROMER; one process, not under ``torchrun``) and streams the
    checkpoint into the bundle with their transforms. ``onnx`` on a model whose export would not fit in
    memory is refused before anything is written (use ``onnx=False``).
    """
    where = resolve_device(device)
    compute = (where, resolve_dtype(dtype, where))
    options = dict(
        out=out, method=method, analog=analog, digital=digital, dry_run=dry_run, force=force, seed=seed,
        progress=progress, method_options=method_options, onnx=onnx, dtype=dtype, key=key, recipe=recipe,
        compute=compute, layerwise=layerwise,
    )
    _check_method_options(method_options)
    if isinstance(model, torch.nn.Module):
        label = _in_memory_label(model)
        with _saved_in_memory(model, tokenizer) as folder:
            return _convert(str(folder), profile, label=label, **options)
    return _convert(str(model), profile, label=str(model), **options)


def _convert(
    model: str,
    profile: str | ChipProfile,
    label: str,
    out: str | Path | None,
    method: str,
    analog: Sequence[str],
    digital: Sequence[str],
    dry_run: bool,
    force: bool,
    seed: int,
    progress: bool,
    method_options: dict[str, Any] | None,
    onnx: bool,
    dtype: str | None,
    key: bytes | str | None,
    recipe: str | Path | Recipe | None,
    compute: tuple[torch.device, torch.dtype],
    layerwise: bool | str,
) -> dict[str, Any]:
    """:func:`convert` of a checkpoint on disk; ``label`` is what the manifest and result call the model;
    ``compute``: the (device, dtype) the recipe's steps run on."""
    chip = load_profile(profile)
    given = _given_recipe(recipe, method, method_options)
    source = resolve_model(model, dtype=dtype, progress=progress)
    source.model_id = label
    if label != model:  # an in-memory model: its temporary folder is not worth recording
        source.recorded_path = label
    adapter = get_adapter(source.model_type)
    chosen = given or method_recipe(method, dict(method_options or {}), adapter.family)
    skipped: list[str] = []
    if given is None and method == "auto" and not has_tokenizer(source.dir):
        chosen, skipped = _without_calibration(chosen, label)
    resolved = resolve_recipe(chosen, source.model_type, adapter.family, seed)
    placement = _plan(source, adapter, chip, analog, digital)
    if dry_run:  # plan only: the steps (and any tensors they add) run at conversion time
        return _dry_run_result(label, chip, resolved, placement)
    if onnx:
        check_onnx_fits(source, label)
    by_layer = bool(resolved.steps) and use_layerwise_here(layerwise, source)
    if by_layer:
        check_layerwise(resolved)
    out_dir = Path(out) if out is not None else default_out_dir(label.removeprefix("in-memory:"), chip)
    # The steps get the placement itself (e.g. ROMER calibrates with an analog router noisy), not the
    # patterns: they are recorded once, in placement_config.overrides.
    extra: dict[str, Any] = {"method": recipe_label(resolved)}
    if skipped:
        extra["auto_skipped"] = skipped
    recorded = resolved.model_dump(mode="json")
    if not is_main_rank():  # another rank of a torchrun launch: its share of the steps' draws, no writing
        if resolved.steps:
            _run_steps(source, compute, adapter, chip, resolved, placement, progress=False)
        return {"dry_run": False, "model": label, "out": str(out_dir), "written": False}
    with out_lock(out_dir) as lock:  # one writer per OUT, from here to the final rename
        check_out_dir(out_dir, force)  # fail before any expensive work
        if by_layer:
            summary, report, transform_types, placement = _convert_layerwise(
                source, (chip, compute[0]), resolved, placement, out_dir, extra,
                dict(seed=seed, force=force, progress=progress, onnx=onnx, key=key, recipe=recorded),
            )
        elif not resolved.steps:
            hook = _onnx_exporter(lambda folder, manifest: source.load_model(dtype=torch.float32),
                                  progress) if onnx else None  # fmt: skip
            summary = write_bundle(source, out_dir, chip, placement, seeds={"global": seed}, extra=extra,
                                   force=force, progress=progress, finalize=hook, key=key, recipe=recorded)
            report: dict[str, Any] = {}
            transform_types: list[str] = []
        else:
            net, result, stepped = _run_steps(source, compute, adapter, chip, resolved, placement, progress)
            report = result.report
            transform_types = [t["type"] for t in result.transforms]
            summary, placement = _bundle_transformed(
                net, result, source, out_dir, chip, adapter, (placement, stepped), extra,
                dict(seed=seed, force=force, progress=progress, onnx=onnx, key=key, recipe=recorded),
            )
    return {
        "dry_run": False,
        "model": label,
        "out": str(out_dir),
        "profile": chip.name,
        "profile_hash": chip.content_hash(),
        "method": recipe_label(resolved),
        "recipe": recorded,
        "seed": seed,
        "totals": summary.totals,
        "placement_totals": placement.totals(),
        "transforms": transform_types,
        "method_report": report,
        "files": summary.files,
        "recovered": lock.recovered,
        "auto_skipped": skipped,
        "layer_by_layer": by_layer,
    }


def _convert_layerwise(
    source: Any, target: tuple[ChipProfile, torch.device], resolved: Recipe, placement: Placement,
    out_dir: Path, extra: dict[str, Any], opts: dict[str, Any],
) -> tuple[Any, dict[str, Any], list[str], Placement]:  # fmt: skip
    """Run the recipe layer by layer (float32 on the device of ``target``) and write the bundle; returns
    (BundleSummary, method report, transform types, placement). Steps that only record transforms (ROMER)
    stream the source checkpoint into OUT; steps that change weights leave a transformed copy, written
    layer by layer beside OUT (``.OUT.src-<pid>-*``, removed afterwards), which is bundled instead."""
    chip, device = target
    lw = LayerwiseModel.open(source, device)
    with _scratch_beside(out_dir) as tmp:
        with _writing_beside(out_dir, "the transformed layers"):
            run = run_recipe_layerwise(lw, chip, resolved, placement, opts["progress"], scratch=tmp)
        result, bundled = run.result, run.checkpoint or source
        extra.update(method_report=result.report, layer_by_layer=True)
        if run.checkpoint is not None or result.analog or result.digital:  # as the steps left it
            placement = _replanned(run.placement, bundled, lw.adapter, chip)
        # the ONNX graph is exported from the bundle being written, as load_bundle gives it
        hook = _onnx_exporter(model_from_bundle, opts["progress"]) if opts["onnx"] else None
        summary = _write_stepped(bundled, source, out_dir, chip, placement, result, extra, hook, opts)
    return summary, result.report, [t["type"] for t in result.transforms], placement


def recipe_of(out: str | Path) -> dict[str, Any]:
    """The recipe a bundle was converted with (``manifest.recipe``: steps with every option and seed,
    family, model_type), to write out and replay with ``convert(..., recipe=...)``. For a bundle written
    before recipes existed it is rebuilt from ``extra.method`` / ``extra.method_options``."""
    manifest = read_manifest(Path(out))
    try:
        return recipe_of_manifest(manifest).model_dump(mode="json")
    except CimError as exc:
        raise BundleError(f"bundle {out}: {exc}") from None


def load_bundle(out: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True) -> torch.nn.Module:
    """Load a bundle as a torch model (checksums verified), with every recorded transform applied."""
    return read_bundle(Path(out), dtype=dtype, verify=verify)


def inspect(out: str | Path, key: bytes | str | None = None) -> dict[str, Any]:
    """Summary of a bundle plus ``verified`` (all checksums match) and ``problems``; with a signing
    ``key`` (or ``$CIMCONVERT_SIGNING_KEY``) its bundle.lock signature must match too. Also the deployment
    report's figures: ``deployment`` (arrays, per-token counts, cost estimates), ``steps``, ``warnings``
    (docs/JSON.md)."""
    return inspect_bundle(Path(out), key=key)


def _in_memory_for_eval(
    net: torch.nn.Module, tokenizer: Any, profile: str | ChipProfile | None
) -> tuple[torch.nn.Module, Any, list[Any], ChipProfile]:
    """(model, tokenizer, analog targets, profile) of an in-memory model: planned under ``profile``."""
    if tokenizer is None:
        raise CimError("evaluating an in-memory model needs its tokenizer (tokenizer=...)")
    if profile is None:
        raise CimError("evaluating an in-memory model needs a profile")
    chip = load_profile(profile)
    check_weights_finite(net)
    return net.eval(), tokenizer, plan_model(net, chip).analog(), chip


def evaluate(
    model: str | Path | torch.nn.Module,
    profile: str | ChipProfile | None,
    seeds: int = 5,
    seed: int = 1000,
    dataset: str = "heldout",
    max_tokens: int = 4096,
    seq_len: int = 256,
    stride: int | None = None,
    batch_size: int = 8,
    threads: int | None = None,
    progress: bool = True,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    layerwise: bool | str = "auto",
) -> dict[str, Any]:
    """Clean perplexity and perplexity under ``seeds`` chip-noise draws (seed, seed+1, ...).

    ``model``: a checkpoint folder, hub id or bundle, or an in-memory Hugging Face model with its
    ``tokenizer`` (its analog tensors planned under ``profile``; each draw is undone bit-exactly).
    ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto``) and ``dtype`` (``float32``, ``bfloat16``,
    ``float16``): where and in what the model runs (the simulator computes in float32 on that device);
    an in-memory model stays where and as it is unless they are given. Under a ``torchrun`` launch the
    draws are shared out over the ranks (README, "Large models and clusters"); every rank returns the same
    result. ``layerwise`` (True, False or ``"auto"``: when the float32 checkpoint exceeds half the
    available memory) evaluates a checkpoint one decoder layer at a time on ``device``, in float32
    (:mod:`cimconvert.layerwise`), with the same numbers; bundles and in-memory models are evaluated whole.
    """
    set_threads(threads)
    where = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, where)
    text = load_text(dataset)
    lw = None
    if isinstance(model, torch.nn.Module):
        net, tokenizer, targets, chip = _in_memory_for_eval(model, tokenizer, profile)
        place_model(net, where if device is not None else None, torch_dtype if dtype is not None else None)
        label = _in_memory_label(model)
    else:
        label = str(model)
        source, by_layer = layerwise_source(label, profile, layerwise)
        if by_layer:
            lw, chip, tokenizer = open_layerwise(source, profile, where)
            net, targets = lw.model, plan_model(lw.model, chip).analog()
        else:
            net, tokenizer, targets, chip = load_for_eval(label, profile, where, torch_dtype, source=source)
    tokens = tokenize(tokenizer, text, max_tokens)
    max_pos = getattr(net.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise CimError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings {max_pos}")
    run = dict(seeds=range(seed, seed + seeds), seq_len=seq_len, stride=stride, batch_size=batch_size,
               progress=progress)  # fmt: skip
    if lw is not None:
        result = evaluate_layerwise(lw, tokens, targets, chip, **run).check_finite()
    else:
        result = evaluate_model(net, tokens, targets, chip, **run).check_finite()
    return {
        "model": label,
        "dataset": dataset,
        "tokens": int(tokens.numel()),
        "seq_len": seq_len,
        "stride": stride or seq_len,
        "layer_by_layer": lw is not None,
        **describe(model_device(net), next(net.parameters()).dtype),
        **result.to_dict(),
    }
