"""The output folder: an exclusive lock beside OUT, recovery after killed runs, atomic (force) replace.

A conversion holds ``fcntl.flock`` on ``.OUT.lock`` (beside OUT; it stores the holder's PID) from start
to finish, so a second writer fails at once naming the first one. Temporary folders beside OUT carry
the PID of the run that made them: ``.OUT.tmp-<pid>`` (the bundle being built), ``.OUT.src-<pid>-*``
(a method's transformed checkpoint) and ``.OUT.old-<pid>`` (the replaced bundle, fallback path only).
The next run on the same OUT removes those whose process is gone (:func:`recover_stale`).

The finished bundle moves into place with one ``rename`` when OUT is absent or an empty folder (which
fails if another process filled OUT meanwhile). ``--force`` swaps it with the old OUT in one
``renameat2(RENAME_EXCHANGE)`` where the kernel and filesystem support it; otherwise it renames OUT to
``.OUT.old-<pid>`` and the new bundle to OUT, and a run killed between the two renames is completed by
the next run (the new bundle if it is complete, else the old one back).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cimconvert.bundle.integrity import is_complete
from cimconvert.errors import BundleError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
#: Locks held by this process: lock path → nesting depth (``write_bundle`` inside ``api.convert``).
_HELD: dict[Path, int] = {}


@dataclass
class OutLock:
    """A held lock on OUT, with what the recovery of earlier killed runs did (one line each)."""

    out: Path
    path: Path
    recovered: list[str] = field(default_factory=list)


def lock_path(out: Path) -> Path:
    """``.OUT.lock`` beside OUT."""
    return out.parent / f".{out.name}.lock"


def tmp_path(out: Path, kind: str, pid: int | None = None) -> Path:
    """``.OUT.<kind>-<pid>`` beside OUT (kind: tmp, src, old)."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def _unwritable(parent: Path, exc: OSError) -> BundleError:
    return BundleError(f"cannot write the bundle: {parent} is not writable ({exc.strerror})")


def make_parents(out: Path) -> list[Path]:
    """Create OUT's missing parent folders; returns them (outermost first) so a failed run removes them."""
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    created: list[Path] = []
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
    except OSError as exc:
        remove_empty(created)
        raise _unwritable(out.parent, exc) from None
    return created


def remove_empty(folders: list[Path]) -> None:
    """Remove the folders this run created, innermost first, where they are empty."""
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError, ValueError):
        pid = int(path.read_text(encoding="utf-8").split()[0])
        return f"PID {pid}"
    return "PID unknown"


def _acquire(out: Path, path: Path) -> int:
    """Open and ``flock`` the lock file (retrying when another run unlinked it meanwhile); returns the fd."""
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _unwritable(path.parent, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise BundleError(
                f"output {out} is being written by another cimconvert process "
                f"({_holder(path)}); wait for it or choose another output folder"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
                return fd
        os.close(fd)  # the holder removed the file between our open and flock: lock the new one


@contextlib.contextmanager
def out_lock(out: Path) -> Iterator[OutLock]:
    """Hold the exclusive lock on OUT for the block (re-entrant within this process).

    Creates OUT's missing parents (removed again when the block fails and they are empty), removes the
    leftovers of killed runs on OUT (:func:`recover_stale`) and deletes the lock file on exit.
    BundleError when another process holds the lock (naming its PID) or the parent is not writable.
    """
    out = Path(out).expanduser().absolute()
    path = lock_path(out)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield OutLock(out, path)
        finally:
            _HELD[path] -= 1
        return
    created = make_parents(out)
    try:
        fd = _acquire(out, path)
    except BaseException:
        remove_empty(created)
        raise
    _HELD[path] = 1
    try:
        lock = OutLock(out, path, recover_stale(out))
        yield lock
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
        if not out.exists():
            remove_empty(created)


# ------------------------------------------------------------------ leftovers of killed runs
def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # we hold the lock: nothing of ours on OUT is in progress
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _leftovers(out: Path) -> list[tuple[Path, str, int]]:
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|src|old)-(\d+)(?:-.*)?")
    found = []
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            match = pattern.fullmatch(entry.name)
            if match:
                found.append((entry, match.group(1), int(match.group(2))))
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover_stale(out: Path) -> list[str]:
    """Finish or undo what killed runs left beside OUT (call with the lock held); one line per action.

    A run killed between the two renames of the fallback replace left OUT missing and the old bundle in
    ``.OUT.old-<pid>``: its new bundle goes into place if complete, else the old one is restored. Then
    every ``.OUT.tmp-*``, ``.OUT.src-*`` and ``.OUT.old-*`` of a dead process is removed; those of a
    live process (not a cimconvert run on OUT: it would hold the lock) are reported and kept.
    """
    actions: list[str] = []
    if not out.exists() and not out.is_symlink():
        for path, kind, pid in _leftovers(out):
            if kind == "old" and not _alive(pid):
                actions.append(_complete_replace(out, path, pid))
                break
    for path, _kind, pid in _leftovers(out):
        if _alive(pid):
            actions.append(f"kept {path.name}: process {pid} is still running")
            continue
        _remove(path)
        verb = "could not remove" if path.exists() or path.is_symlink() else "removed"
        actions.append(f"{verb} {path.name} left by killed run PID {pid}")
    return actions


def _complete_replace(out: Path, old: Path, pid: int) -> str:
    """Put the killed run's new bundle (if complete) or the previous one (``old``) back at OUT."""
    new = tmp_path(out, "tmp", pid)
    chosen = new if new.is_dir() and is_complete(new) else old
    which = "its new bundle" if chosen == new else "the previous bundle"
    try:
        chosen.rename(out)
    except OSError as exc:
        raise BundleError(f"cannot complete the replace of {out} left by killed run PID {pid}: "
                          f"moving {chosen.name} back failed ({exc.strerror})") from None
    return f"completed the replace of {out.name} by killed run PID {pid} ({which})"


# ------------------------------------------------------------------ moving the bundle into place
def _libc_exchange(a: Path, b: Path) -> bool:
    """``renameat2(a, b, RENAME_EXCHANGE)``; False where unsupported (no symbol, kernel or filesystem)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


#: Replaced in tests to exercise the two-step fallback.
exchange = _libc_exchange


def _two_step_replace(tmp: Path, out: Path) -> None:
    old = tmp_path(out, "old")
    out.rename(old)
    tmp.rename(out)  # a kill between the renames is completed by the next run (recover_stale)
    _remove(old)


def move_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle ``tmp`` to ``out``.

    Without ``force`` OUT must still be absent or an empty folder at this moment (one ``rename``, which
    the kernel refuses when OUT is not empty); with ``force`` an existing OUT is swapped atomically
    (``RENAME_EXCHANGE``) and then deleted, or replaced in two documented steps where that is missing.
    """
    try:
        tmp.rename(out)
        return
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if not force:
        raise BundleError(
            f"output {out} is no longer empty (written by another process during the conversion); "
            "nothing was replaced (use --force to replace it)"
        )
    if exchange(tmp, out):
        _remove(tmp)  # now the old bundle
        return
    _two_step_replace(tmp, out)
