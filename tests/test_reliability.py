"""Crashes, concurrency and tampering.

- kill -9: a real ``cimconvert`` process is SIGKILLed at named points of a conversion (a hook wraps one
  function so the process kills itself right before or after it runs). Afterwards OUT holds either the
  old bundle (or nothing) or a complete new one, never a mix; the next run on OUT removes (or completes)
  what the killed run left and leaves no stray folder.
- concurrency: a second writer on the same OUT fails at once (exit 2, one line naming the first one's
  PID); a folder filled behind the lock's back is not replaced at the final rename.
- tampering: every single-byte change to every file of a small bundle (manifest and bundle.lock
  included) is detected, and with a signing key an edit that also rewrites the digest is detected too.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from reliability_helpers import (
    DEMO_OLMOE,
    RunCli,
    edit_manifest,
    run_cli_subprocess,
    save_micro_llama,
    subprocess_env,
)

import cimconvert.bundle.writer as writer_mod
from cimconvert import api
from cimconvert.bundle import outdir
from cimconvert.bundle.integrity import LOCK_NAME
from cimconvert.bundle.manifest import Manifest
from cimconvert.bundle.reader import inspect_bundle, read_manifest, verify_bundle
from cimconvert.checkpoint import sha256_file
from cimconvert.errors import BundleError

KILL_SCRIPT = """
import importlib, os, signal, sys
target, when, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
module_name, _, attr_path = target.partition(":")
owner = importlib.import_module(module_name)
*parents, attr = attr_path.split(".")
for name in parents:
    owner = getattr(owner, name)
original = getattr(owner, attr)
calls = [0]
def hook(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    result = original(*args, **kwargs)
    if calls[0] == nth and when == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, attr, hook)
if len(sys.argv) > 5 and sys.argv[4] == "--also":  # a second hook: the exchange reported unsupported
    import cimconvert.bundle.outdir as outdir
    outdir.exchange = lambda a, b: False
    del sys.argv[4:6]
from cimconvert.cli import main
main(sys.argv[4:])
"""


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The micro llama checkpoint (a few kB of weights: a conversion takes well under a second)."""
    return save_micro_llama(tmp_path_factory.mktemp("micro") / "model")


def _args(src: Path, out: Path, *extra: str) -> list[str]:
    return [str(src), "-p", "chipA", "-o", str(out), "--method", "none", "--no-onnx", "--json", *extra]


def _killed_run(hook: str, when: str, nth: int, argv: list[str], also: tuple[str, ...] = ()) -> None:
    """Run the CLI in a child that SIGKILLs itself at the ``nth`` call of ``hook`` (before/after it)."""
    done = subprocess.run([sys.executable, "-c", KILL_SCRIPT, hook, when, str(nth), *also, *argv],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, (hook, done.returncode, done.stderr[-2000:])


def _strays(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _bundle_state(out: Path) -> str:
    """'absent', or the bundle's seed (which run wrote it) after verifying every byte of it."""
    if not out.exists():
        return "absent"
    manifest = read_manifest(out)
    assert verify_bundle(out, manifest) == [], "a partial or mixed bundle"
    return str(manifest.seeds["global"])


# (id, hook target, when, nth call, old bundle present (--force), seed-state allowed after the kill)
KILL_POINTS = [
    ("after-lock", "cimconvert.bundle.outdir:recover_stale", "after", 1, False, {"absent"}),
    ("mid-stream", "cimconvert.bundle.writer:_ShardWriter.write", "before", 3, False, {"absent"}),
    ("after-scales", "cimconvert.bundle.writer:_write_scales", "after", 1, False, {"absent"}),
    ("manifest-not-locked", "cimconvert.bundle.integrity:_write_synced", "after", 1, False, {"absent"}),
    ("before-rename", "cimconvert.bundle.writer:move_into_place", "before", 1, False, {"absent"}),
    ("force-mid-stream", "cimconvert.bundle.writer:_ShardWriter.write", "before", 2, True, {"1"}),
    ("force-before-swap", "cimconvert.bundle.writer:move_into_place", "before", 1, True, {"1"}),
    ("force-after-swap", "cimconvert.bundle.outdir:exchange", "after", 1, True, {"2"}),
]


@pytest.mark.slow
@pytest.mark.parametrize(("point", "hook", "when", "nth", "old", "allowed"), KILL_POINTS,
                         ids=[p[0] for p in KILL_POINTS])  # fmt: skip
def test_kill_9_leaves_old_or_complete_bundle(
    micro: Path, tmp_path: Path, point: str, hook: str, when: str, nth: int, old: bool, allowed: set[str]
) -> None:
    out = tmp_path / "out"
    if old:
        api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False, seed=1)
    _killed_run(hook, when, nth, _args(micro, out, "--seed", "2", *(["--force"] if old else [])))
    assert _bundle_state(out) in allowed, point
    left = _strays(out)
    assert left, "the kill should have left something for the next run to clean"
    res = api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False, seed=3,
                      force=True)
    folders = [name for name in left if name != f".{out.name}.lock"]  # the lock file is simply reused
    assert len(res["recovered"]) == len(folders), (left, res["recovered"])
    assert all("PID" in line for line in res["recovered"])
    assert _strays(out) == [] and _bundle_state(out) == "3"


@pytest.mark.slow
def test_kill_9_between_the_two_renames_is_completed_by_the_next_run(micro: Path, tmp_path: Path) -> None:
    """Where RENAME_EXCHANGE is unsupported, --force renames twice; a kill in between leaves OUT missing
    (documented) and the next run puts the complete new bundle in place."""
    out = tmp_path / "out"
    api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False, seed=1)
    # Path.rename calls: 1 = tmp -> OUT (refused: OUT is not empty), 2 = OUT -> .out.old-PID
    _killed_run("pathlib:Path.rename", "after", 2, _args(micro, out, "--seed", "2", "--force"),
                also=("--also", "unsupported-exchange"))
    assert not out.exists()
    assert any(".old-" in name for name in _strays(out)) and any(".tmp-" in name for name in _strays(out))
    with outdir.out_lock(out) as lock:
        assert any("its new bundle" in line for line in lock.recovered), lock.recovered
    assert _bundle_state(out) == "2" and _strays(out) == []


@pytest.mark.slow
def test_kill_9_with_a_method_removes_the_transformed_copy_next_time(tmp_path: Path) -> None:
    """A killed ROMER run leaves ``.OUT.src-<pid>-*`` (a full model copy); the next run removes it."""
    out = tmp_path / "out"
    argv = [str(DEMO_OLMOE), "-p", "chipA", "-o", str(out), "--no-onnx", "--json"]
    _killed_run("cimconvert.api:_save_transformed", "after", 1, argv)
    assert not out.exists() and any(".src-" in name for name in _strays(out))
    with outdir.out_lock(out) as lock:
        assert any(".src-" in line for line in lock.recovered)
    assert _strays(out) == []


def test_two_step_replace_without_exchange(micro: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "out"
    api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False, seed=1)
    monkeypatch.setattr(outdir, "exchange", lambda a, b: False)
    api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False, seed=2, force=True)
    assert _bundle_state(out) == "2" and _strays(out) == []


def test_exchange_is_used_where_available(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    if not outdir._libc_exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported here")
    assert (b / "x").read_text() == "a" and not (a / "x").exists()


# ------------------------------------------------------------------ concurrency
HOLD_SCRIPT = """
import sys, time
from pathlib import Path
from cimconvert.bundle.outdir import out_lock
with out_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.mark.slow
def test_second_writer_fails_naming_the_first(micro: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "-c", HOLD_SCRIPT, str(out)], env=subprocess_env(),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "locked"
        code, stdout, err = run_cli_subprocess(*_args(micro, out))
        assert code == 2 and stdout == "" and len(err.splitlines()) == 1, err
        assert f"PID {first.pid}" in err and "another cimconvert process" in err
        with pytest.raises(BundleError, match=f"PID {first.pid}"):
            api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False)
        assert not out.exists()
    finally:
        first.communicate("done\n", timeout=60)
    api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False)
    assert _bundle_state(out) == "0" and _strays(out) == []


@pytest.mark.slow
def test_concurrent_conversions_one_wins(micro: Path, tmp_path: Path) -> None:
    """Three real conversions into the same OUT at once: exactly the ones that got the lock succeed, the
    others fail with one line; OUT is one complete bundle; nothing is left beside it."""
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "cimconvert", *_args(micro, out, "--seed", str(k))],
                              env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(3)]  # fmt: skip
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    winners = [k for k, (code, _, _) in enumerate(results) if code == 0]
    assert len(winners) >= 1
    for code, _, err in results:
        if code != 0:
            assert code == 2 and len(err.splitlines()) == 1, err
            assert "another cimconvert process" in err or "not empty" in err
    assert _bundle_state(out) in {str(k) for k in winners} and _strays(out) == []


def test_out_filled_during_conversion_is_not_replaced(micro: Path, tmp_path: Path, monkeypatch) -> None:
    """The emptiness check runs again at the final rename: a folder filled meanwhile is kept."""
    out = tmp_path / "out"
    original = writer_mod._write_scales

    def intruder(folder, *args):
        out.mkdir()
        (out / "theirs.txt").write_text("written by someone else")
        return original(folder, *args)

    monkeypatch.setattr(writer_mod, "_write_scales", intruder)
    with pytest.raises(BundleError, match="no longer empty"):
        api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and _strays(out) == []


# ------------------------------------------------------------------ tampering
@pytest.fixture(scope="module")
def micro_bundle(micro: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tamper") / "bundle"
    api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False)
    return out


def _detected(bundle: Path, manifest: Manifest, changed: Path) -> bool:
    """Whether the readers refuse the bundle after ``changed`` was altered: manifest.json and bundle.lock
    through the full read (digest first), other files through the checksums of the parsed manifest."""
    if changed.name in ("manifest.json", LOCK_NAME):
        try:
            read_manifest(bundle)
        except BundleError:
            return True
        return False
    return bool(verify_bundle(bundle, manifest))


@pytest.mark.slow
def test_every_single_byte_change_is_detected(micro_bundle: Path, tmp_path: Path) -> None:
    """Flip one bit of each byte of each file in turn: every byte of manifest.json and bundle.lock, and
    every ``CIMCONVERT_TAMPER_STRIDE``-th byte (default 4; 1 = all) of the other files, whose per-file
    sha256 predates the lock (and whose check costs a full verification per trial)."""
    bundle = Path(shutil.copytree(micro_bundle, tmp_path / "b"))
    manifest = read_manifest(bundle)
    files = sorted(p for p in bundle.rglob("*") if p.is_file())
    assert {"manifest.json", LOCK_NAME, "config.json"} <= {p.name for p in files}
    stride = int(os.environ.get("CIMCONVERT_TAMPER_STRIDE", "4"))
    trials = missed = 0
    for path in files:
        original = path.read_bytes()
        step = 1 if path.name in ("manifest.json", LOCK_NAME) else stride
        for pos in sorted({*range(0, len(original), step), len(original) - 1}):
            damaged = bytearray(original)
            damaged[pos] ^= 0x01
            path.write_bytes(bytes(damaged))
            trials += 1
            missed += not _detected(bundle, manifest, path)
        path.write_bytes(original)
    print(f"tamper trials: {trials} single-byte changes over {len(files)} files, stride {stride}")
    assert trials >= (bundle / "manifest.json").stat().st_size + (bundle / LOCK_NAME).stat().st_size
    assert missed == 0, f"{missed} of {trials} single-byte changes went undetected"
    assert _bundle_state(bundle) == "0"


@pytest.mark.parametrize("edit", ["noise-x20", "tensor-to-other-unit", "all-digital", "drop-file-entry"])
def test_manifest_edits_detected(micro_bundle: Path, tmp_path: Path, edit: str) -> None:
    bundle = Path(shutil.copytree(micro_bundle, tmp_path / "b"))

    def change(data: dict) -> None:
        if edit == "noise-x20":
            data["profile"]["profile"]["programming"]["scale"] *= 20
        elif edit == "tensor-to-other-unit":
            data["tensors"][0]["unit"] = "analog" if data["tensors"][0]["unit"] == "digital" else "digital"
        elif edit == "all-digital":
            for tensor in data["tensors"]:
                tensor["unit"] = "digital"
        else:
            data["files"].pop()

    edit_manifest(bundle, change, relock=False)
    with pytest.raises(BundleError, match="does not match its sha256"):
        inspect_bundle(bundle)
    with pytest.raises(BundleError, match="does not match its sha256"):
        api.load_bundle(bundle)


def test_signed_bundle_detects_a_rewritten_digest(micro: Path, tmp_path: Path, monkeypatch) -> None:
    """With a key the bundle.lock carries an HMAC: an editor who rewrites the digest without the key is
    caught; without a key a rewritten digest passes (the documented limit of a bare digest)."""
    monkeypatch.setenv("CIMCONVERT_SIGNING_KEY", "test-key-1")
    out = tmp_path / "signed"
    api.convert(str(micro), "chipA", out=out, method="none", onnx=False, progress=False)
    assert inspect_bundle(out)["signed"] and inspect_bundle(out)["signature_verified"]
    lock = json.loads((out / LOCK_NAME).read_text())
    assert lock["hmac_sha256"] and len(lock["hmac_sha256"]) == 64

    def noisier(data: dict) -> None:
        data["profile"]["profile"]["programming"]["scale"] *= 20

    monkeypatch.delenv("CIMCONVERT_SIGNING_KEY")
    edit_manifest(out, noisier)  # digest rewritten, no key: the HMAC is dropped
    assert inspect_bundle(out)["verified"]  # a bare digest cannot tell
    monkeypatch.setenv("CIMCONVERT_SIGNING_KEY", "test-key-1")
    with pytest.raises(BundleError, match="not signed"):
        inspect_bundle(out)
    monkeypatch.setenv("CIMCONVERT_TEST_RELOCK_KEY", "a-guessed-key")
    edit_manifest(out, noisier)
    with pytest.raises(BundleError, match="signature does not match"):
        read_manifest(out)
    with pytest.raises(BundleError, match="signature does not match"):
        inspect_bundle(out, key="a-wrong-key")


def test_paths_outside_the_bundle_are_refused(micro_bundle: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(micro_bundle, tmp_path / "b"))
    outside = tmp_path / "hostname"
    outside.write_text("machine\n")

    entry = {"name": "../hostname", "sha256": sha256_file(outside), "bytes": outside.stat().st_size}
    edit_manifest(bundle, lambda m: m["files"].append(entry))
    with pytest.raises(BundleError, match="leaves the bundle"):
        inspect_bundle(bundle)



@pytest.mark.skipif(not os.environ.get("CIMCONVERT_RANDOM_KILLS"),
                    reason="set CIMCONVERT_RANDOM_KILLS=N for N kill -9 trials at random times")  # fmt: skip
def test_kill_9_at_random_times(tmp_path: Path) -> None:
    """``--force`` conversions of the demo OLMoE killed at a random moment after they took the lock: OUT
    is always the previous or the new complete bundle, and the next run leaves nothing beside it."""
    rng = random.Random(int(os.environ.get("CIMCONVERT_RANDOM_KILLS_SEED", "0")))
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    api.convert(str(DEMO_OLMOE), "chipA", out=out, method="none", onnx=False, progress=False, seed=0)
    previous, outcomes = "0", {"killed": 0, "finished": 0, "kept old bundle": 0, "new bundle": 0}
    window = float(os.environ.get("CIMCONVERT_RANDOM_KILLS_WINDOW", "4.0"))
    for trial in range(1, int(os.environ["CIMCONVERT_RANDOM_KILLS"]) + 1):
        proc = subprocess.Popen([sys.executable, "-m", "cimconvert", *_args(DEMO_OLMOE, out, "--force"),
                                 "--seed", str(trial)], env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        while not lock.exists() and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, window))
        proc.send_signal(signal.SIGKILL)
        code = proc.wait()
        outcomes["killed" if code == -signal.SIGKILL else "finished"] += 1
        state = _bundle_state(out)
        assert state in {previous, str(trial)}, (trial, state)
        outcomes["new bundle" if state == str(trial) else "kept old bundle"] += 1
        with outdir.out_lock(out):
            pass
        assert _strays(out) == [] and _bundle_state(out) == state
        previous = state
    print(f"random kills: {outcomes}")


def test_key_file_on_the_command_line(
    micro: Path, tmp_path: Path, run_cli: RunCli
) -> None:
    good, bad = tmp_path / "good.key", tmp_path / "bad.key"
    good.write_text("k-1\n")
    bad.write_text("k-2\n")
    out = tmp_path / "b"
    code, _, err = run_cli(*_args(micro, out, "--key", str(good)))
    assert code == 0, err
    code, stdout, _ = run_cli("inspect", str(out), "--key", str(good))
    assert code == 0 and "signature OK" in stdout
    code, stdout, err = run_cli("inspect", str(out), "--key", str(bad))
    assert code == 2 and stdout == "" and len(err.splitlines()) == 1 and "signature" in err
