"""Configs and models of every registered architecture, without remote code.

Configs are built with the concrete config class of the model type (never ``AutoConfig``'s remote-code
path), so a checkpoint whose ``config.json`` carries an ``auto_map`` still loads with library code only;
an adapter that declares a ``config_builder`` (DeepSeek v1, which transformers does not ship) builds its
own. ``trust_remote_code`` is never passed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cimconvert.arch.registry import get_adapter
from cimconvert.errors import ModelInputError

#: ``quant_method`` of the ``quantization_config`` a cimconvert bundle's config.json carries (written by
#: :mod:`cimconvert.bundle.quantization` for transformers' loaders; cimconvert itself reads the manifest).
BUNDLE_QUANT_METHOD = "cimconvert"
#: ``transformers_weights`` of a bundle's config.json: a weights file that does not exist, so a stock
#: ``from_pretrained`` (cimconvert's quantizer not registered) fails naming it instead of loading a
#: model without the bundle's transforms; the registered quantizer removes it before files are resolved.
BUNDLE_WEIGHTS_GUARD = "REQUIRES-cimconvert--import-cimconvert-before-from_pretrained.safetensors"

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


def read_config_dict(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder (or the file itself) as a dict, with one-line errors."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelInputError(f"no config.json in {path}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelInputError(f"cannot read {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelInputError(f"{file}: expected a JSON object")
    return data


def load_config(source: str | Path | dict[str, Any]) -> PretrainedConfig:
    """The transformers config of a model folder or config dict; unsupported model types are errors."""
    from transformers import CONFIG_MAPPING, PretrainedConfig

    data = without_bundle_loading_keys(read_config_dict(source) if not isinstance(source, dict) else source)
    model_type = data.get("model_type")
    builder = get_adapter(model_type or "").config_builder_ref()
    data = PretrainedConfig._decode_special_floats(data)  # {"__float__": "Infinity"} → inf, as HF does
    if builder is not None:
        config = builder(data)
    else:
        values = {k: v for k, v in data.items() if k != "auto_map"}
        try:
            config = CONFIG_MAPPING[model_type].from_dict(values)
        except Exception as exc:  # TypeError, ValueError, huggingface_hub StrictDataclass*Error, ...
            raise ModelInputError(f"invalid {model_type} config: {_first_line(exc)}") from None
    if not isinstance(source, dict):
        config._name_or_path = str(source)
    return config


def without_bundle_loading_keys(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict without the keys a bundle writes for transformers' loaders only (its
    ``cimconvert`` quantization_config and the weights guard): cimconvert loads a bundle through its
    manifest, so a model built here is the plain architecture and no quantizer runs."""
    data = dict(data)
    quantization = data.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == BUNDLE_QUANT_METHOD:
        del data["quantization_config"]
    if data.get("transformers_weights") == BUNDLE_WEIGHTS_GUARD:
        del data["transformers_weights"]
    return data


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model_class(config: Any) -> type[PreTrainedModel]:
    """The causal-LM class for a config (or dict / model_type string) of a registered architecture."""
    return get_adapter(config).model_class_ref()


def build_model(config: Any, *, seed: int | None = None, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A randomly initialised model (eval mode) from a config object or config dict."""
    import torch

    if isinstance(config, dict):
        config = load_config(config)
    cls = load_model_class(config)
    if seed is not None:
        torch.manual_seed(seed)
    model = cls(config)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def load_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    strict: bool = True,
    expected_missing: Sequence[str] = (),
    expected_unexpected: Sequence[str] = (),
    **kwargs: Any,
) -> PreTrainedModel:
    """Load a model folder (safetensors) with library code only, in eval mode.

    ``strict``: missing, unexpected or shape-mismatched keys are a ModelInputError (otherwise transformers
    would silently leave randomly initialised weights), except the ``expected_*`` keys, which a recorded
    transform (e.g. an HPD split) replaces and re-loads itself. Extra keyword arguments go to
    ``from_pretrained`` (e.g. ``experts_implementation``); ``trust_remote_code`` is refused.
    """
    if kwargs.pop("trust_remote_code", False):
        raise ModelInputError(
            "trust_remote_code is not supported: cimconvert loads models with library code only"
        )
    config = load_config(path)
    cls = load_model_class(config)
    try:
        model, info = cls.from_pretrained(
            str(path), config=config, dtype=dtype, output_loading_info=True, **kwargs
        )
    except (OSError, ValueError) as exc:
        raise ModelInputError(f"cannot load model from {path}: {_first_line(exc)}") from None
    problems = {k: info.get(k) or [] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    expected = set(expected_missing) | set(expected_unexpected)
    for key in ("missing_keys", "unexpected_keys"):
        problems[key] = [k for k in problems[key] if k not in expected]
    if strict and any(problems.values()):
        detail = "; ".join(f"{k}: {', '.join(map(str, sorted(v)[:3]))}" for k, v in problems.items() if v)
        raise ModelInputError(f"checkpoint {path} does not match {cls.__name__} ({detail})")
    return model.eval()
