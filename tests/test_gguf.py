"""GGUF input: a real GGUF file (written here with the gguf package) through convert, eval and load_bundle;
bad GGUF files give one line and exit 2 with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from reliability_helpers import RunCli
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from cimconvert.analysis import analyze
from cimconvert.api import convert, inspect, load_bundle
from cimconvert.errors import ModelInputError
from cimconvert.finetune import finetune
from cimconvert.gguf import read_gguf_info

VOCAB = 300
#: HF Llama parameter suffix → llama.cpp GGUF tensor name (per block).
_BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_names(layers: int) -> dict[str, str]:
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(layers):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{g}.weight"
                      for hf, g in _BLOCK_NAMES.items()})
    return names


def _add_tokenizer(writer: gguf.GGUFWriter) -> None:
    """A byte-level BPE vocabulary (256 byte symbols, a few merges, padding tokens) like GPT-2's."""
    merges = ["Ġ t", "h e", "Ġ a", "i n", "e r"]
    tokens = list(bytes_to_unicode().values()) + [m.replace(" ", "") for m in merges]
    tokens += [f"<extra_{i}>" for i in range(VOCAB - len(tokens))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * VOCAB)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)


def write_tiny_gguf(
    path: Path,
    quant: str = "Q8_0",
    architecture: str = "llama",
    tokenizer: bool = True,
    raw_override: tuple[str, gguf.GGMLQuantizationType] | None = None,
) -> Path:
    """A tiny random Llama (2 layers, hidden 64) written as a GGUF file, 2-D weights in ``quant``."""
    layers = 2
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(16)
    writer.add_vocab_size(VOCAB)
    file_type = gguf.LlamaFileType.ALL_F32 if quant == "F32" else gguf.LlamaFileType[f"MOSTLY_{quant}"]
    writer.add_file_type(file_type)
    if tokenizer:
        _add_tokenizer(writer)
    names = _gguf_names(layers)
    for key, value in model.state_dict().items():
        array = value.numpy().astype(np.float32)
        name = names[key]
        if raw_override and name == raw_override[0]:
            kind = raw_override[1]
            block, type_size = gguf.GGML_QUANT_SIZES[kind]
            rows = array.size // block
            writer.add_tensor(name, np.zeros((rows, type_size), dtype=np.uint8), raw_dtype=kind)
        elif array.ndim == 2 and quant != "F32" and name != "token_embd.weight":
            kind = gguf.GGMLQuantizationType[quant]
            writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Q8_0 Llama GGUF file."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf")


def _reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the GGUF model as transformers itself loads it (the dequantised source)."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(ids).logits


def test_header_info(tiny_gguf: Path) -> None:
    info = read_gguf_info(tiny_gguf)
    assert info.model_type == "llama" and info.file_type == "MOSTLY_Q8_0"
    assert info.tensor_types == {"F32": 6, "Q8_0": 15} and info.dtype == "float32"
    assert len(info.sha256) == 64


def test_convert_gguf_bundle_equals_dequantised_source(tiny_gguf: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    res = convert(str(tiny_gguf), "chipA", out=out, method="none", progress=False)
    assert res["totals"]["analog_tensors"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    source = manifest["source"]
    assert source["path"] == str(tiny_gguf.resolve())
    assert source["gguf"]["sha256"] == read_gguf_info(tiny_gguf).sha256
    assert source["gguf"]["file_type"] == "MOSTLY_Q8_0" and source["gguf"]["dtype"] == "float32"
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = load_bundle(out)(ids).logits
    assert torch.equal(got, _reference_logits(tiny_gguf, ids))
    report = inspect(out)
    assert report["verified"], report["problems"]


def test_folder_with_one_gguf_and_dtype(tiny_gguf: Path, tmp_path: Path,
                                        run_cli: RunCli) -> None:
    folder = tmp_path / "holder"
    folder.mkdir()
    (folder / tiny_gguf.name).symlink_to(tiny_gguf)
    out = tmp_path / "bf16"
    code, stdout, err = run_cli(str(folder), "--profile", "chipA", "-o", str(out), "--method", "none",
                                "--no-onnx", "--dtype", "bfloat16", "--json")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["gguf"]["dtype"] == "bfloat16"
    assert {t["dtype"] for t in manifest["tensors"]} == {"BF16"}
    assert json.loads(stdout)["out"] == str(out)


def test_eval_on_gguf(tiny_gguf: Path, run_cli: RunCli) -> None:
    code, stdout, err = run_cli("eval", str(tiny_gguf), "--profile", "chipB", "--seeds", "1",
                                "--max-tokens", "256", "--seq-len", "64", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert res["tokens"] == 256 and len(res["per_seed"]) == 1
    assert res["per_seed"][0] != res["clean_ppl"]


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def _garbage(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[8:64] = bytes(range(56))  # version, counts and the first key: nonsense
    dst.write_bytes(bytes(data))
    return dst


def _not_gguf(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"this is a text file, not a model\n" * 10)
    return dst


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (_truncated, "corrupt or truncated GGUF"),
        (_garbage, "corrupt or truncated GGUF"),
        (_not_gguf, "not a GGUF file"),
        (lambda src, dst: write_tiny_gguf(dst, architecture="bert"), "GGUF architecture 'bert'"),
        (lambda src, dst: write_tiny_gguf(dst, architecture="phi3"), "unsupported model type 'phi3'"),
        (lambda src, dst: write_tiny_gguf(dst, tokenizer=False), "has no tokenizer"),
        (
            lambda src, dst: write_tiny_gguf(
                dst, raw_override=("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q8_K)
            ),
            "quantisation type Q8_K",
        ),
    ],
    ids=["truncated", "garbage", "not-gguf", "arch-unknown", "arch-unsupported", "no-tokenizer",
         "quant-type"],
)
def test_bad_gguf_one_line_exit_2(make, needle: str, tiny_gguf: Path, tmp_path: Path,
                                  run_cli: RunCli) -> None:
    bad = make(tiny_gguf, tmp_path / "bad.gguf")
    out = tmp_path / "out"
    code, _, err = run_cli(str(bad), "--profile", "chipA", "-o", str(out), "--method", "none")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_dtype_refused_for_safetensors_input(tmp_path: Path) -> None:
    _, folder = save_tiny("llama", tmp_path / "llama")
    with pytest.raises(ModelInputError, match="--dtype applies to GGUF input only"):
        convert(str(folder), "chipA", out=tmp_path / "out", method="none", dtype="float16", progress=False)


def test_folder_with_two_ggufs_is_refused(tiny_gguf: Path, tmp_path: Path) -> None:
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).symlink_to(tiny_gguf)
    with pytest.raises(ModelInputError, match=r"holds 2 \.gguf files"):
        convert(str(tmp_path), "chipA", out=tmp_path / "out", method="none", progress=False)


def test_analyze_and_finetune_take_gguf(tiny_gguf: Path, tmp_path: Path) -> None:
    scan = analyze(str(tiny_gguf), "chipB", seeds=1, granularity="block", out=tmp_path / "scan",
                   max_tokens=128, seq_len=64, progress=False)
    assert [row["name"] for row in scan["rows"]][:1] and (tmp_path / "scan" / "sensitivity.json").is_file()
    res = finetune(str(tiny_gguf), "chipB", method="ste", out=tmp_path / "ft", data="calib", steps=2,
                   batch_size=2, seq_len=32, max_tokens=2048, progress=False)
    assert (tmp_path / "ft" / "config.json").is_file() and res["steps"] == 2 and len(res["losses"]) == 2
