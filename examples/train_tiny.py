#!/usr/bin/env python
"""Train tiny causal language models used as cimconvert demo checkpoints.

Depends on torch, transformers, tokenizers, safetensors, the standard library
and, for the data split only, ``cimconvert.gutenberg`` (the one place the
train/held-out split is written; fine-tuning's ``gutenberg-train`` uses it too).

Data splits (deterministic, no randomness involved)
---------------------------------------------------
* Source: the 8 Project Gutenberg novels in ``<shared-data>/corpora/gutenberg``
  (processed in sorted file-name order).
* Each book is stripped of its Project Gutenberg header and footer: only the
  text strictly between the ``*** START OF`` line and the ``*** END OF`` line
  is kept.  Line endings are normalised to ``\\n``.
* TRAIN: for each book, the first 90 % of its characters, with the cut moved
  forward to the next blank-line paragraph boundary (``\\n\\n``).
* HELD-OUT: the remaining ~10 % tail of each book.  It is never trained on
  (neither the tokenizer nor the model sees it).  Each tail is split in two
  halves at a paragraph boundary:

  - first half  -> ``cimconvert/shipped_texts/heldout.txt`` (evaluation text), at most
    ``HELDOUT_TOTAL_CHARS / n_books`` characters per book (cut at a paragraph
    boundary), so the file is ~150 KB;
  - second half -> ``cimconvert/shipped_texts/calib.txt`` (calibration text), at most
    ``CALIB_TOTAL_CHARS / n_books`` characters per book, ~100 KB.

  The two files are therefore disjoint by construction.
* WikiText-2 ``wiki.test.raw`` is only used as a second, out-of-domain
  evaluation set.

Model recipe
------------
Byte-level BPE tokenizer (vocab 4096, ``<|endoftext|>`` as bos/eos/pad/unk)
trained on TRAIN only; randomly initialised model built from a config
(``--arch``); AdamW with linear warmup + cosine decay, gradient clipping 1.0,
random fixed-length windows sampled from the concatenated TRAIN tokens.  With
``--time-budget`` the cosine schedule is driven by the elapsed fraction of the
budget (so the schedule ends exactly when the budget runs out); with
``--steps`` it is driven by the step count.

For ``mamba`` the stock transformers CPU scan slices strided tensors per time
step and builds one autograd node per step, which makes training extremely
slow.  During training only, ``mamba_selective_scan`` is replaced by a
numerically equivalent implementation: time-major contiguous tensors and a
custom autograd function (:class:`LinearScan`) whose forward and backward are
one fused in-place op per step.  Before training it is asserted that logits
match the stock code (max abs diff < 1e-4) and that the hand-written backward
matches autograd.  The stock scan is restored for evaluation, and the saved
checkpoint is a standard HF checkpoint that runs with the stock code.  Mamba2's
stock torch path is already chunked and is used as is.

Example::

    python examples/train_tiny.py --arch olmoe --out examples/models/tiny-olmoe \\
        --time-budget 720 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from cimconvert.datasets import shared_data_dir
from cimconvert.gutenberg import gutenberg_books, paragraph_cut
from cimconvert.gutenberg import split_book as split_train_heldout

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_OUT_DIR = REPO_ROOT / "cimconvert" / "shipped_texts"
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
HELDOUT_TOTAL_CHARS = 150_000
CALIB_TOTAL_CHARS = 100_000
EVAL_SEQ_LEN = 256
EVAL_TOKEN_BUDGET = 40_000
MAMBA_NOTE = (
    "trained with a fast CPU selective scan (LinearScan, verified against the stock transformers "
    "scan before training); the checkpoint is a standard HF Mamba checkpoint run by the stock code"
)
ARCHS = ("olmoe", "mamba", "qwen2_moe", "deepseek_v2", "mamba2")


# --------------------------------------------------------------------------- data


@dataclass
class BookSplit:
    """TRAIN / held-out split of one Gutenberg book."""

    name: str
    train: str
    heldout: str
    calib: str


def cap_at_paragraph(text: str, max_chars: int) -> str:
    """Truncate ``text`` to at most ``max_chars``, preferably at a paragraph end."""
    if len(text) <= max_chars:
        return text
    idx = text.rfind("\n\n", 0, max_chars)
    return text[: idx + 2] if idx > 0 else text[:max_chars]


def split_book(name: str, raw: str, n_books: int) -> BookSplit:
    """Split one raw Gutenberg book into TRAIN, held-out and calibration text."""
    book = split_train_heldout(raw)
    train, tail = book.train, book.heldout
    mid = paragraph_cut(tail, len(tail) // 2)
    heldout = cap_at_paragraph(tail[:mid], HELDOUT_TOTAL_CHARS // n_books)
    calib = cap_at_paragraph(tail[mid:], CALIB_TOTAL_CHARS // n_books)
    return BookSplit(name=name, train=train, heldout=heldout, calib=calib)


def load_splits(shared_data: Path) -> list[BookSplit]:
    """Load and split all Gutenberg books in sorted file-name order."""
    files = gutenberg_books(shared_data)
    if not files:
        raise FileNotFoundError(f"no Gutenberg books under {shared_data}")
    return [split_book(f.stem, f.read_text(encoding="utf-8"), len(files)) for f in files]


def write_eval_files(splits: list[BookSplit], out_dir: Path = DATA_OUT_DIR) -> None:
    """Write ``heldout.txt`` and ``calib.txt`` (disjoint held-out text)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    heldout = "\n".join(s.heldout.strip() + "\n" for s in splits)
    calib = "\n".join(s.calib.strip() + "\n" for s in splits)
    (out_dir / "heldout.txt").write_text(heldout, encoding="utf-8")
    (out_dir / "calib.txt").write_text(calib, encoding="utf-8")
    print(f"wrote heldout.txt ({len(heldout)} chars), calib.txt ({len(calib)} chars)")


# --------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (vocab 4096) and wrap it for transformers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=1024,
    )


def encode_corpus(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """Encode documents into one token stream, separated by ``<|endoftext|>``."""
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids: list[int] = []
    for text in texts:
        paragraphs = [p + "\n\n" for p in text.split("\n\n")]
        for enc in tokenizer(paragraphs, add_special_tokens=False)["input_ids"]:
            ids.extend(enc)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


# ------------------------------------------------------------------------ models


def build_config(arch: str, tokenizer: PreTrainedTokenizerFast, max_len: int):
    """Return a small randomly-initialisable config for ``arch``."""
    from transformers import (
        DeepseekV2Config,
        Mamba2Config,
        MambaConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
    )

    eot = tokenizer.convert_tokens_to_ids(EOT)
    common = dict(
        vocab_size=len(tokenizer),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        tie_word_embeddings=True,
    )
    if arch == "olmoe":
        return OlmoeConfig(
            hidden_size=128,
            intermediate_size=192,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.01,
            max_position_embeddings=max_len,
            **common,
        )
    if arch == "qwen2_moe":
        return Qwen2MoeConfig(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            shared_expert_intermediate_size=256,
            decoder_sparse_step=1,
            router_aux_loss_coef=0.01,
            max_position_embeddings=max_len,
            **common,
        )
    if arch == "deepseek_v2":
        return DeepseekV2Config(
            hidden_size=128,
            intermediate_size=384,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            n_routed_experts=8,
            n_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=128,
            first_k_dense_replace=1,
            topk_method="greedy",
            n_group=1,
            topk_group=1,
            kv_lora_rank=64,
            q_lora_rank=None,
            qk_rope_head_dim=16,
            qk_nope_head_dim=32,
            v_head_dim=32,
            head_dim=16,
            max_position_embeddings=max_len,
            **common,
        )
    if arch == "mamba":
        return MambaConfig(
            # state 8 / hidden 128: the CPU scan cost scales with d_inner * state
            hidden_size=128,
            state_size=8,
            num_hidden_layers=8,
            expand=2,
            conv_kernel=4,
            **common,
        )
    if arch == "mamba2":
        return Mamba2Config(
            hidden_size=128,
            state_size=16,
            num_hidden_layers=6,
            expand=2,
            head_dim=32,
            num_heads=8,
            n_groups=1,
            chunk_size=64,
            conv_kernel=4,
            initializer_range=0.02,
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")


def build_model(arch: str, tokenizer: PreTrainedTokenizerFast, max_len: int) -> PreTrainedModel:
    """Build a randomly initialised causal LM for ``arch``."""
    from transformers import AutoModelForCausalLM

    config = build_config(arch, tokenizer, max_len)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def count_params(model: torch.nn.Module) -> int:
    """Number of unique parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------- fast mamba CPU scan

_STOCK_SCAN: dict[str, object] = {}


class LinearScan(torch.autograd.Function):
    """``h[t] = a[t] * h[t-1] + b[t]`` (``h[-1] = 0``) along dim 0, with a hand-written backward.

    Both passes are a Python loop of one fused in-place op per time step into
    preallocated contiguous buffers, which avoids the per-step allocations and
    autograd nodes that make the naive loop slow on CPU.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Run the recurrence and return all states (same shape as ``a``)."""
        a, b = a.contiguous(), b.contiguous()
        h = torch.empty_like(b)
        h[0].copy_(b[0])
        for t in range(1, b.shape[0]):
            torch.addcmul(b[t], a[t], h[t - 1], out=h[t])
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_h: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse recurrence: ``g[t] = grad_h[t] + a[t+1] * g[t+1]``."""
        a, h = ctx.saved_tensors
        g = grad_h.contiguous().clone()
        for t in range(g.shape[0] - 2, -1, -1):
            g[t].addcmul_(a[t + 1], g[t + 1])
        grad_a = torch.zeros_like(a)
        grad_a[1:] = g[1:] * h[:-1]
        return grad_a, g


def check_linear_scan_grad() -> None:
    """Assert that :class:`LinearScan` gradients match a naive autograd loop."""
    gen = torch.Generator().manual_seed(1)
    a = torch.rand(12, 2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    b = torch.randn(12, 2, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    w = torch.randn(12, 2, 3, 4, generator=gen, dtype=torch.float64)
    (LinearScan.apply(a, b) * w).sum().backward()
    fast = (a.grad.clone(), b.grad.clone())
    a.grad, b.grad = None, None
    h, hs = torch.zeros_like(b[0]), []
    for t in range(a.shape[0]):
        h = a[t] * h + b[t]
        hs.append(h)
    (torch.stack(hs) * w).sum().backward()
    err = max((fast[0] - a.grad).abs().max().item(), (fast[1] - b.grad).abs().max().item())
    print(f"fast mamba scan: max |grad diff| vs naive loop = {err:.2e}")
    assert err < 1e-9, f"LinearScan backward mismatch: {err}"


def fast_selective_scan(
    hidden_states: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    **_: object,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan equivalent to transformers' torch fallback, but fast to train.

    Shapes follow the stock function: ``hidden_states``/``dt``/``z`` are
    ``(batch, d_inner, seq)``, ``A`` is ``(d_inner, n)``, ``B``/``C`` are
    ``(batch, n, seq)``.  The recurrence iterates over ``unbind``-ed time steps
    instead of slicing, and the C-contraction is one einsum at the end.
    """
    input_dtype = hidden_states.dtype
    if delta_bias is not None:
        dt = dt + delta_bias.to(dt.dtype)[..., None]
    if delta_softplus:
        dt = F.softplus(dt)
    # time-major, contiguous (l, b, d, n) layout so every unbound step is contiguous
    dt_l = dt.permute(2, 0, 1).float()  # (l, b, d)
    d_a = torch.exp(A[None, None].float() * dt_l[..., None])
    u_l = hidden_states.permute(2, 0, 1).float()  # (l, b, d)
    d_bu = (dt_l * u_l)[..., None] * B.permute(2, 0, 1).float()[:, :, None, :]
    all_states = LinearScan.apply(d_a, d_bu)  # (l, b, d, n)
    state = all_states[-1]
    out = torch.einsum("lbdn,bnl->bdl", all_states.to(input_dtype), C.to(input_dtype))
    if D is not None:
        out = out + hidden_states * D[None, :, None]
    if z is not None:
        out = out * F.silu(z)
    if return_last_state:
        return out, state
    return out


def install_fast_mamba_scan(model: PreTrainedModel) -> None:
    """Patch the Mamba scan with :func:`fast_selective_scan` after verifying it.

    Asserts that logits of ``model`` with the fast scan match the stock
    implementation (max abs diff < 1e-4) on a random input.
    """
    from transformers.models.mamba import modeling_mamba

    _STOCK_SCAN["mamba"] = modeling_mamba.mamba_selective_scan
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits.float()
        modeling_mamba.mamba_selective_scan = fast_selective_scan
        new = model(ids).logits.float()
    diff = (ref - new).abs().max().item()
    print(f"fast mamba scan: max |logit diff| vs stock = {diff:.2e}")
    check_linear_scan_grad()
    if diff >= 1e-4:
        uninstall_fast_mamba_scan()
        raise AssertionError(f"fast mamba scan mismatch: {diff}")
    model.train()


def uninstall_fast_mamba_scan() -> None:
    """Restore the stock Mamba scan (evaluation then uses the stock code)."""
    from transformers.models.mamba import modeling_mamba

    if "mamba" in _STOCK_SCAN:
        modeling_mamba.mamba_selective_scan = _STOCK_SCAN.pop("mamba")


# ---------------------------------------------------------------------- training


@dataclass
class TrainArgs:
    """Hyper-parameters for :func:`train`."""

    lr: float
    min_lr_ratio: float
    warmup: int
    batch: int
    seq: int
    steps: int | None
    time_budget: float | None
    weight_decay: float
    log_every: int
    device: str
    bf16: bool


def batch_iter(tokens: torch.Tensor, batch: int, seq: int, seed: int) -> Iterator[torch.Tensor]:
    """Yield random ``(batch, seq)`` windows of ``tokens`` forever (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    high = len(tokens) - seq - 1
    while True:
        starts = torch.randint(0, high, (batch,), generator=gen)
        yield torch.stack([tokens[s : s + seq] for s in starts.tolist()])


def lr_factor(progress: float, step: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup (by step) followed by cosine decay (by progress in [0, 1])."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(max(progress, 0.0), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: PreTrainedModel, tokens: torch.Tensor, args: TrainArgs, seed: int) -> dict:
    """Train ``model`` in place; return a summary (steps, seconds, losses)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    use_router = hasattr(model.config, "router_aux_loss_coef") and hasattr(
        model.config, "output_router_logits"
    )
    aux_coef = float(getattr(model.config, "router_aux_loss_coef", 0.0)) if use_router else 0.0
    batches = batch_iter(tokens, args.batch, args.seq, seed)
    model.train()
    t0 = time.time()
    step, ema, last_lm = 0, None, float("nan")
    while True:
        elapsed = time.time() - t0
        if args.steps is not None:
            if step >= args.steps:
                break
            progress = step / args.steps
        else:
            assert args.time_budget is not None
            if elapsed >= args.time_budget:
                break
            progress = elapsed / args.time_budget
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_factor(progress, step, args.warmup, args.min_lr_ratio)
        x = next(batches).to(args.device)
        kwargs = {"output_router_logits": True} if use_router else {}
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.bf16 and args.device == "cuda"):
            out = model(input_ids=x, labels=x, **kwargs)
        loss = out.loss
        aux = getattr(out, "aux_loss", None)
        lm_loss = loss - aux_coef * aux if aux is not None else loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        last_lm = lm_loss.item()
        ema = last_lm if ema is None else 0.95 * ema + 0.05 * last_lm
        if step % args.log_every == 0 or step == 1:
            dt = time.time() - t0
            aux_s = f" aux {aux.item():.3f}" if aux is not None else ""
            print(
                f"step {step:5d} | lm loss {last_lm:.3f} (ema {ema:.3f}){aux_s} | "
                f"lr {opt.param_groups[0]['lr']:.2e} | {step * args.batch * args.seq / dt:,.0f} tok/s | "
                f"{dt:.0f}s",
                flush=True,
            )
    return {
        "steps": step,
        "seconds": round(time.time() - t0, 1),
        "final_train_loss_ema": ema,
        "final_train_loss_last_batch": last_lm,
    }


# -------------------------------------------------------------------- evaluation


@torch.no_grad()
def eval_ppl(model: PreTrainedModel, ids: torch.Tensor, seq: int, device: str) -> float:
    """Perplexity over non-overlapping windows of ``seq`` tokens (token-averaged)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq):
        window = ids[start : start + seq].unsqueeze(0).to(device)
        if window.shape[1] < 2:
            break
        logits = model(input_ids=window).logits.float()
        nll = F.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        total += nll.item()
        count += window.shape[1] - 1
    return math.exp(total / count)


def unigram_ppl(train_tokens: torch.Tensor, ids: torch.Tensor, vocab: int, seq: int) -> float:
    """Add-one smoothed unigram PPL (TRAIN frequencies) on the same eval targets."""
    counts = torch.bincount(train_tokens, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    targets = torch.cat([ids[s + 1 : s + seq] for s in range(0, len(ids) - 1, seq)])
    return math.exp(-logp[targets].mean().item())


def eval_tokens(
    tokenizer: PreTrainedTokenizerFast, text: str, budget: int = EVAL_TOKEN_BUDGET
) -> torch.Tensor:
    """Tokenize evaluation text and cap it at the token budget."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:budget], dtype=torch.long)


# -------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", choices=ARCHS, required=True)
    p.add_argument("--out", type=Path, required=True, help="output model folder")
    p.add_argument("--shared-data", type=Path, default=shared_data_dir(),
                   help="shared data folder [$CIMCONVERT_SHARED_DATA]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps")
    p.add_argument("--time-budget", type=float, default=600.0, help="training seconds (if no --steps)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (cuda only)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKEN_BUDGET, help="PPL eval token budget")
    p.add_argument("--save-dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--no-write-data", action="store_true",
                   help="do not (re)write cimconvert/shipped_texts/*.txt")
    return p.parse_args(argv)


def save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out: Path, dtype: str) -> None:
    """Save model (safetensors) and tokenizer into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.to("cpu")
    if dtype == "bfloat16":
        model.to(torch.bfloat16)
    if hasattr(model.config, "output_router_logits"):
        model.config.output_router_logits = False
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    finalize_folder(out)


def finalize_folder(out: Path) -> None:
    """Make tokenizer files portable (transformers 4.x/5.x) and files world-readable.

    Names the generic ``PreTrainedTokenizerFast`` class in ``tokenizer_config.json``
    and writes the legacy ``special_tokens_map.json``.
    """
    cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
    special = {k: EOT for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o644)


def main(argv: list[str] | None = None) -> None:
    """Entry point: split data, train tokenizer + model, evaluate, save."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    random.seed(a.seed)
    torch.manual_seed(a.seed)
    t_start = time.time()

    if a.shared_data is None:
        raise SystemExit("train_tiny: set CIMCONVERT_SHARED_DATA (or --shared-data) to the shared data")
    splits = load_splits(a.shared_data)
    if not a.no_write_data:
        write_eval_files(splits)
    train_texts = [s.train for s in splits]
    tokenizer = train_tokenizer(train_texts)
    train_ids = encode_corpus(tokenizer, train_texts)
    print(f"train tokens: {len(train_ids):,} (vocab {len(tokenizer)})", flush=True)

    model = build_model(a.arch, tokenizer, max_len=max(1024, a.seq)).to(a.device)
    n_params = count_params(model)
    print(f"{a.arch}: {n_params:,} params", flush=True)
    if a.arch == "mamba":
        install_fast_mamba_scan(model)

    hp = TrainArgs(
        lr=a.lr,
        min_lr_ratio=a.min_lr_ratio,
        warmup=a.warmup,
        batch=a.batch,
        seq=a.seq,
        steps=a.steps,
        time_budget=None if a.steps else a.time_budget,
        weight_decay=a.weight_decay,
        log_every=a.log_every,
        device=a.device,
        bf16=a.bf16,
    )
    summary = train(model, train_ids, hp, a.seed)
    if a.arch == "mamba":
        uninstall_fast_mamba_scan()

    heldout_text = "\n".join(s.heldout for s in splits)
    wiki_text = (a.shared_data / "wikitext-2" / "wiki.test.raw").read_text(encoding="utf-8")
    held_ids = eval_tokens(tokenizer, heldout_text, a.eval_tokens)
    wiki_ids = eval_tokens(tokenizer, wiki_text, a.eval_tokens)
    save(model, tokenizer, a.out, a.save_dtype)
    # evaluate the model as saved (stock code, saved dtype cast back to fp32 for scoring)
    model = model.float().to(a.device)
    info = {
        "arch": a.arch,
        "model_type": model.config.model_type,
        "architectures": type(model).__name__,
        "params": n_params,
        "saved_dtype": a.save_dtype,
        "config_summary": summarize_config(model.config),
        "seed": a.seed,
        "steps": summary["steps"],
        "train_seconds": summary["seconds"],
        "batch": a.batch,
        "seq_len": a.seq,
        "peak_lr": a.lr,
        "threads": a.threads,
        "device": a.device,
        "final_train_loss": summary["final_train_loss_ema"],
        "final_train_loss_last_batch": summary["final_train_loss_last_batch"],
        "eval_seq_len": EVAL_SEQ_LEN,
        "eval_tokens_heldout": len(held_ids),
        "eval_tokens_wikitext2": len(wiki_ids),
        "ppl_heldout": eval_ppl(model, held_ids, EVAL_SEQ_LEN, a.device),
        "ppl_wikitext2_test": eval_ppl(model, wiki_ids, EVAL_SEQ_LEN, a.device),
        "unigram_ppl_heldout": unigram_ppl(train_ids, held_ids, len(tokenizer), EVAL_SEQ_LEN),
        "unigram_ppl_wikitext2_test": unigram_ppl(train_ids, wiki_ids, len(tokenizer), EVAL_SEQ_LEN),
        "train_tokens": len(train_ids),
        "total_wall_seconds": round(time.time() - t_start, 1),
        "command": " ".join(sys.argv),
    }
    if a.arch == "mamba":
        info["training_note"] = MAMBA_NOTE
    if a.save_dtype != "float32":
        info["note"] = f"weights saved in {a.save_dtype} to keep the demo folder small; PPL measured on them"
    (a.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: info[k]
                for k in ("params", "steps", "ppl_heldout", "ppl_wikitext2_test", "unigram_ppl_heldout")
            }
        )
    )


def summarize_config(config: object) -> dict:
    """Pick the size-relevant fields of a config for ``training_info.json``."""
    keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "num_experts",
        "n_routed_experts",
        "n_shared_experts",
        "num_experts_per_tok",
        "first_k_dense_replace",
        "router_aux_loss_coef",
        "state_size",
        "expand",
        "head_dim",
        "num_heads",
        "conv_kernel",
        "tie_word_embeddings",
    )
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


if __name__ == "__main__":
    main()
