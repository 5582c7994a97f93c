"""Chip profiles: shipped files load, errors are one line naming file and field, overrides, hashes."""

from __future__ import annotations

from pathlib import Path

import pytest

from cimconvert.errors import ProfileError
from cimconvert.profiles import list_profiles, load_profile, shipped_profile_dir

SHIPPED = sorted(p.stem for p in shipped_profile_dir().glob("*.yaml"))


def test_shipped_profiles_present() -> None:
    assert {"chipA", "chipB", "gaussian", "hermes", "ideal"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_with_sources(name: str) -> None:
    profile = load_profile(name)
    assert profile.name == name
    assert profile.sources and all(s.strip() for s in profile.sources)
    assert profile.content_hash().startswith("sha256:")


def test_list_profiles_matches_files() -> None:
    assert sorted(p.name for p in list_profiles()) == SHIPPED


def test_only_ideal_is_ideal() -> None:
    assert [p.name for p in list_profiles() if p.is_ideal] == ["ideal"]


BAD = {
    "unknown_key.yaml": ("name: x\nmapping:\n  foo: 1\n", "mapping.foo", "unknown key"),
    "wrong_type.yaml": ("name: x\nt_inference: soon\n", "t_inference", "number"),
    "out_of_range.yaml": ("name: x\nmapping:\n  g_max: -1\n", "mapping.g_max", "greater than 0"),
    "bad_curve.yaml": (
        "name: x\ndrift:\n  kind: power_law\n  nu_mean: [{below: 0.5, poly: [1]}]\n  nu_std: [{poly: [1]}]\n",
        "drift",
        "below",
    ),
    "missing_coeffs.yaml": (
        "name: x\nprogramming:\n  kind: poly\n  ref_g_max: 25\n",
        "programming",
        "coeffs",
    ),
}


@pytest.mark.parametrize("filename", sorted(BAD))
def test_invalid_profile_errors_name_file_and_field(tmp_path: Path, filename: str) -> None:
    text, field, words = BAD[filename]
    path = tmp_path / filename
    path.write_text(text)
    with pytest.raises(ProfileError) as info:
        load_profile(path)
    message = str(info.value)
    assert "\n" not in message
    assert filename in message and f"'{field}'" in message and words in message


def test_malformed_yaml(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nmapping: [1, 2\n")
    with pytest.raises(ProfileError, match=r"broken\.yaml: malformed YAML at line \d+"):
        load_profile(path)


def test_unknown_profile_name() -> None:
    with pytest.raises(ProfileError, match=r"unknown profile 'chipZ'.*chipA"):
        load_profile("chipZ")


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="not found"):
        load_profile(tmp_path / "nope.yaml")


def test_parameter_overrides() -> None:
    profile = load_profile("gaussian:sigma=0.2,granularity=tile")
    assert profile.programming.sigma == 0.2 and profile.mapping.scale == "tile"
    assert profile.name == "gaussian(sigma=0.2,granularity=tile)"
    dotted = load_profile("chipA", {"mapping.tile_cols": "256", "prog_scale": "2"})
    assert dotted.mapping.tile_cols == 256 and dotted.programming.scale == 2.0


def test_bad_overrides() -> None:
    with pytest.raises(ProfileError, match=r"gaussian\.yaml: field 'programming\.sigma'"):
        load_profile("gaussian:sigma=lots")
    with pytest.raises(ProfileError, match="unknown parameter 'bogus'"):
        load_profile("gaussian:bogus=1")
    with pytest.raises(ProfileError, match="not tabulated"):
        load_profile("chipB:t_inference=5")


def test_structured_override_values_get_a_valid_name() -> None:
    profile = load_profile("chipA", {"drift.nu_mean": "[{poly: [0.05]}]", "drift.nu_std": "[{poly: [0.0]}]"})
    assert profile.drift.nu_mean[0].poly == [0.05]
    assert profile.name.startswith("chipA(overrides-")


def test_content_hash_stable_and_sensitive() -> None:
    a, b = load_profile("chipA"), load_profile("chipA")
    assert a.content_hash() == b.content_hash()
    assert load_profile(a).content_hash() == a.content_hash()
    changed = load_profile(a, {"mvm.out_noise": "0.05"})
    assert changed.content_hash() != a.content_hash()
    assert load_profile("chipA", {"mvm.out_noise": "0.04"}).model_dump(exclude={"name"}) == a.model_dump(
        exclude={"name"}
    )
