"""The bad-input corpus: every case exits 2 with exactly one line on stderr, no traceback, and leaves
nothing behind (no OUT, no ``.OUT.*`` temporary or lock file, no created parent folder).

Cases run in-process through the real CLI entry point (an exception other than CimError would escape
and fail the test); the full-disk cases run in a subprocess whose file-size limit (RLIMIT_FSIZE, with
SIGXFSZ ignored) makes writes fail with EFBIG part-way through the bundle, like a full disk.
"""

from __future__ import annotations

import fcntl
import json
import resource
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_helpers import (
    DEMO_OLMOE,
    RunCli,
    edit_manifest,
    run_cli_subprocess,
    save_micro_llama,
    snapshot,
)
from safetensors.torch import load_file, save_file

from cimconvert import api
from cimconvert.errors import CimError
from cimconvert.evaluation.monte_carlo import NoisyEvalResult
from cimconvert.finite import dumps, nulls_for_non_finite
from cimconvert.plausibility import fail_implausible, plausibility_problems

EVAL_FAST = ["--seeds", "1", "--max-tokens", "32", "--seq-len", "16", "--json"]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@dataclass
class Case:
    """Where a case runs: its folder, a fresh model copy, the demo bundle copy, the output path."""

    root: Path
    model: Path
    bundle: Path
    out: Path
    keep: list[Any] = field(default_factory=list)


def _convert(case: Case, profile: str = "chipA") -> list[str]:
    return [str(case.model), "-p", profile, "-o", str(case.out), "--method", "none", "--no-onnx", "--json"]


def _weights(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def _config(case: Case, **changes: object) -> list[str]:
    path = case.model / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return _convert(case)


def _header_edit(path: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place, padded to its old length (offsets stay valid)."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= length
    path.write_bytes(raw[:8] + text + b" " * (length - len(text)) + raw[8 + length :])


def _retype(case: Case, old: str, new: str) -> list[str]:
    path = _weights(case.model)
    tensors = load_file(path)
    save_file({k: v.to(torch.bfloat16) if old == "BF16" else v for k, v in tensors.items()}, path)
    name = next(n for n in tensors if n.endswith("q_proj.weight"))
    _header_edit(path, lambda h: h[name].update(dtype=new))
    return _convert(case)


def _poison(case: Case, value: float) -> list[str]:
    path = _weights(case.model)
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("o_proj.weight"))
    tensors[name][0, 0] = value
    save_file(tensors, path)
    return _convert(case)


def _index(case: Case, weight_map: object) -> list[str]:
    (case.model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return _convert(case)


def _profile_file(case: Case, text: str, suffix: str = "") -> list[str]:
    path = case.root / "p.yaml"
    path.write_text(text)
    return _convert(case, profile=f"{path}{suffix}")


def _profile(spec: str) -> Callable[[Case], list[str]]:
    return lambda case: ["profiles", "show", spec, "--json"]


def _nonempty_out(case: Case) -> list[str]:
    case.out.mkdir()
    (case.out / "keep.txt").write_text("user data")
    return _convert(case)


def _out_is_file(case: Case) -> list[str]:
    case.out.write_text("x")
    return _convert(case)


def _locked_out(case: Case) -> list[str]:
    lock = case.root / f".{case.out.name}.lock"
    handle = lock.open("w")  # held by the case until the test ends (then closed: the lock is released)
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write("4242\n")
    handle.flush()
    case.keep.append(handle)
    return _convert(case)


def _inspect(change: Callable[[dict], None], relock: bool = True) -> Callable[[Case], list[str]]:
    def setup(case: Case) -> list[str]:
        edit_manifest(case.bundle, change, relock=relock)
        return ["inspect", str(case.bundle), "--json"]

    return setup


def _eval_bundle(change: Callable[[dict], None]) -> Callable[[Case], list[str]]:
    def setup(case: Case) -> list[str]:
        edit_manifest(case.bundle, change)
        return ["eval", str(case.bundle), *EVAL_FAST]

    return setup


def _inspect_after(damage: Callable[[Path], object]) -> Callable[[Case], list[str]]:
    return lambda case: (damage(case.bundle), ["inspect", str(case.bundle), "--json"])[1]


def _dataset(text: bytes | None) -> Callable[[Case], list[str]]:
    def setup(case: Case) -> list[str]:
        data = case.root / "data.txt"
        if text is not None:
            data.write_bytes(text)
        return ["eval", str(case.bundle), "--dataset", str(data), "--seeds", "1", "--json"]

    return setup


def _eval_model(case: Case, profile: str = "chipA", poison: float | None = None) -> list[str]:
    model = case.root / "demo"
    shutil.copytree(DEMO_OLMOE, model)
    if poison is not None:
        path = _weights(model)
        tensors = load_file(path)
        tensors["model.layers.0.self_attn.q_proj.weight"][1, 1] = poison
        save_file(tensors, path, metadata={"format": "pt"})
    return ["eval", str(model), "-p", profile, *EVAL_FAST]


def _symlinked_file(case: Case) -> list[str]:
    outside = case.root / "config-copy.json"
    shutil.copy(case.bundle / "config.json", outside)
    (case.bundle / "config.json").unlink()
    (case.bundle / "config.json").symlink_to(outside)
    return ["inspect", str(case.bundle), "--json"]


def _flip_shard(case: Case) -> list[str]:
    shard = next(case.bundle.glob("analog-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    return ["eval", str(case.bundle), *EVAL_FAST]


def _transform(params: dict) -> Callable[[dict], None]:
    entry = {"id": "t0", "type": "hpd_split", "params": params, "targets": []}
    return lambda m: m["transforms"].append(entry)


def _set(path: str, value: object) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[leaf] = value

    return change


def _mul_noise(data: dict) -> None:
    data["profile"]["profile"]["programming"]["scale"] *= 20


def _move_tensor(data: dict) -> None:
    data["tensors"][0]["unit"] = "digital" if data["tensors"][0]["unit"] == "analog" else "analog"


CASES: dict[str, Callable[[Case], list[str]]] = {
    # ---- checkpoints
    "corrupt-header": lambda c: (_header_bytes(c, b"not json!!!!"), _convert(c))[1],
    "truncated": lambda c: (_truncate(c), _convert(c))[1],
    "header-length-beyond-file": lambda c: (_header_len(c, 10**9), _convert(c))[1],
    "nan-weight": lambda c: _poison(c, float("nan")),
    "inf-weight": lambda c: _poison(c, float("inf")),
    "bf16-labelled-i16": lambda c: _retype(c, "BF16", "I16"),
    "f32-labelled-i32": lambda c: _retype(c, "F32", "I32"),
    "unknown-dtype": lambda c: _retype(c, "F32", "X99"),
    "unknown-model-type": lambda c: _config(c, model_type="not_a_model"),
    "hidden-size-string": lambda c: _config(c, hidden_size="abc"),
    "hidden-size-zero": lambda c: _config(c, hidden_size=0),
    "hidden-size-negative": lambda c: _config(c, hidden_size=-8),
    "hidden-size-contradicts-tensors": lambda c: _config(c, hidden_size=12),
    "config-not-json": lambda c: ((c.model / "config.json").write_text("{nope"), _convert(c))[1],
    "no-config": lambda c: ((c.model / "config.json").unlink(), _convert(c))[1],
    "pickle-only": lambda c: (_weights(c.model).rename(c.model / "pytorch_model.bin"), _convert(c))[1],
    "index-missing-shard": lambda c: _index(c, {"x.weight": "model-00002-of-00002.safetensors"}),
    "index-path-traversal": lambda c: _index(c, {"x.weight": "../model.safetensors"}),
    "index-not-a-mapping": lambda c: _index(c, [1, 2]),
    "missing-tensor": lambda c: (_drop_tensor(c), _convert(c))[1],
    "model-folder-missing": lambda c: [str(c.root / "nope"), "-p", "chipA", "-o", str(c.out), "--json"],
    "model-path-is-a-file": lambda c: [str(_weights(c.model)), "-p", "chipA", "-o", str(c.out), "--json"],
    # ---- profiles
    "unknown-profile": _profile("chipZ"),
    "profile-malformed-yaml": lambda c: _profile_file(c, "name: x\nmapping: [1, 2\n"),
    "profile-yaml-bomb": lambda c: _profile_file(c, BOMB),
    "profile-yaml-bomb-with-override": lambda c: _profile_file(c, BOMB, ":x.y=1"),
    "profile-python-tag": lambda c: _profile_file(c, "name: !!python/name:os.system x\n"),
    "profile-g-max-inf": lambda c: _profile_file(c, "name: p\nmapping: {g_max: .inf}\n"),
    "profile-parameters-not-a-mapping": lambda c: _profile_file(c, "name: p\nparameters: [1, 2]\n", ":a=1"),
    "profile-unknown-field": lambda c: _profile_file(c, "name: p\nbogus: 1\n"),
    "override-unclosed-list": _profile("chipA:tile=["),
    "override-python-object": _profile("chipA:tile=!!python/object/apply:os.system ['true']"),
    "override-float-tag": _profile("chipA:prog_scale=!!float abc"),
    "override-alias": _profile("chipA:tile=*x"),
    "override-t-inference-inf": _profile("chipA:t_inference=.inf"),
    "override-nan": _profile("chipA:prog_scale=.nan"),
    "override-adc-1-bit": _profile("chipA:mvm.adc_bits=1"),
    "override-dac-1-bit": _profile("chipA:mvm.dac_bits=1"),
    "override-deep-nesting": _profile("chipA:tile=" + "[" * 5000),
    "override-huge-int": _profile("chipA:tile=" + "9" * 6000),
    "override-not-key-value": _profile("chipA:tile"),
    "profile-name-with-nul": _profile("chip\x00A"),
    # ---- output folder
    "out-not-empty": _nonempty_out,
    "out-is-a-file": _out_is_file,
    "out-locked-by-another-process": _locked_out,
    # ---- bundles (inspect / eval)
    "manifest-edited-noise-x20": _inspect(_mul_noise, relock=False),
    "manifest-tensor-moved-unit": _inspect(_move_tensor, relock=False),
    "manifest-onnx-entry-deleted": _inspect(lambda m: m["files"].pop(), relock=False),
    "bundle-lock-deleted": _inspect_after(lambda b: (b / "bundle.lock").unlink()),
    "bundle-lock-not-json": _inspect_after(lambda b: (b / "bundle.lock").write_text("{")),
    "files-entry-escapes": _inspect(lambda m: m["files"].append(
        {"name": "../../outside.txt", "sha256": "0" * 64, "bytes": 1})),
    "files-entry-absolute": _inspect(lambda m: m["files"].append(
        {"name": "/outside.txt", "sha256": "0" * 64, "bytes": 1})),
    "shard-not-listed": _inspect(lambda m: m["tensors"][0].update(shard="other.safetensors")),
    "manifest-without-rank": _eval_bundle(_transform({
        "module": "lm_head", "digital": "lm_head.digital.weight", "analog": "lm_head.analog.weight",
        "replaces": [], "in_features": 128, "out_features": 4096, "bias": False})),  # no "rank"
    "manifest-overrides-not-a-mapping": _eval_bundle(_set("placement_config.overrides", 5)),
    "manifest-overrides-not-patterns": _eval_bundle(_set("placement_config.overrides", {"analog": "x"})),
    "manifest-tensor-unit-unknown": _eval_bundle(lambda m: m["tensors"][0].update(unit="optical")),
    "manifest-placement-overrides-null": _eval_bundle(_set("placement_config.overrides", None)),
    "manifest-tensors-missing": _inspect(lambda m: m.pop("tensors")),
    "listed-file-symlinked-outside": _symlinked_file,
    "shard-byte-flipped": _flip_shard,
    "not-a-bundle": lambda c: ["inspect", str(c.root)],
    "validate-without-onnx": lambda c: ["validate", str(c.bundle), "--json"],
    # ---- evaluation inputs
    "dataset-nul-bytes": _dataset(b"some text\x00\x00\x00 and more text " * 20),
    "dataset-empty": _dataset(b"   \n"),
    "dataset-missing": _dataset(None),
    "dataset-not-utf8": _dataset(b"\xff\xfe\xfa" * 100),
    "eval-nan-weights": lambda c: _eval_model(c, poison=float("nan")),
    "eval-inf-weights": lambda c: _eval_model(c, poison=float("-inf")),
    "eval-profile-inf": lambda c: _eval_model(c, profile="chipA:t_inference=.inf"),
}


#: What the one error line must name for some cases (the others only need to be one line, exit 2).
NEEDLES = {
    "out-locked-by-another-process": "PID 4242",
    "bf16-labelled-i16": "dtype I16",
    "f32-labelled-i32": "dtype I32",
    "manifest-edited-noise-x20": "does not match its sha256",
    "files-entry-escapes": "leaves the bundle",
    "listed-file-symlinked-outside": "outside the bundle",
    "dataset-nul-bytes": "NUL bytes",
    "override-adc-1-bit": "greater than or equal to 2",
    "profile-yaml-bomb": "anchors",
    "profile-yaml-bomb-with-override": "anchors",
    "override-python-object": "tags",
    "override-t-inference-inf": "finite",
    "profile-g-max-inf": "finite",
    "eval-nan-weights": "NaN",
    "hidden-size-string": "hidden_size",
    "manifest-without-rank": "rank",
    "bundle-lock-deleted": "no bundle.lock",
}


def _truncate(case: Case) -> None:
    path = _weights(case.model)
    path.write_bytes(path.read_bytes()[:-100])


def _header_bytes(case: Case, junk: bytes) -> None:
    path = _weights(case.model)
    data = bytearray(path.read_bytes())
    data[8 : 8 + len(junk)] = junk
    path.write_bytes(bytes(data))


def _header_len(case: Case, length: int) -> None:
    path = _weights(case.model)
    path.write_bytes(length.to_bytes(8, "little") + path.read_bytes()[8:])


def _drop_tensor(case: Case) -> None:
    path = _weights(case.model)
    tensors = load_file(path)
    tensors.pop(next(n for n in tensors if n.endswith("down_proj.weight")))
    save_file(tensors, path)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(micro llama checkpoint, bundle of the demo tiny-olmoe without ONNX), made once."""
    root = tmp_path_factory.mktemp("corpus-src")
    model = save_micro_llama(root / "micro")
    api.convert(str(DEMO_OLMOE), "chipA", out=root / "bundle", method="none", onnx=False, progress=False)
    return model, root / "bundle"


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_nothing_left(
    name: str, sources: tuple[Path, Path], tmp_path: Path, run_cli: RunCli
) -> None:
    model, bundle = sources
    case = Case(tmp_path, Path(shutil.copytree(model, tmp_path / "model")),
                Path(shutil.copytree(bundle, tmp_path / "bundle")), tmp_path / "out")  # fmt: skip
    argv = CASES[name](case)
    before = snapshot(tmp_path)
    code, out, err = run_cli(*argv)
    assert code == 2, (name, out, err)
    assert out == "" and err.endswith("\n") and len(err.splitlines()) == 1, (name, err)
    assert err.startswith("error: ") and "Traceback" not in err
    assert NEEDLES.get(name, "") in err, (name, err)
    assert snapshot(tmp_path) == before, name  # nothing written, nothing left behind


# ------------------------------------------------------------------ full disk (subprocess, RLIMIT_FSIZE)
def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow
@pytest.mark.parametrize("method", ["auto", "none"])
def test_full_disk_is_one_line_and_leaves_nothing(method: str, tmp_path: Path) -> None:
    src = DEMO_OLMOE  # MoE: "auto" transforms the model, which is saved beside OUT first
    largest = max(p.stat().st_size for p in src.glob("*.safetensors"))
    work = tmp_path / "work"
    work.mkdir()
    out = work / "a" / "b" / "out"
    code, stdout, err = run_cli_subprocess(
        str(src), "-p", "chipA", "-o", str(out), "--method", method, "--no-onnx", "--json",
        preexec_fn=_limit_file_size(largest // 2),
    )
    assert code == 2 and stdout == "", err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert "File too large" in err or "failed" in err
    assert list(work.iterdir()) == []  # no OUT, no a/b parents, no .out.* folders


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hidden-size-zero", "override-python-object", "manifest-without-rank"])
def test_real_process_stderr_is_one_line(name: str, sources: tuple[Path, Path], tmp_path: Path) -> None:
    """Through a real process: Python warnings and library progress bars add no stderr line either."""
    model, bundle = sources
    case = Case(tmp_path, Path(shutil.copytree(model, tmp_path / "model")),
                Path(shutil.copytree(bundle, tmp_path / "bundle")), tmp_path / "out")  # fmt: skip
    argv = CASES[name](case)
    before = snapshot(tmp_path)
    code, out, err = run_cli_subprocess(*argv)
    assert (code, out) == (2, ""), err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------ finite results
def test_strict_json_and_finite_results() -> None:
    assert json.loads(dumps({"a": [1.5, {"b": 2}]})) == {"a": [1.5, {"b": 2}]}
    with pytest.raises(CimError, match=r"a\[1\]\.b is nan"):
        dumps({"a": [1.5, {"b": float("nan")}]})
    assert nulls_for_non_finite({"x": [float("inf"), 1.0]}) == {"x": [None, 1.0]}
    ok = NoisyEvalResult("p", "sha256:" + "0" * 64, [1, 2], 10.0, [11.0, 12.0])
    assert ok.check_finite() is ok
    with pytest.raises(CimError, match="clean perplexity is nan"):
        NoisyEvalResult("p", "h", [1], float("nan"), [1.0]).check_finite()
    with pytest.raises(CimError, match="for seed 2"):
        NoisyEvalResult("p", "h", [1, 2], 10.0, [11.0, float("inf")]).check_finite()


def _validation(ort_noisy: list[float], torch_noisy: list[float], clean: float = 170.0) -> dict:
    def part(values: list[float]) -> dict:
        return {"clean_ppl": clean, "noisy_ppl": {"per_seed": values, "mean": sum(values) / len(values)}}

    return {"seeds": [1000, 1001], "onnxruntime": part(ort_noisy), "torch": part(torch_noisy),
            "summary": {"passed": True}}  # fmt: skip


def test_validate_fails_implausible_perplexities(tmp_path: Path) -> None:
    """Both runtimes agreeing is not enough: 7.8e7 (a 1-bit ADC zeroing every output) or NaN FAILs."""
    assert plausibility_problems(_validation([180.0, 190.0], [180.0, 190.0]), 4096) == []
    absurd = plausibility_problems(_validation([7.8e7, 7.8e7], [7.8e7, 7.8e7]), 4096)
    assert len(absurd) == 2 and "vocabulary size 4096" in absurd[0]
    assert "is nan" in plausibility_problems(_validation([float("nan"), 1.0], [1.0, 1.0]), 4096)[0]
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 4096}))

    @fail_implausible
    def fake_validate() -> dict:
        return {**_validation([7.8e7, 7.8e7], [7.8e7, 7.8e7]), "bundle": str(tmp_path)}

    res = fake_validate()
    assert res["summary"]["passed"] is False and res["summary"]["problems"]
