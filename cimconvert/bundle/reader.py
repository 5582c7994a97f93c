"""Read a bundle back: manifest, checksum verification, summary, and loading as a torch model.

Later transforms (ROMER router calibration, HPD split, ...) record an entry in ``manifest.transforms``;
their loaders are listed in :data:`cimconvert.transforms.TRANSFORM_LOADERS` under the entry's ``type`` and
are called in manifest order on the loaded model. A bundle naming a transform type that has no loader is
refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from cimconvert.arch import get_adapter
from cimconvert.arch.loading import read_config_dict
from cimconvert.bundle.costs import TENSOR_COUNT, deployment_figures
from cimconvert.bundle.integrity import LOCK_NAME, member_path, signing_key, verified_manifest_bytes
from cimconvert.bundle.manifest import MANIFEST_NAME, Manifest, TransformEntry
from cimconvert.bundle.quantization import check_format_version
from cimconvert.bundle.report import step_outcomes
from cimconvert.checkpoint import load_hf_model, sha256_file
from cimconvert.errors import BundleError, ModelInputError, failure_detail
from cimconvert.placement import Placement
from cimconvert.profiles import ChipProfile, profile_from_dict
from cimconvert.transforms import TRANSFORM_KEY_CHANGES, TRANSFORM_LOADERS


def is_bundle(path: str | Path) -> bool:
    """True when ``path`` is a folder holding a cimconvert manifest."""
    return (Path(path) / MANIFEST_NAME).is_file()


def expected_key_changes(manifest: Manifest) -> tuple[list[str], list[str]]:
    """Keys a stock ``from_pretrained`` of the bundle will miss / not expect, because transforms own them."""
    missing: list[str] = []
    unexpected: list[str] = []
    for entry in manifest.transforms:
        changes = TRANSFORM_KEY_CHANGES.get(entry.type)
        if changes is not None:
            gone, added = _run_transform(entry, changes, entry.params)
            missing += gone
            unexpected += added
    return missing, unexpected


def read_manifest(out: str | Path, key: bytes | str | None = None) -> Manifest:
    """Parse and validate ``OUT/manifest.json`` after checking it against ``bundle.lock``.

    The manifest's bytes must match the lock's sha256 (and its HMAC when a signing key is given or set
    in the environment) and every file it names must lie inside the bundle. BundleError (one line) when
    the bundle is absent, altered or invalid.
    """
    return _read_locked(Path(out), key)[0]


def _read_locked(folder: Path, key: bytes | str | None) -> tuple[Manifest, dict[str, Any]]:
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise BundleError(f"bundle folder not found: {folder}")
    if not path.is_file():
        raise BundleError(f"{folder} is not a cimconvert bundle (no {MANIFEST_NAME})")
    data, lock = verified_manifest_bytes(folder, key)
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise BundleError(f"{path} is not valid JSON") from None
    if isinstance(raw, dict) and "schema_version" in raw:
        check_format_version(raw["schema_version"], str(path))
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        raise BundleError(f"{path}: field '{field}': {err['msg']}") from None
    check_manifest_paths(folder, manifest)
    return manifest, lock


def check_manifest_paths(folder: Path, manifest: Manifest) -> None:
    """Every file the manifest names lies inside the bundle; shards and the scales file are listed."""
    listed: set[str] = set()
    for entry in manifest.files:
        member_path(folder, entry.name)
        if entry.name in listed or entry.name in (MANIFEST_NAME, LOCK_NAME):
            raise BundleError(f"manifest lists {entry.name!r} twice or lists itself")
        listed.add(entry.name)
    named = [(t.shard, "shard") for t in manifest.tensors]
    if manifest.scales_file is not None:
        named.append((manifest.scales_file, "scales file"))
    for name, what in named:
        member_path(folder, name, what)
        if name not in listed:
            raise BundleError(f"manifest {what} {name!r} is not among its checksummed files")


def manifest_profile(manifest: Manifest) -> ChipProfile:
    """The chip profile a bundle was converted for (its full content is stored in the manifest)."""
    return profile_from_dict(dict(manifest.profile.profile), origin="manifest.json")


def placement_from_manifest(manifest: Manifest) -> Placement:
    """The placement a bundle was written with, read back from ``manifest.tensors`` (on-disk names).

    This is the one reader of a bundle's placement: every consumer of a bundle (eval, ONNX export,
    validation, fine-tuning, analysis) takes the units from here instead of re-applying the rules.
    ``memory_name`` is the in-memory parameter each key loads into (the bundle's architecture adapter);
    ``placement.model_placement`` maps the result onto a loaded model.
    """
    adapter = get_adapter(manifest.source.model_type)
    infos = [entry.placement_info(adapter.memory_name(entry.name)) for entry in manifest.tensors]
    patterns = manifest.placement_config.overrides
    overrides = {"analog": patterns.analog, "digital": patterns.digital}
    return Placement.of(infos, manifest_profile(manifest), overrides)


def verify_bundle(out: str | Path, manifest: Manifest | None = None) -> list[str]:
    """Check every file against the manifest (presence, size, sha256) and look for extra files.

    Returns a list of one-line problems (empty: the bundle is intact).
    """
    folder = Path(out)
    manifest = manifest or read_manifest(folder)
    problems: list[str] = []
    listed = set()
    for entry in manifest.files:
        listed.add(entry.name)
        path = member_path(folder, entry.name)
        if not path.is_file():
            problems.append(f"{entry.name}: missing")
        elif path.stat().st_size != entry.bytes:
            problems.append(f"{entry.name}: size {path.stat().st_size} != {entry.bytes} in the manifest")
        elif sha256_file(path) != entry.sha256:
            problems.append(f"{entry.name}: sha256 does not match the manifest (file altered)")
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name not in (MANIFEST_NAME, LOCK_NAME) and name not in listed:
            problems.append(f"{name}: not listed in the manifest")
    return problems


def _raise_problems(out: Path, problems: list[str]) -> None:
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BundleError(f"bundle {out} failed verification: {problems[0]}{more}")


def apply_transforms(model: torch.nn.Module, manifest: Manifest, out: Path) -> torch.nn.Module:
    """Re-apply the manifest's transforms in order through :mod:`cimconvert.transforms`' loaders."""
    for entry in manifest.transforms:
        loader = TRANSFORM_LOADERS.get(entry.type)
        if loader is None:
            known = ", ".join(sorted(TRANSFORM_LOADERS)) or "none"
            raise BundleError(f"bundle uses transform '{entry.type}' that cannot be applied (known: {known})")
        _run_transform(entry, loader, model, entry, out)
    return model


def _run_transform(entry: TransformEntry, fn: Callable[..., Any], *args: Any) -> Any:
    """Call a transform hook; malformed params (a missing or mistyped key) become one BundleError."""
    try:
        return fn(*args)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as exc:
        raise BundleError(
            f"manifest transform '{entry.id}' ({entry.type}) has invalid params: "
            f"{type(exc).__name__} {failure_detail(exc)}"
        ) from None


def read_verified_manifest(out: str | Path, verify: bool = True, key: bytes | str | None = None) -> Manifest:
    """:func:`read_manifest`, then (with ``verify``) every file checked against it: BundleError on the first
    problem. What every loader of a bundle reads first."""
    folder = Path(out)
    manifest = read_manifest(folder, key)
    if verify:
        _raise_problems(folder, verify_bundle(folder, manifest))
    return manifest


def load_bundle(
    out: str | Path, dtype: torch.dtype = torch.float32, verify: bool = True, key: bytes | str | None = None
) -> torch.nn.Module:
    """Load a bundle as a Hugging Face model in eval mode (transforms re-applied).

    The manifest is always checked against ``bundle.lock`` (and its signature with a ``key``); with
    ``verify`` every file's sha256 is checked too and a mismatch raises BundleError.
    """
    folder = Path(out)
    return model_from_bundle(folder, read_verified_manifest(folder, verify, key), dtype)


def model_from_bundle(folder: Path, manifest: Manifest,
                      dtype: torch.dtype = torch.float32) -> torch.nn.Module:  # fmt: skip
    """The bundle in ``folder`` as a model, ``manifest``'s transforms re-applied (no checks: the caller
    verified it, or is writing it, as the ONNX export of a layer-by-layer conversion does)."""
    model = load_hf_model(
        folder, manifest.source.model_type, dtype, expected_key_changes=expected_key_changes(manifest)
    )
    return apply_transforms(model, manifest, folder)


def _unit_summary(manifest: Manifest, unit: str) -> dict[str, Any]:
    entries = [t for t in manifest.tensors if t.unit == unit]
    return {
        "tensors": len(entries),
        "bytes": sum(t.nbytes for t in entries),
        "tiles": sum(t.tiles for t in entries),
        "shards": sorted({t.shard for t in entries}),
        "kinds": sorted({t.kind for t in entries}),
    }


def _deployment(folder: Path, manifest: Manifest) -> dict[str, Any] | None:
    """The deployment figures of a bundle (None when its config.json is missing or not a valid config: the
    verification then names the file)."""
    try:
        return deployment_figures(manifest, read_config_dict(folder))
    except ModelInputError:  # the config, not the manifest's figures (those are a BundleError line)
        return None


def inspect_bundle(out: str | Path, verify: bool = True, key: bytes | str | None = None) -> dict[str, Any]:
    """Summary of a bundle (model, profile, per-unit counts/bytes, transforms, what each recipe step did,
    its warnings and the deployment figures of :func:`cimconvert.bundle.costs.deployment_figures`) and
    its verification.

    ``verified`` is True when every checksum matches (None when ``verify`` is False); ``problems``
    lists what failed; ``signed`` says whether ``bundle.lock`` carries an HMAC and
    ``signature_verified`` whether it was checked with a key. Raises BundleError when the manifest
    itself is unreadable, does not match ``bundle.lock`` or fails its signature.
    """
    folder = Path(out)
    manifest, lock = _read_locked(folder, key)
    problems = verify_bundle(folder, manifest) if verify else []
    steps = step_outcomes(manifest)
    return {
        "bundle": str(folder),
        "model": manifest.source.model,
        "model_type": manifest.source.model_type,
        "revision": manifest.source.revision,
        "profile": manifest.profile.name,
        "profile_hash": manifest.profile.content_hash,
        "producer": f"{manifest.producer.name} {manifest.producer.version}",
        "created": manifest.created,
        "tensor_count": TENSOR_COUNT,
        "units": {unit: _unit_summary(manifest, unit) for unit in ("analog", "digital")},
        "totals": manifest.totals.model_dump(exclude={"placement"}),
        "recipe": None if manifest.recipe is None else manifest.recipe.model_dump(mode="json"),
        "transforms": [t.model_dump() for t in manifest.transforms],
        "steps": steps,
        "warnings": [f"step {s['index']} {s['step']}: {w}" for s in steps for w in s["warnings"]],
        "deployment": _deployment(folder, manifest),
        "seeds": dict(manifest.seeds),
        "files": len(manifest.files),
        "verified": (not problems) if verify else None,
        "problems": problems,
        "signed": lock.get("hmac_sha256") is not None,
        "signature_verified": signing_key(key) is not None,
    }
