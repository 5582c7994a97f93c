"""Find, parse and validate chip profiles by name or path, with one-line errors."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cimconvert.errors import ProfileError, failure_detail
from cimconvert.profiles.schema import ChipProfile

#: Largest profile file and largest ``NAME:key=value,...`` spec accepted (bytes / characters).
MAX_PROFILE_BYTES = 1024 * 1024
MAX_SPEC_CHARS = 64 * 1024


class PlainYamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` without anchors, aliases or explicit tags.

    Profiles are plain data: refusing ``&anchor``/``*alias`` rules out exponential "billion laughs"
    documents, and refusing ``!tag`` rules out custom and coercing types (``!!python/...``, ``!!float``).
    """

    def _refuse(self, what: str) -> None:
        raise yaml.scanner.ScannerError(None, None, f"{what} are not allowed in profiles", self.get_mark())

    def fetch_alias(self) -> None:
        """Refuse ``*alias``."""
        self._refuse("YAML aliases (*name)")

    def fetch_anchor(self) -> None:
        """Refuse ``&anchor``."""
        self._refuse("YAML anchors (&name)")

    def fetch_tag(self) -> None:
        """Refuse ``!tag``."""
        self._refuse("YAML tags (!tag)")


def parse_yaml(text: str, origin: str, limit: int = MAX_PROFILE_BYTES) -> Any:
    """Parse profile YAML (size-limited, :class:`PlainYamlLoader`); ProfileError naming ``origin``."""
    if len(text) > limit:
        raise ProfileError(f"{origin}: YAML text longer than {limit} characters")
    try:
        return yaml.load(text, Loader=PlainYamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None)
        raise ProfileError(f"{origin}: malformed YAML{where}{f' ({problem})' if problem else ''}") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise ProfileError(f"{origin}: invalid YAML value ({type(exc).__name__})") from None


def shipped_profile_dir() -> Path:
    """The folder holding the shipped ``*.yaml`` profiles (the ``hardware_profiles`` package)."""
    return Path(str(resources.files("hardware_profiles")))


def list_profiles() -> list[ChipProfile]:
    """All shipped profiles, sorted by name."""
    return [load_profile(p) for p in sorted(shipped_profile_dir().glob("*.yaml"))]


def split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """Split ``NAME:key=value,key=value`` into the name and its parameter overrides."""
    if len(spec) > MAX_SPEC_CHARS:
        raise ProfileError(f"profile spec longer than {MAX_SPEC_CHARS} characters")
    name, _, params = spec.partition(":")
    overrides: dict[str, str] = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ProfileError(f"profile '{spec}': parameter '{item}' is not key=value")
        overrides[key.strip()] = value.strip()
    return name, overrides


def _resolve_path(name: str) -> Path:
    try:
        return _find_profile_file(name)
    except (OSError, ValueError) as exc:  # embedded NUL, name too long, ...
        detail = failure_detail(exc)
        raise ProfileError(f"profile '{name[:80]}': not a usable name or path ({detail})") from None


def _find_profile_file(name: str) -> Path:
    if not name:
        raise ProfileError("profile name is empty")
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ProfileError(f"profile file not found: {path}")
        return path
    candidate = shipped_profile_dir() / f"{name}.yaml"
    if not candidate.is_file():
        known = ", ".join(sorted(p.stem for p in shipped_profile_dir().glob("*.yaml")))
        raise ProfileError(f"unknown profile '{name}' (shipped: {known}; or pass a path to a .yaml file)")
    return candidate


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_PROFILE_BYTES:
            raise ProfileError(f"profile {path.name}: file larger than {MAX_PROFILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {path.name}: cannot read ({failure_detail(exc)})") from None
    data = parse_yaml(text, f"profile {path.name}")
    if not isinstance(data, dict):
        raise ProfileError(f"profile {path.name}: expected a mapping of fields at the top level")
    return data


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    node = data
    keys = dotted.split(".")
    for key in keys[:-1]:
        if node.get(key) is None:  # absent, or null (an unknown cost figure): set its fields from scratch
            node[key] = {}
        child = node[key]
        if not isinstance(child, dict):
            raise ProfileError(f"profile {origin}: field '{dotted}' cannot be set")
        node = child
    node[keys[-1]] = value


def _apply_overrides(data: dict[str, Any], overrides: dict[str, str], origin: str) -> dict[str, Any]:
    aliases = data.get("parameters", {}) or {}
    if not isinstance(aliases, dict):
        raise ProfileError(f"profile {origin}: field 'parameters' must map short names to dotted fields")
    for key, raw in overrides.items():
        dotted = aliases.get(key, key)
        if not isinstance(dotted, str) or not dotted:
            raise ProfileError(f"profile {origin}: parameter '{key}' does not name a dotted field")
        if dotted == key and "." not in key and key not in data:
            known = ", ".join(sorted(map(str, aliases))) or "none"
            raise ProfileError(f"profile {origin}: unknown parameter '{key}' (parameters: {known})")
        value = parse_yaml(raw, f"profile {origin}: value of '{key}'") if raw else raw
        _set_dotted(data, dotted, value, origin)
    if overrides:
        data["name"] = _overridden_name(str(data.get("name", origin)), overrides)
    return data


def _overridden_name(base: str, overrides: dict[str, str]) -> str:
    """``base(k=v,...)``; when that is not a valid profile name (too long, or values with spaces or
    brackets such as inline YAML curves), ``base(overrides-<sha256 prefix>)`` instead."""
    label = ",".join(f"{k}={v}" for k, v in overrides.items())
    name = f"{base}({label})"
    if len(name) <= 128 and re.fullmatch(r"[A-Za-z0-9_.()=,:+-]+", name):
        return name
    digest = hashlib.sha256(label.encode()).hexdigest()[:12]
    return f"{base[:100]}(overrides-{digest})"


def _format_validation_error(exc: ValidationError, origin: str) -> str:
    err = exc.errors()[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"profile {origin}: field '{field}': {msg}{more}"


def profile_from_dict(data: dict[str, Any], origin: str = "<dict>") -> ChipProfile:
    """Validate a profile given as a dict; errors name the origin and the first bad field."""
    try:
        return ChipProfile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(_format_validation_error(exc, origin)) from None


def load_profile(spec: str | Path | ChipProfile, overrides: dict[str, str] | None = None) -> ChipProfile:
    """Load a profile by shipped name, by YAML path, or pass one through.

    ``spec`` may carry parameters: ``gaussian:sigma=0.1,granularity=tile``; ``overrides`` adds more
    (keys are the profile's parameter names or dotted field paths). Raises ProfileError (one line).
    """
    if isinstance(spec, ChipProfile):
        if not overrides:
            return spec
        data = json.loads(spec.canonical_json())
        return profile_from_dict(_apply_overrides(data, dict(overrides), spec.name), spec.name)
    spec_str = str(spec)
    name, spec_overrides = (spec_str, {}) if isinstance(spec, Path) else split_spec(spec_str)
    spec_overrides.update(overrides or {})
    path = _resolve_path(name)
    data = _apply_overrides(_read_yaml(path), spec_overrides, path.name)
    return profile_from_dict(data, path.name)
