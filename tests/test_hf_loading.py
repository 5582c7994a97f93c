"""Loading a bundle through transformers: ``from_pretrained`` (cimconvert's registered quantizer) rebuilds
exactly what ``load_bundle`` does, for every method bundle of every demo model; without cimconvert, or
for a newer bundle format, the load is refused."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from reliability_helpers import DEMO_MODELS, RunCli, edit_manifest, subprocess_env

from cimconvert import api, hf_quantizer
from cimconvert.analog.chip_noise import apply_chip_noise
from cimconvert.arch import get_adapter
from cimconvert.arch.loading import BUNDLE_WEIGHTS_GUARD, load_config, load_pretrained
from cimconvert.bundle.quantization import check_against_manifest, quantization_config
from cimconvert.bundle.reader import load_bundle, manifest_profile, placement_from_manifest, read_manifest
from cimconvert.errors import BundleError
from cimconvert.hf_quantizer import CimQuantizationConfig
from cimconvert.placement import model_placement
from cimconvert.transforms import TRANSFORM_LOADERS

MOE_MODELS = ("tiny-olmoe", "tiny-qwen2-moe", "tiny-deepseek")
SSM_MODELS = ("tiny-mamba", "tiny-mamba2")
#: calibration small enough for a test: two short sequences (ROMER: one noise draw, four sequences)
CALIB = {"calib_samples": 2, "calib_seq_len": 32}
ROMER = {"calib_seeds": 1, "calib_samples": 4, "calib_seq_len": 32, "replace_bottom": 1,
         "replacement": "replicate_split", "router_deadband": 0.0}  # fmt: skip
#: method → its options (``None``: the method's defaults); ``hpd`` splits the default layer of an SSM and
#: the (tied) LM head of an MoE model, which it unties
METHODS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "romer": ROMER,
    "hpd": None,
    "auto": {**CALIB, "correction_draws": 1},
    "outlier_channels": {**CALIB, "outlier_percent": 10.0},
    "output_correction": {**CALIB, "correction_draws": 1},
    "keep_digital": {"patterns": ["re:.*layers\\.0\\..*"]},
}
ROMER_TYPES = {"romer_replacement", "romer_routing"}
#: what outlier_channels records on an MoE model (linear layers split, fused experts' channels listed)
MOE_OUTLIERS = {"outlier_split", "experts_digital_inputs"}
#: method → the transform types its bundle of an MoE model records (every loader in TRANSFORM_LOADERS)
TRANSFORMS: dict[str, set[str]] = {
    "none": set(), "romer": ROMER_TYPES, "hpd": {"hpd_split"}, "keep_digital": set(),
    "auto": {*MOE_OUTLIERS, "output_gain"}, "outlier_channels": MOE_OUTLIERS,
    "output_correction": {"output_gain"},
}  # fmt: skip
#: transform types whose loaders change the forward pass on a simulated chip of the plain architecture
#: loaded from the bundle's files (the others are already in the stored weights)
CHANGING = {"hpd_split", "outlier_split", "romer_routing", "experts_digital_inputs"}
#: the cheap cases that run without ``-m slow``: one per transform loader
FAST = {("tiny-olmoe", "none"), ("tiny-olmoe", "romer"), ("tiny-olmoe", "outlier_channels"),
        ("tiny-mamba", "hpd"), ("tiny-mamba", "output_correction")}  # fmt: skip


def _cases() -> list[Any]:
    cases = []
    for model in (*MOE_MODELS, *SSM_MODELS):
        for method in METHODS:
            if method == "romer" and model in SSM_MODELS:
                continue
            marks = () if (model, method) in FAST else (pytest.mark.slow,)
            cases.append(pytest.param(model, method, marks=marks, id=f"{model}-{method}"))
    return cases


def _options(model: str, method: str) -> dict[str, Any] | None:
    """The method's options for ``model`` (an SSM's ``auto`` is HPD alone, which takes none of them)."""
    if method == "hpd" and model in MOE_MODELS:
        return {"hpd_layers": ["lm_head"]}
    if method == "auto" and model in SSM_MODELS:
        return None
    return METHODS[method]


def _expected_transforms(model: str, method: str) -> set[str]:
    """The transform types a bundle of ``model`` by ``method`` records (an SSM has no fused experts, and
    its ``auto`` is HPD)."""
    if model in SSM_MODELS:
        return {"hpd_split"} if method == "auto" else TRANSFORMS[method] - {"experts_digital_inputs"}
    return TRANSFORMS[method]


def _convert(model: str, method: str, out: Path) -> Path:
    api.convert(str(DEMO_MODELS / model), "chipA", out, method=method, method_options=_options(model, method),
                onnx=False, progress=False)  # fmt: skip
    return out


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _noisy_logits(model: torch.nn.Module, bundle: Path) -> torch.Tensor:
    """Logits on one simulated chip (seed 0) of the bundle's profile and placement: what the transforms
    that act only under noise (routing hooks, experts' digital input channels) change."""
    manifest = read_manifest(bundle)
    chip = manifest_profile(manifest)
    targets = model_placement(model, placement_from_manifest(manifest), chip).analog()
    with apply_chip_noise(model, targets, chip, seed=0):
        return _logits(model)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert torch.equal(a, b) or (a - b).abs().max().item() <= 1e-6, (a - b).abs().max().item()


@contextmanager
def transformers_log() -> Iterator[list[str]]:
    """The messages transformers logs at warning level or above inside the block (whatever verbosity an
    earlier CLI run set)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        transformers.logging.set_verbosity(level)


@pytest.fixture(scope="module")
def hpd_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-mamba bundle with an HPD split (shared by the refusal tests; copied before any edit)."""
    return _convert("tiny-mamba", "hpd", tmp_path_factory.mktemp("hpd") / "bundle")


@pytest.fixture(scope="module")
def moe_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny-olmoe bundle with ROMER's expert copies and routing hooks."""
    return _convert("tiny-olmoe", "romer", tmp_path_factory.mktemp("romer") / "bundle")


def _copy(bundle: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(bundle), str(out)], check=True)
    return out


# ------------------------------------------------------------------------------ exact loading
@pytest.mark.parametrize(("model", "method"), _cases())
def test_from_pretrained_equals_load_bundle(model: str, method: str, tmp_path: Path) -> None:
    """Logits of ``AutoModelForCausalLM.from_pretrained(bundle)`` equal ``load_bundle``'s, clean and on a
    simulated chip; transformers logs no load report (no missing or unexpected key); where a transform
    changes the forward pass, the plain architecture loaded from the same files differs (so the
    comparison can fail)."""
    bundle = _convert(model, method, tmp_path / "bundle")
    reference = _logits(load_bundle(bundle))
    with transformers_log() as records:
        loaded = transformers.AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32)
    assert not [r for r in records if "LOAD REPORT" in r], records
    assert loaded.hf_quantizer.quantization_config.quant_method == "cimconvert"
    _assert_same(_logits(loaded), reference)
    noisy = _noisy_logits(load_bundle(bundle), bundle)
    _assert_same(_noisy_logits(loaded, bundle), noisy)
    types = {t.type for t in read_manifest(bundle).transforms}
    assert types == _expected_transforms(model, method)
    if types & CHANGING:
        plain = load_pretrained(bundle, dtype=torch.float32, strict=False)
        assert not torch.allclose(_noisy_logits(plain, bundle), noisy, atol=1e-4), types


def test_every_transform_loader_is_covered() -> None:
    """The method bundles above record every transform type a loader exists for."""
    assert set().union(*TRANSFORMS.values()) == set(TRANSFORM_LOADERS)


def test_bundle_config_carries_the_manifest_quantization_config(moe_bundle: Path) -> None:
    """config.json's quantization_config is the manifest's, and names cimconvert, the profile and the
    recipe; cimconvert's own config loader drops it (and the weights guard)."""
    config = json.loads((moe_bundle / "config.json").read_text(encoding="utf-8"))
    manifest = read_manifest(moe_bundle)
    entry = config["quantization_config"]
    assert entry == json.loads(json.dumps(quantization_config(manifest)))
    assert (entry["quant_method"], entry["format_version"]) == ("cimconvert", 1)
    assert entry["profile"] == {"name": "chipA", "content_hash": manifest.profile.content_hash}
    assert [s["step"] for s in entry["recipe"]["steps"]] == ["romer"]
    assert [t["type"] for t in entry["transforms"]] == ["romer_replacement", "romer_routing"]
    assert config["transformers_weights"] == BUNDLE_WEIGHTS_GUARD
    plain = load_config(moe_bundle)
    assert getattr(plain, "quantization_config", None) is None
    assert getattr(plain, "transformers_weights", None) is None


def test_plain_conversion_carries_it_too(tmp_path: Path) -> None:
    """The streaming ``--method none`` path writes the entry as well (no recipe step, no transform)."""
    bundle = _convert("tiny-mamba", "none", tmp_path / "bundle")
    entry = json.loads((bundle / "config.json").read_text(encoding="utf-8"))["quantization_config"]
    assert entry["recipe"]["steps"] == [] and entry["transforms"] == []
    check_against_manifest(entry, read_manifest(bundle))


def _matches(target: str, name: str) -> bool:
    """compressed-tensors' matcher: ``re:`` regexes matched from the start of the name, else equality."""
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def test_targets_match_in_memory_parameter_names(moe_bundle: Path) -> None:
    """Each group's targets select exactly the in-memory parameters of its unit, fused experts included;
    the on-disk per-expert keys map to them by the adapter's memory_name."""
    manifest = read_manifest(moe_bundle)
    groups = quantization_config(manifest)["config_groups"]
    model = transformers.AutoModelForCausalLM.from_pretrained(moe_bundle, dtype=torch.float32)
    names = [name for name, _ in model.named_parameters()]
    selected = {unit: {n for n in names if any(_matches(t, n) for t in groups[unit]["targets"])}
                for unit in ("analog", "digital")}  # fmt: skip
    adapter = get_adapter(manifest.source.model_type)
    expected = {unit: {adapter.memory_name(t.name) for t in manifest.tensors if t.unit == unit} & set(names)
                for unit in ("analog", "digital")}  # fmt: skip
    assert selected == expected
    assert "model.layers.0.mlp.experts.gate_up_proj" in selected["analog"]
    assert not selected["analog"] & selected["digital"]
    assert selected["analog"] | selected["digital"] == set(names)
    disk = "model.layers.0.mlp.experts.3.gate_proj.weight"
    assert disk in {t.name for t in manifest.tensors}
    assert adapter.memory_name(disk) == "model.layers.0.mlp.experts.gate_up_proj"


# ------------------------------------------------------------------------------ refusals
def test_without_cimconvert_transformers_refuses(hpd_bundle: Path) -> None:
    """A process that never imports cimconvert cannot load a bundle: transformers fails on the missing
    weights file that names cimconvert (it would otherwise only warn about the unknown quant_method and
    load the plain architecture with a random out_proj)."""
    script = (
        "import sys, transformers\n"
        f"transformers.AutoModelForCausalLM.from_pretrained({str(hpd_bundle)!r})\n"
        "print('LOADED', 'cimconvert' in sys.modules)\n"
    )
    env = subprocess_env({"PYTHONPATH": "", "TRANSFORMERS_VERBOSITY": "warning"})  # its warning shown
    proc = subprocess.run([sys.executable, "-c", script], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0 and "LOADED" not in proc.stdout, proc.stdout
    assert BUNDLE_WEIGHTS_GUARD in proc.stderr
    assert "Unknown quantization type, got cimconvert" in proc.stderr
    assert "import-cimconvert" in proc.stderr.strip().splitlines()[-1]


def test_newer_format_version_is_refused_by_from_pretrained(hpd_bundle: Path, tmp_path: Path) -> None:
    """A quantization_config from a newer cimconvert: one line naming both versions."""
    bundle = _copy(hpd_bundle, tmp_path)
    path = bundle / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"]["format_version"] = 7
    path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BundleError, match=r"format version 7 is newer than this cimconvert .* \(up to 1\)"):
        transformers.AutoModelForCausalLM.from_pretrained(bundle)


def test_newer_manifest_is_refused_by_the_cli(hpd_bundle: Path, tmp_path: Path, run_cli: RunCli) -> None:
    """A manifest of a newer format (lock rewritten to match): one CimError line with the version, exit 2."""
    bundle = _copy(hpd_bundle, tmp_path)
    edit_manifest(bundle, lambda data: data.update(schema_version=3))
    code, stdout, stderr = run_cli("inspect", str(bundle))
    assert code == 2 and stdout == ""
    assert "bundle format version 3 is newer than this cimconvert" in stderr
    assert len(stderr.strip().splitlines()) == 1


def test_altered_quantization_config_is_refused(hpd_bundle: Path, tmp_path: Path) -> None:
    """An edited quantization_config fails verification (config.json is checksummed) and, compared with
    the manifest directly, names the first differing field."""
    bundle = _copy(hpd_bundle, tmp_path)
    path = bundle / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["quantization_config"]["transforms"] = []
    path.write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BundleError, match=r"failed verification: config\.json: "):
        transformers.AutoModelForCausalLM.from_pretrained(bundle)
    with pytest.raises(BundleError, match=r"does not match manifest\.json \(field 'transforms'\)"):
        check_against_manifest(config["quantization_config"], read_manifest(hpd_bundle))


def test_keys_no_transform_owns_are_refused(hpd_bundle: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As strict as load_bundle: were the HPD keys not owned by a transform, the load would be refused
    (transformers alone warns and initialises out_proj.weight randomly)."""
    monkeypatch.setattr(hf_quantizer, "expected_key_changes", lambda manifest: ([], []))
    expected = r"not match MambaForCausalLM \(missing: backbone\.layers\.7\.mixer\.out_proj\.weight; unexp"
    with pytest.raises(BundleError, match=expected):
        transformers.AutoModelForCausalLM.from_pretrained(hpd_bundle)


def test_quantizer_refuses_a_plain_checkpoint() -> None:
    """Passing cimconvert's config for an ordinary checkpoint is refused (only bundles load through it)."""
    config = CimQuantizationConfig(**quantization_config_stub())
    source = DEMO_MODELS / "tiny-mamba"
    with pytest.raises(ValueError, match="pre-quantized"):
        transformers.AutoModelForCausalLM.from_pretrained(source, quantization_config=config)


def quantization_config_stub() -> dict[str, Any]:
    """The smallest entry the config class accepts."""
    return {"quant_method": "cimconvert", "format_version": 1}
