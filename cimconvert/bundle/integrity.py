"""Manifest integrity: ``bundle.lock`` (sha256, optional HMAC) and containment of every bundle path.

``manifest.json`` lists the sha256 of every other bundle file; ``bundle.lock``, written last, holds the
sha256 of manifest.json's exact bytes (and, when a signing key is set, an HMAC-SHA256 over them), so one
digest covers the whole bundle. Readers call :func:`verified_manifest_bytes` before parsing anything and
:func:`member_path` for every file name the manifest mentions (relative, no ``..``, no symlink leaving
the bundle). A bare digest catches accidental corruption and naive edits; only the HMAC (with a key the
editor does not have) stops a deliberate edit that also rewrites the digest. See docs/BUNDLE.md.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from cimconvert.bundle.manifest import MANIFEST_NAME
from cimconvert.errors import BundleError

LOCK_NAME = "bundle.lock"
LOCK_FORMAT = "cimconvert-bundle-lock"
LOCK_VERSION = 1
#: Environment variables holding the signing key itself, or the path of a file holding it.
KEY_ENV = "CIMCONVERT_SIGNING_KEY"
KEY_FILE_ENV = "CIMCONVERT_SIGNING_KEY_FILE"
MAX_LOCK_BYTES = 64 * 1024
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
_HMAC_DOMAIN = b"cimconvert-bundle-lock/1\n"
_LOCK_KEYS = {"format", "version", "manifest", "manifest_bytes", "manifest_sha256", "hmac_sha256"}


def signing_key(key: bytes | str | None = None) -> bytes | None:
    """The HMAC key: ``key`` if given, else ``$CIMCONVERT_SIGNING_KEY``, else the file named by
    ``$CIMCONVERT_SIGNING_KEY_FILE``; None when there is none. An empty key is an error."""
    if key is None:
        if text := os.environ.get(KEY_ENV):
            key = text
        elif path := os.environ.get(KEY_FILE_ENV):
            key = read_key_file(Path(path))
    if key is None:
        return None
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if not raw.strip():
        raise BundleError("the bundle signing key is empty")
    return raw


def read_key_file(path: Path) -> bytes:
    """The bytes of a signing-key file (surrounding whitespace stripped); one-line error when unreadable."""
    try:
        raw = Path(path).read_bytes()[: 64 * 1024].strip()
    except OSError as exc:
        raise BundleError(f"cannot read the signing key file {path} ({exc.strerror})") from None
    if not raw:
        raise BundleError(f"the signing key file {path} is empty")
    return raw


def _mac(key: bytes, manifest: bytes) -> str:
    return hmac.new(key, _HMAC_DOMAIN + manifest, hashlib.sha256).hexdigest()


def lock_text(manifest: bytes, key: bytes | None = None) -> str:
    """The ``bundle.lock`` content for manifest bytes (canonical JSON, trailing newline)."""
    lock = {
        "format": LOCK_FORMAT,
        "version": LOCK_VERSION,
        "manifest": MANIFEST_NAME,
        "manifest_bytes": len(manifest),
        "manifest_sha256": hashlib.sha256(manifest).hexdigest(),
        "hmac_sha256": _mac(key, manifest) if key else None,
    }
    return _lock_json(lock)


def _lock_json(lock: dict[str, Any]) -> str:
    return json.dumps(lock, indent=2, sort_keys=True) + "\n"


def _write_synced(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_manifest_and_lock(folder: Path, manifest_json: str, key: bytes | str | None = None) -> None:
    """Write ``manifest.json`` then ``bundle.lock`` (the lock last: a bundle without it is incomplete)."""
    data = manifest_json.encode("utf-8")
    _write_synced(folder / MANIFEST_NAME, data)
    tmp = folder / f".{LOCK_NAME}.tmp"
    _write_synced(tmp, lock_text(data, signing_key(key)).encode())
    tmp.replace(folder / LOCK_NAME)


def _read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        if path.stat().st_size > limit:
            raise BundleError(f"{path}: {what} is larger than {limit} bytes")
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read {path} ({exc.strerror})") from None


def read_lock(folder: Path) -> dict[str, Any]:
    """Parse ``bundle.lock``; BundleError when absent, unreadable or not a lock of a known version."""
    path = folder / LOCK_NAME
    if not path.is_file():
        raise BundleError(
            f"bundle {folder} has no {LOCK_NAME} (incomplete, altered, or written by an older cimconvert: "
            "convert again)"
        )
    raw = _read_limited(path, MAX_LOCK_BYTES, LOCK_NAME)
    try:
        lock = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise BundleError(f"{path} is not valid JSON (altered)") from None
    valid = (
        isinstance(lock, dict)
        and set(lock) == _LOCK_KEYS
        and lock["manifest"] == MANIFEST_NAME
        and lock.get("format") == LOCK_FORMAT
        and lock.get("version") == LOCK_VERSION
        and isinstance(lock.get("manifest_sha256"), str)
        and isinstance(lock.get("manifest_bytes"), int)
        and isinstance(lock.get("hmac_sha256"), str | None)
    )
    if not valid:
        raise BundleError(f"{path} is not a version-{LOCK_VERSION} bundle lock (altered or newer format)")
    if raw != _lock_json(lock).encode():
        raise BundleError(f"{path} is not in its canonical form (altered)")
    return lock


def _digest_checked(folder: Path) -> tuple[bytes, dict[str, Any]]:
    lock = read_lock(folder)
    data = _read_limited(folder / MANIFEST_NAME, MAX_MANIFEST_BYTES, MANIFEST_NAME)
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != lock["manifest_bytes"] or not hmac.compare_digest(digest, lock["manifest_sha256"]):
        raise BundleError(
            f"bundle {folder}: manifest.json does not match its sha256 in {LOCK_NAME} (altered)"
        )
    return data, lock


def is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a manifest that matches its ``bundle.lock`` (the last file written)."""
    try:
        _digest_checked(Path(folder))
    except BundleError:
        return False
    return True


def verified_manifest_bytes(folder: Path, key: bytes | str | None = None) -> tuple[bytes, dict[str, Any]]:
    """manifest.json's bytes after checking them against ``bundle.lock`` (and its HMAC with a key).

    Returns (bytes, lock). With a key (argument or environment) the bundle must be signed with it.
    """
    folder = Path(folder)
    data, lock = _digest_checked(folder)
    secret = signing_key(key)
    if secret is not None:
        mac = lock.get("hmac_sha256")
        if mac is None:
            raise BundleError(f"bundle {folder} is not signed, but a signing key is set")
        if not hmac.compare_digest(mac, _mac(secret, data)):
            raise BundleError(f"bundle {folder}: the manifest signature does not match the key (altered)")
    return data, lock


def member_path(folder: Path, name: Any, what: str = "file") -> Path:
    """``folder / name`` after checking that ``name`` stays inside the bundle.

    Refuses absolute paths, ``..``/``.``/empty components, backslashes, NUL bytes and names whose
    resolved path (symlinks followed) leaves ``folder``.
    """
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        raise BundleError(f"manifest names an invalid {what} path {name!r}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise BundleError(f"manifest {what} path {name!r} leaves the bundle folder")
    path = Path(folder) / pure
    root = Path(folder).resolve()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):  # symlink loop
        raise BundleError(f"manifest {what} path {name!r} cannot be resolved (symlink loop)") from None
    if resolved != root and root not in resolved.parents:
        raise BundleError(f"manifest {what} path {name!r} resolves outside the bundle folder")
    return path
