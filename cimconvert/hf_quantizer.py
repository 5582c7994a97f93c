"""cimconvert's transformers quantizer: ``from_pretrained(bundle)`` rebuilds what ``load_bundle`` rebuilds.

A bundle's config.json carries ``quantization_config = {"quant_method": "cimconvert", ...}``
(:mod:`cimconvert.bundle.quantization`). ``import cimconvert`` registers :class:`CimQuantizationConfig` and
:class:`CimQuantizer` under that name with transformers, so
``AutoModelForCausalLM.from_pretrained(bundle)`` runs them:

* the config refuses a bundle format newer than this cimconvert reads (one line, both versions);
* before the weights load, the quantizer reads the bundle's manifest (checked against ``bundle.lock`` and
  every file against the manifest, as ``load_bundle`` does), checks the config's entry is what the
  manifest gives, and tells transformers which keys the recorded transforms own (an HPD split's
  ``out_proj.weight`` is not in the bundle, its factors are), so the load report does not list them;
  any other missing or unexpected key is a BundleError, as in ``load_bundle`` (transformers alone would
  warn and initialise the parameter randomly);
* after the weights load, it re-applies the manifest's transforms in order through
  ``bundle.reader.apply_transforms`` — the same ``TRANSFORM_LOADERS`` ``load_bundle`` calls: HPD factor
  modules, outlier split modules, fused experts' digital input channels, ROMER expert copies and routing
  hooks, folded output corrections.

Without cimconvert imported, transformers only warns about the unknown ``quant_method`` and would load the
plain architecture; the bundle's config.json therefore also names a weights file that does not exist
(``transformers_weights``, see :data:`cimconvert.arch.loading.BUNDLE_WEIGHTS_GUARD`), so a stock load fails
with that file's name (``REQUIRES-cimconvert--import-cimconvert-before-from_pretrained.safetensors``) and
this quantizer removes it before transformers resolves the checkpoint files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from cimconvert.arch.loading import BUNDLE_QUANT_METHOD, BUNDLE_WEIGHTS_GUARD
from cimconvert.bundle.manifest import Manifest
from cimconvert.bundle.quantization import check_against_manifest, check_format_version
from cimconvert.bundle.reader import apply_transforms, expected_key_changes, read_verified_manifest
from cimconvert.errors import BundleError


class CimQuantizationConfig(QuantizationConfigMixin):
    """A bundle's ``quantization_config`` as transformers holds it: every field kept as written."""

    def __init__(self, **fields: Any) -> None:
        check_format_version(fields.get("format_version"), "config.json quantization_config")
        self.__dict__.update(fields)
        self.quant_method = BUNDLE_QUANT_METHOD  # type: ignore[assignment]


class CimQuantizer(HfQuantizer):
    """Loads a cimconvert bundle in ``from_pretrained`` exactly as ``cimconvert.api.load_bundle`` does."""

    requires_calibration = True  # only a converted bundle loads through it (transformers refuses the rest)

    def __init__(self, quantization_config: QuantizationConfigMixin, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self.bundle: tuple[Path, Manifest] | None = None

    def update_attn_implementation(self, config: Any) -> Any:
        """The hook that sees the config before the checkpoint files are resolved: drop the weights guard."""
        if getattr(config, "transformers_weights", None) == BUNDLE_WEIGHTS_GUARD:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(
        self, model: nn.Module, checkpoint_files: Sequence[str] | None = None, **kwargs: Any
    ) -> nn.Module:
        """Read and verify the manifest; let the keys the transforms own go unreported."""
        folder = bundle_folder(checkpoint_files)
        manifest = read_verified_manifest(folder)
        check_against_manifest(self.quantization_config.to_dict(), manifest)
        missing, unexpected = expected_key_changes(manifest)
        ignore_keys(model, "_keys_to_ignore_on_load_missing", missing)
        ignore_keys(model, "_keys_to_ignore_on_load_unexpected", unexpected)
        refuse_other_key_changes(model, folder)
        self.bundle = (folder, manifest)
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """Re-apply the manifest's transforms, in order, with ``load_bundle``'s own loaders."""
        if self.bundle is None:
            raise BundleError("cimconvert quantizer: the bundle was not read before its weights loaded")
        folder, manifest = self.bundle
        return apply_transforms(model, manifest, folder)

    def is_serializable(self) -> bool:
        """A loaded bundle is not saved back with ``save_pretrained``: convert the source model again."""
        return False

    @property
    def is_trainable(self) -> bool:
        """Fine-tuning goes through ``cimconvert finetune`` (docs/FINETUNE.md), not transformers' Trainer."""
        return False


def bundle_folder(checkpoint_files: Sequence[str] | None) -> Path:
    """The bundle folder ``from_pretrained`` resolved (the folder of its weight shards)."""
    if not checkpoint_files:
        raise BundleError("cimconvert quantizer: from_pretrained resolved no weight files for the bundle")
    return Path(checkpoint_files[0]).parent


def ignore_keys(model: nn.Module, attribute: str, keys: Sequence[str]) -> None:
    """Add exact-name patterns for ``keys`` to the model's ``_keys_to_ignore_on_load_*`` ``attribute``."""
    if keys:
        patterns = set(getattr(model, attribute, None) or ())
        patterns.update(f"^{re.escape(key)}$" for key in keys)
        setattr(model, attribute, patterns)


def refuse_other_key_changes(model: nn.Module, folder: Path) -> None:
    """Make the load as strict as ``load_bundle``'s: a key missing from the bundle or not expected by the
    model, other than those the transforms own, is a BundleError (transformers would only warn and leave
    the parameter randomly initialised).

    transformers 5 filters the missing / unexpected keys of a load in the model's
    ``_adjust_missing_and_unexpected_keys(loading_info)``; this wraps that method on this one model.
    """
    adjust = model._adjust_missing_and_unexpected_keys

    def adjust_strictly(loading_info: Any) -> None:
        adjust(loading_info)
        problems = {kind: sorted(getattr(loading_info, f"{kind}_keys")) for kind in ("missing", "unexpected")}
        if any(problems.values()):
            detail = "; ".join(f"{kind}: {', '.join(keys[:3])}" for kind, keys in problems.items() if keys)
            raise BundleError(f"bundle {folder} does not match {type(model).__name__} ({detail})")

    model._adjust_missing_and_unexpected_keys = adjust_strictly


def register() -> None:
    """Register the config and quantizer with transformers under ``quant_method = "cimconvert"`` (once)."""
    if BUNDLE_QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(BUNDLE_QUANT_METHOD)(CimQuantizationConfig)
    if BUNDLE_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(BUNDLE_QUANT_METHOD)(CimQuantizer)


register()
