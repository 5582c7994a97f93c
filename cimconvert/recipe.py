"""Recipes: a conversion as an ordered list of steps, each a registered method with its options and seed.

A recipe (docs/RECIPES.md) is data: ``{schema_version, family, model_type, steps: [{step, options, seed}]}``
(the pydantic :class:`Recipe` of ``bundle.manifest``, which the manifest records fully resolved).
:func:`load_recipe` reads one from YAML or JSON and checks it against the method registry;
:func:`method_recipe` turns ``--method X`` (with its options) into a one-step recipe, ``none`` into the
empty one and ``auto`` into the family's default steps (``methods.AUTO``); :func:`resolve_recipe` checks
the architecture and fills in every default and seed; :func:`run_recipe` runs the steps in order on one
in-memory model. Methods never call each other: this module is the only thing that sequences them. Step k
gets the placement of the model as steps 1..k-1 left it (``placement.replan_model``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from cimconvert.arch import get_adapter
from cimconvert.bundle.manifest import Manifest, Recipe, RecipeStep
from cimconvert.checkpoint import SourceCheckpoint
from cimconvert.errors import CimError, failure_detail
from cimconvert.layerwise.save import LayerCheckpointWriter
from cimconvert.layerwise.steps import run_layer_steps
from cimconvert.methods import (
    LAYERWISE,
    METHODS,
    MethodResult,
    auto_steps,
    check_family,
    option_values,
    unknown_method,
)
from cimconvert.placement import Placement, replan_model
from cimconvert.profiles import ChipProfile
from cimconvert.profiles.loader import parse_yaml

__all__ = [
    "Recipe",
    "RecipeStep",
    "check_recipe",
    "dump_recipe",
    "load_recipe",
    "method_recipe",
    "recipe_label",
    "recipe_of_manifest",
    "resolve_recipe",
    "run_recipe",
]


# ------------------------------------------------------------------------------------ reading, writing
def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML or JSON; safe YAML without anchors, aliases or tags, size-limited, as for
    profiles) and check it against the method registry.

    Any problem (missing file, bad YAML, unknown field, step or option, a value of the wrong type or out of
    range) is a one-line CimError naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise CimError(f"recipe file not found: {file}")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CimError(f"recipe {file}: cannot read ({failure_detail(exc)})") from None
    data = parse_yaml(text, f"recipe {file}")
    return check_recipe(recipe_from_data(data, str(file)))


def recipe_from_data(data: Any, origin: str = "recipe") -> Recipe:
    """Validate plain data (a parsed file, a manifest's ``recipe``) as a :class:`Recipe` (one-line errors)."""
    if not isinstance(data, dict):
        raise CimError(f"{origin}: a recipe is a mapping with 'steps' (got {type(data).__name__})")
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise CimError(f"{origin}: field '{field}': {err['msg']}") from None


def recipe_of_manifest(manifest: Manifest) -> Recipe:
    """The recipe a bundle was converted with: ``manifest.recipe``, or for a bundle written before recipes
    existed the one-step (or empty) recipe rebuilt from ``extra.method`` / ``extra.method_options``.
    CimError when the manifest records neither."""
    if manifest.recipe is not None:
        return manifest.recipe
    method = manifest.extra.get("method")
    if not isinstance(method, str):
        raise CimError("the bundle records no recipe and no method")
    family = get_adapter(manifest.source.model_type).family
    model_type = manifest.source.model_type
    if method == "none":
        return Recipe(family=family, model_type=model_type, steps=[])
    options = dict(manifest.extra.get("method_options") or {})
    seed = options.pop("seed", manifest.seeds.get("global"))
    step = RecipeStep(step=method, options=options, seed=seed if isinstance(seed, int) else None)
    return Recipe(family=family, model_type=model_type, steps=[step])


def dump_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` to ``path``: JSON for a ``.json`` suffix, YAML otherwise."""
    file = Path(path)
    try:
        file.write_text(recipe_text(recipe, as_json=file.suffix.lower() == ".json"), encoding="utf-8")
    except OSError as exc:
        raise CimError(f"cannot write recipe {file} ({failure_detail(exc)})") from None
    return file


def recipe_text(recipe: Recipe, as_json: bool = False) -> str:
    """``recipe`` as YAML (or indented JSON) text, steps in order, ending with a newline."""
    data = recipe.model_dump(mode="json")
    if as_json:
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


# ------------------------------------------------------------------------------------------ checking
def _where(index: int, step: str) -> str:
    """How errors name a step: ``recipe step 2 (keep_digital)`` (steps count from 1)."""
    return f"recipe step {index} ({step})"


def checked_options(step: RecipeStep, index: int) -> dict[str, Any]:
    """The step's given options, each checked against its method's declared options (unknown step or
    option, wrong type, value out of range or not among the choices: one-line CimError)."""
    if step.step not in METHODS:
        raise unknown_method(step.step, "recipe step")
    declared = {opt.name: opt for opt in METHODS[step.step].options}
    where = _where(index, step.step)
    for name in step.options:
        if name not in declared:
            known = ", ".join(sorted(declared)) or "none"
            raise CimError(f"{where}: unknown option '{name}' (options: {known})")
    return {name: declared[name].check(value, where) for name, value in step.options.items()}


def check_recipe(recipe: Recipe) -> Recipe:
    """``recipe`` after checking every step and option against the registry (see :func:`checked_options`)."""
    for index, step in enumerate(recipe.steps, 1):
        checked_options(step, index)
    return recipe


def _jsonable(value: Any) -> Any:
    """Tuples (multiple-valued options) as lists, so a recipe reads back equal from JSON/YAML."""
    return list(value) if isinstance(value, tuple) else value


def resolve_recipe(recipe: Recipe, model_type: str, family: str, seed: int) -> Recipe:
    """The recipe as a conversion records it: made for this architecture (a recorded ``model_type`` or
    ``family`` that differs from the model's is a CimError), every step applicable to ``family``, every
    option with its default filled in, every seed resolved (unset: the conversion's ``seed``)."""
    if recipe.model_type is not None and recipe.model_type != model_type:
        raise CimError(f"the recipe was made for model_type '{recipe.model_type}', not for '{model_type}'")
    if recipe.family is not None and recipe.family != family:
        raise CimError(f"the recipe was made for {recipe.family} models, not for a {family} model")
    steps = []
    for index, step in enumerate(recipe.steps, 1):
        given = checked_options(step, index)
        check_family(step.step, family, _where(index, step.step))
        options = {name: _jsonable(value) for name, value in option_values(step.step, given).items()}
        step_seed = seed if step.seed is None else step.seed
        steps.append(RecipeStep(step=step.step, options=options, seed=step_seed))
    return Recipe(family=family, model_type=model_type, steps=steps)


def method_recipe(method: str, options: dict[str, Any], family: str) -> Recipe:
    """``--method`` as a recipe: ``none`` → no step; ``auto`` → the family's default steps; a method name →
    that one step. Each step takes the entries of ``options`` (the method flags given) that belong to its
    method, over the default recipe's own options; the others are ignored."""
    if method == "none":
        return Recipe(steps=[])
    if method == "auto":
        steps = auto_steps(family)
    elif method in METHODS:
        steps = [{"step": method}]
    else:
        raise unknown_method(method)
    return Recipe(steps=[_with_given(RecipeStep.model_validate(step), options) for step in steps])


def _with_given(step: RecipeStep, options: dict[str, Any]) -> RecipeStep:
    """``step`` with the entries of ``options`` that its method declares set (over its own options)."""
    if step.step not in METHODS:
        raise unknown_method(step.step, "recipe step")
    declared = {opt.name for opt in METHODS[step.step].options}
    given = {name: _jsonable(value) for name, value in options.items() if name in declared}
    return step.model_copy(update={"options": {**step.options, **given}})


def recipe_label(recipe: Recipe) -> str:
    """A short name of what a recipe runs: ``none``, ``hpd`` or ``hpd+keep_digital``."""
    return "+".join(step.step for step in recipe.steps) or "none"


# ------------------------------------------------------------------------------------------- running
@contextmanager
def _naming_step(where: str) -> Iterator[None]:
    """Bad input inside a step becomes one line that names the step."""
    try:
        yield
    except CimError as exc:
        raise CimError(f"{where}: {exc}") from None


def _merge(combined: MethodResult, result: MethodResult, key: str) -> None:
    """Add one step's result to the combined one (a seed name already taken gets ``@<step>``)."""
    combined.transforms.extend(result.transforms)
    for name, value in result.seeds.items():
        combined.seeds[name if name not in combined.seeds else f"{name}@{key}"] = value
    combined.report[key] = result.report
    combined.analog.extend(result.analog)
    combined.digital.extend(result.digital)


def check_layerwise(recipe: Recipe) -> None:
    """CimError unless every step of ``recipe`` has a layer-by-layer implementation."""
    for index, step in enumerate(recipe.steps, 1):
        if step.step not in LAYERWISE:
            supported = ", ".join(sorted(LAYERWISE)) or "none"
            raise CimError(
                f"{_where(index, step.step)} has no layer-by-layer implementation (layer by layer: "
                f"{supported}); convert with --whole-model on a machine where the model fits in memory"
            )


@dataclass
class LayerwiseRun:
    """A recipe run layer by layer: the combined result, the placement after the last step (in-memory
    names) and, when a step changed weights or structure, the transformed checkpoint to bundle."""

    result: MethodResult
    placement: Placement
    checkpoint: SourceCheckpoint | None = None


def run_recipe_layerwise(
    lw: Any, chip: ChipProfile, recipe: Recipe, placement: Placement, progress: bool = True,
    scratch: Path | None = None,
) -> LayerwiseRun:  # fmt: skip
    """Run a resolved recipe on a model executed layer by layer (``cimconvert.layerwise.LayerwiseModel``):
    every step in one pass over the decoder layers (:mod:`cimconvert.layerwise.steps`).

    Steps that change weights or structure (outlier splits, folded gains) get each layer saved, as they
    left it, into ``scratch/checkpoint`` (:mod:`cimconvert.layerwise.save`; ``scratch/working`` holds the
    transformed layer's working copy during its draws); with steps that only record transforms (ROMER) the
    weights stay the checkpoint's and no copy is written.
    """
    check_layerwise(recipe)
    steps = []
    for index, step in enumerate(recipe.steps, 1):
        # model_changed: a step that scans the model before the pass (a quick scan) would scan it unchanged
        options = {**option_values(step.step, checked_options(step, index)),
                   "seed": 0 if step.seed is None else step.seed,
                   "model_changed": any(s.changes_weights for s in steps)}  # fmt: skip
        with _naming_step(_where(index, step.step)):
            steps.append(LAYERWISE[step.step](lw, chip, options, placement=placement))
    writer, working = None, None
    if any(step.changes_weights for step in steps):
        if scratch is None:
            raise ValueError("these steps change weights: pass a scratch folder for the transformed layers")
        writer, working = LayerCheckpointWriter(lw, scratch / "checkpoint"), scratch / "working"
        working.mkdir(parents=True, exist_ok=True)
    save = writer.add_layer if writer is not None else None
    results, final = run_layer_steps(lw, chip, steps, placement, progress=progress, save=save,
                                     scratch=working)  # fmt: skip
    combined = MethodResult()
    for index, (step, result) in enumerate(zip(recipe.steps, results, strict=True), 1):
        _merge(combined, result, f"{index}:{step.step}")
    return LayerwiseRun(combined, final, writer.finish() if writer is not None else None)


def run_recipe(
    model: torch.nn.Module,
    adapter: Any,
    chip: ChipProfile,
    recipe: Recipe,
    placement: Placement,
    progress: bool = True,
) -> tuple[MethodResult, Placement]:
    """Run the steps of a resolved recipe (:func:`resolve_recipe`) in order on ``model`` (in place).

    Each step gets its options (defaults filled in), its seed as ``options["seed"]`` and the placement of
    the model as the previous steps left it; after each step the placement is extended with the tensors it
    created and its ``analog``/``digital`` patterns (``placement.replan_model``). Returns one combined
    :class:`MethodResult` (transforms in order, seeds, report per step keyed ``"<index>:<step>"``, every
    step's patterns) and the placement after the last step (in-memory names).
    """
    combined = MethodResult()
    for index, step in enumerate(recipe.steps, 1):
        where = _where(index, step.step)
        options = {**option_values(step.step, checked_options(step, index)),
                   "seed": 0 if step.seed is None else step.seed}  # fmt: skip
        with _naming_step(where):
            result = METHODS[step.step].apply(model, adapter, chip, options, progress=progress,
                                              placement=placement)  # fmt: skip
            placement = replan_model(model, placement, chip, result.analog, result.digital)
        _merge(combined, result, f"{index}:{step.step}")
    return combined, placement
