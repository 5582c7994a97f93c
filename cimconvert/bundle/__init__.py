"""Bundles: sharded analog/digital safetensors + index + manifest, written atomically and verified on read."""

from cimconvert.bundle.manifest import Manifest, manifest_json_schema, write_schema
from cimconvert.bundle.reader import (
    inspect_bundle,
    load_bundle,
    read_manifest,
    verify_bundle,
)
from cimconvert.bundle.writer import BundleSummary, write_bundle

__all__ = [
    "BundleSummary",
    "Manifest",
    "inspect_bundle",
    "load_bundle",
    "manifest_json_schema",
    "read_manifest",
    "verify_bundle",
    "write_bundle",
    "write_schema",
]
