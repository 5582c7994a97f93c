"""MoEfication of a dense Llama-architecture model into a standard Mixtral checkpoint (training-free).

Usage (from the repository root)::

    python examples/moefy.py models/smollm2-135m-instruct models/smollm2-135m-moe \\
        --experts 8 --top-k 6 --router lsq --seed 0 --calib-tokens 4096

Every decoder layer's SwiGLU FFN (``down(silu(gate x) * up x)``, intermediate size ``I``) is split into
``E`` experts of ``I/E`` neurons each by *balanced* k-means over the neurons' weight vectors (rows of
``gate_proj`` and ``up_proj``, each L2-normalised, concatenated). Because the FFN is a sum over its
neurons, the sum of all ``E`` partial FFNs *is* the dense FFN. Each layer's router (``mlp.gate``,
``[E, H]``, no bias) is fitted on calibration text only:

* ``lsq`` (default): ridge least squares from the layer's FFN input (the post-attention-RMSNorm hidden
  state of the dense model) onto each expert's *activation mass* ``sum_i |a_i(x)| * ||down[:, i]||``
  (``a = silu(gate x) * up x``, the expert's neurons ``i``): a linear probe of how much each expert
  would contribute.
* ``centroid``: MoEfication's similarity router; row ``e`` is the mean of the expert's normalised
  ``gate_proj`` rows (no data used; the calibration text only sets the temperature below).

Combination weights. Mixtral's router computes ``softmax -> top-k -> renormalise``, so the selected
experts' weights sum to 1, whereas MoEfication *sums* the selected partial FFNs. The construction scales
the router down (a temperature) until the logits' mean per-token standard deviation on the calibration
tokens is ``--logit-spread`` (default 1e-3): top-k selection is scale invariant, and the renormalised
weights are then ``1/k`` up to ~``--logit-spread``; every expert's ``down_proj`` is multiplied by ``k``.
With ``k = E`` the MoE reproduces the dense model up to that deviation (exactly with
``--logit-spread 0``, which however leaves selection to tie-breaking and is only meaningful for
``k = E``). ``--logit-spread 1`` gives the other design: a soft, weighted combination of the selected
experts (not exact at ``k = E``).

Output: ``save_pretrained`` of a ``MixtralForCausalLM`` (per-expert keys on disk), the tokenizer files,
and ``moefication.json`` with every option, the seed, the clusters and the fit statistics per layer.
Randomness: k-means++ initialisation from ``--seed`` (torch generator); calibration windows are the
first ``--calib-tokens`` tokens of the ``--calib-data`` corpus (default: the shipped ``calib`` text).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

#: Tokenizer / chat files copied next to the weights when present in the dense folder.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
ROUTERS = ("lsq", "centroid")


@dataclass
class MoefyOptions:
    """Every option of a MoEfication run (recorded verbatim in ``moefication.json``)."""

    experts: int = 8
    top_k: int = 6
    router: str = "lsq"
    seed: int = 0
    calib_data: str = "calib"
    calib_tokens: int = 4096
    calib_seq_len: int = 256
    kmeans_iters: int = 25
    ridge: float = 1e-2
    logit_spread: float = 1e-3
    dtype: str = "float32"


@dataclass
class LayerFit:
    """Per-layer result: the neuron partition, the router and its fit statistics."""

    clusters: list[list[int]]
    router: torch.Tensor  # [E, H], already temperature-scaled
    stats: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    """Progress line on stderr (stdout stays free for results)."""
    print(f"[moefy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- clustering
def _kmeans_pp(x: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ initial centroids (seeded by ``gen``)."""
    first = int(torch.randint(x.shape[0], (1,), generator=gen))
    cents = [x[first]]
    d2 = ((x - cents[0]) ** 2).sum(1)
    for _ in range(1, n):
        idx = int(torch.multinomial(d2 / d2.sum(), 1, generator=gen))
        cents.append(x[idx])
        d2 = torch.minimum(d2, ((x - x[idx]) ** 2).sum(1))
    return torch.stack(cents)


def _balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Greedy equal-capacity assignment: (point, cluster) pairs in order of increasing distance."""
    n_points, n_clusters = dist.shape
    labels = [-1] * n_points
    room = [capacity] * n_clusters
    left = n_points
    for flat in torch.argsort(dist.flatten(), stable=True).tolist():
        p, c = divmod(flat, n_clusters)
        if labels[p] >= 0 or room[c] == 0:
            continue
        labels[p] = c
        room[c] -= 1
        left -= 1
        if left == 0:
            break
    return torch.tensor(labels, dtype=torch.long)


def balanced_kmeans(
    x: torch.Tensor, n_clusters: int, seed: int, iters: int = 25
) -> tuple[torch.Tensor, dict]:
    """Partition the rows of ``x`` into ``n_clusters`` clusters of exactly ``len(x) / n_clusters`` rows.

    Lloyd iterations whose assignment step is a greedy balanced assignment; k-means++ initialisation
    seeded by ``seed``. Returns the labels and ``{"iters", "inertia"}``.
    """
    n = x.shape[0]
    if n % n_clusters:
        raise ValueError(f"{n} neurons do not split into {n_clusters} equal experts")
    gen = torch.Generator().manual_seed(seed)
    x = x.double()
    cents = _kmeans_pp(x, n_clusters, gen)
    labels = torch.full((n,), -1, dtype=torch.long)
    done = 0
    for step in range(1, iters + 1):
        done = step
        new = _balanced_assign(torch.cdist(x, cents), n // n_clusters)
        if torch.equal(new, labels):
            break
        labels = new
        cents = torch.stack([x[labels == c].mean(0) for c in range(n_clusters)])
    inertia = float(((x - cents[labels]) ** 2).sum())
    return labels, {"iters": done, "inertia": inertia}


def neuron_features(gate_w: torch.Tensor, up_w: torch.Tensor) -> torch.Tensor:
    """Clustering features of the FFN neurons: ``[gate_i/|gate_i|, up_i/|up_i|]`` (``[I, 2H]``)."""
    return torch.cat([F.normalize(gate_w.float(), dim=1), F.normalize(up_w.float(), dim=1)], dim=1)


# ------------------------------------------------------------------------------------------------ routers
def activation_mass(
    x: torch.Tensor, gate_w: torch.Tensor, up_w: torch.Tensor, down_w: torch.Tensor, clusters: list[list[int]]
) -> torch.Tensor:
    """Per-expert activation mass ``[T, E]``: ``sum_{i in e} |a_i(x)| * ||down[:, i]||``."""
    act = F.silu(x @ gate_w.T) * (x @ up_w.T)
    weighted = act.abs() * down_w.norm(dim=0)
    return torch.stack([weighted[:, idx].sum(1) for idx in clusters], dim=1)


def fit_router_lsq(x: torch.Tensor, mass: torch.Tensor, ridge: float) -> torch.Tensor:
    """Ridge least squares ``W [E, H]`` with ``x @ W.T ~ mass``; ``ridge`` is relative to mean diag(X^T X)."""
    xd = x.double()
    gram = xd.T @ xd
    lam = ridge * float(gram.diagonal().mean())
    sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ mass.double())
    return sol.T.float()


def router_centroid(gate_w: torch.Tensor, clusters: list[list[int]]) -> torch.Tensor:
    """MoEfication's similarity router: the mean normalised ``gate_proj`` row of each expert (``[E, H]``)."""
    g = F.normalize(gate_w.float(), dim=1)
    return torch.stack([g[idx].mean(0) for idx in clusters])


def topk_recall(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Mean fraction of the true top-k experts (by activation mass) that ``scores`` also put in its top-k."""
    pred = F.one_hot(scores.topk(k, dim=1).indices, scores.shape[1]).sum(1)
    true = F.one_hot(mass.topk(k, dim=1).indices, scores.shape[1]).sum(1)
    return float((pred * true).sum(1).float().mean() / k)


def mass_captured(scores: torch.Tensor, mass: torch.Tensor, k: int) -> float:
    """Mean fraction of the total activation mass carried by the experts that ``scores`` selects."""
    sel = mass.gather(1, scores.topk(k, dim=1).indices).sum(1)
    return float((sel / mass.sum(1).clamp_min(1e-12)).mean())


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log2(p.clamp_min(1e-30))).sum(-1)


@torch.no_grad()
def fit_layer(
    x: torch.Tensor,
    gate_w: torch.Tensor,
    up_w: torch.Tensor,
    down_w: torch.Tensor,
    opts: MoefyOptions,
    layer_seed: int,
) -> LayerFit:
    """Cluster one layer's neurons and fit its router on the calibration inputs ``x [T, H]``."""
    labels, km = balanced_kmeans(neuron_features(gate_w, up_w), opts.experts, layer_seed, opts.kmeans_iters)
    clusters = [torch.nonzero(labels == e).flatten().tolist() for e in range(opts.experts)]
    mass = activation_mass(x, gate_w, up_w, down_w, clusters)
    if opts.router == "lsq":
        w = fit_router_lsq(x, mass, opts.ridge)
        pred = x @ w.T
        resid = ((pred - mass) ** 2).sum()
        r2 = float(1 - resid / ((mass - mass.mean(0)) ** 2).sum())
    elif opts.router == "centroid":
        w = router_centroid(gate_w, clusters)
        r2 = float("nan")
    else:
        raise ValueError(f"unknown router {opts.router!r} (choose from {ROUTERS})")
    logits = x @ w.T
    spread = float(logits.std(dim=1).mean())
    scale = opts.logit_spread / spread if spread > 0 else 0.0
    k = opts.top_k
    sel = F.one_hot(logits.topk(k, dim=1).indices, opts.experts).sum(1).sum(0).float()
    load = sel / sel.sum()
    unit = logits / max(spread, 1e-30)  # logits standardised to unit per-token spread
    stats = {
        "kmeans_iters": km["iters"],
        "kmeans_inertia": km["inertia"],
        "router_r2": r2,
        "topk_recall": topk_recall(logits, mass, k),
        "mass_captured": mass_captured(logits, mass, k),
        "oracle_mass_captured": mass_captured(mass, mass, k),
        "raw_logit_spread": spread,
        "router_scale": scale,
        "calib_load": [round(float(v), 5) for v in load],
        "calib_load_entropy_bits": float(_entropy_bits(load)),
        "token_entropy_bits_stored": float(_entropy_bits(torch.softmax(logits * scale, 1)).mean()),
        "token_entropy_bits_unit_spread": float(_entropy_bits(torch.softmax(unit, 1)).mean()),
    }
    return LayerFit(clusters=clusters, router=(w * scale).float(), stats=stats)


# ---------------------------------------------------------------------------------------------- the model
def load_dense(folder: str | Path, dtype: str = "float32") -> torch.nn.Module:
    """The dense Llama model in ``folder`` (eval mode, ``dtype``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
    if model.config.model_type != "llama":
        raise SystemExit(f"moefy: expected a llama checkpoint, got {model.config.model_type!r}")
    if getattr(model.config, "attention_bias", False) or getattr(model.config, "mlp_bias", False):
        raise SystemExit("moefy: attention/mlp biases have no place in Mixtral's layout")
    return model.eval()


@torch.no_grad()
def collect_ffn_inputs(model: torch.nn.Module, tokens: torch.Tensor, batch: int = 4) -> list[torch.Tensor]:
    """The FFN input (post-attention RMSNorm output) of every decoder layer on ``tokens [N, S]``.

    Returns one ``[N*S, H]`` float32 tensor per layer.
    """
    layers = model.model.layers
    store: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.mlp.register_forward_pre_hook(
            lambda _m, args, i=i: store[i].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(layers)
    ]
    try:
        for rows in torch.split(tokens, batch):
            model(input_ids=rows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(s).float() for s in store]


def mixtral_config(dense_cfg: Any, opts: MoefyOptions) -> Any:
    """A MixtralConfig with the dense model's attention/embedding geometry and ``E`` experts of ``I/E``."""
    from transformers import MixtralConfig

    c = dense_cfg
    cfg = MixtralConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size // opts.experts,
        num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters=dict(c.rope_parameters),
        attention_dropout=0.0,
        sliding_window=None,
        num_local_experts=opts.experts,
        num_experts_per_tok=opts.top_k,
    )
    cfg.dtype = opts.dtype
    return cfg


@torch.no_grad()
def build_moe(dense: torch.nn.Module, fits: list[LayerFit], opts: MoefyOptions) -> torch.nn.Module:
    """The MixtralForCausalLM holding ``dense``'s weights, with each FFN split per ``fits``."""
    from transformers import MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding

    cfg = mixtral_config(dense.config, opts)
    with torch.device("meta"):  # no random init of ~all parameters; every tensor is assigned below
        moe = MixtralForCausalLM(cfg)
    moe.model.rotary_emb = MixtralRotaryEmbedding(cfg)  # its buffers are not in the state dict
    sd: dict[str, torch.Tensor] = {}
    for name, tensor in dense.state_dict().items():
        if ".mlp." not in name:
            sd[name] = tensor
    for i, (layer, fit) in enumerate(zip(dense.model.layers, fits, strict=True)):
        g, u, d = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight, layer.mlp.down_proj.weight
        idx = [torch.tensor(c) for c in fit.clusters]
        sd[f"model.layers.{i}.mlp.gate.weight"] = fit.router.to(g.dtype)
        sd[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([g[j], u[j]]) for j in idx])
        sd[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([d[:, j] * opts.top_k for j in idx])
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    moe.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        moe.tie_weights()
    missing = [n for n, p in [*moe.named_parameters(), *moe.named_buffers()] if p.is_meta]
    if missing:
        raise RuntimeError(f"moefy: parameters left unset: {missing[:5]}")
    return moe.eval()


@torch.no_grad()
def set_top_k(moe: torch.nn.Module, k: int) -> None:
    """Change ``num_experts_per_tok`` of a built MoE in place (rescales ``down_proj`` from old k to ``k``)."""
    old = moe.config.num_experts_per_tok
    for layer in moe.model.layers:
        layer.mlp.top_k = k
        layer.mlp.gate.top_k = k
        layer.mlp.experts.down_proj.mul_(k / old)
    moe.config.num_experts_per_tok = k


class OracleRouting:
    """Context manager: route every MoE layer of a built model by the true top-k activation mass.

    A diagnostic only (it needs every expert's activations, so it saves no compute): it replaces each
    router's output with the k experts of largest ``sum_i |a_i(x)| * ||down[:, i]||`` at weight ``1/k``,
    which separates the loss due to the neuron partition from the loss due to the linear router.
    """

    def __init__(self, moe: torch.nn.Module) -> None:
        self.moe = moe
        self.hooks: list[Any] = []

    @staticmethod
    def _hook(block: torch.nn.Module) -> Any:
        def fn(_m: torch.nn.Module, args: tuple, out: tuple) -> tuple:
            x = args[0].reshape(-1, args[0].shape[-1])
            ex = block.experts
            gate, up = torch.einsum("th,efh->tef", x, ex.gate_up_proj).chunk(2, dim=-1)
            mass = (ex.act_fn(gate) * up).abs().mul(ex.down_proj.norm(dim=1)).sum(-1)
            k = block.gate.top_k
            idx = mass.topk(k, dim=-1).indices
            return out[0], torch.full(idx.shape, 1.0 / k, dtype=out[1].dtype), idx

        return fn

    def __enter__(self) -> OracleRouting:
        self.hooks = [
            layer.mlp.gate.register_forward_hook(self._hook(layer.mlp)) for layer in self.moe.model.layers
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def calibration_ids(tokenizer: Any, opts: MoefyOptions) -> torch.Tensor:
    """``[calib_tokens / calib_seq_len, calib_seq_len]`` windows from the start of ``opts.calib_data``."""
    from cimconvert.datasets import load_text
    from cimconvert.methods.calibration import calibration_batches

    samples = max(1, opts.calib_tokens // opts.calib_seq_len)
    return calibration_batches(
        load_text(opts.calib_data), tokenizer, samples, opts.calib_seq_len, name=opts.calib_data
    )


@torch.no_grad()
def fit_all(
    dense: torch.nn.Module, inputs: list[torch.Tensor], opts: MoefyOptions, progress: bool = True
) -> list[LayerFit]:
    """Cluster and fit the router of every layer (layer ``i`` seeded with ``opts.seed * 1000 + i``)."""
    fits = []
    for i, (layer, x) in enumerate(zip(dense.model.layers, inputs, strict=True)):
        m = layer.mlp
        fit = fit_layer(
            x,
            m.gate_proj.weight.float(),
            m.up_proj.weight.float(),
            m.down_proj.weight.float(),
            opts,
            opts.seed * 1000 + i,
        )
        fits.append(fit)
        if progress:
            s = fit.stats
            log(
                f"layer {i:2d}: kmeans {s['kmeans_iters']} it, R2 {s['router_r2']:.3f}, "
                f"top-{opts.top_k} recall {s['topk_recall']:.3f}, mass {s['mass_captured']:.3f} "
                f"(oracle {s['oracle_mass_captured']:.3f}), load H {s['calib_load_entropy_bits']:.2f} bits"
            )
    return fits


def moefy(
    dense: torch.nn.Module, tokenizer: Any, opts: MoefyOptions, progress: bool = True
) -> tuple[torch.nn.Module, list[LayerFit]]:
    """Full pipeline in memory: calibration inputs, clustering, routers, MixtralForCausalLM."""
    if opts.router not in ROUTERS:
        raise ValueError(f"unknown router {opts.router!r} (choose from {ROUTERS})")
    if not 1 <= opts.top_k <= opts.experts:
        raise ValueError(f"--top-k must be in 1..{opts.experts}")
    torch.manual_seed(opts.seed)
    ids = calibration_ids(tokenizer, opts)
    if progress:
        log(f"calibration: {ids.numel()} tokens of '{opts.calib_data}' ({ids.shape[0]} x {ids.shape[1]})")
    inputs = collect_ffn_inputs(dense, ids)
    fits = fit_all(dense, inputs, opts, progress)
    return build_moe(dense, fits, opts), fits


def record(
    opts: MoefyOptions, fits: list[LayerFit], dense_dir: str | Path, extra: dict | None = None
) -> dict:
    """The ``moefication.json`` content: options, provenance, per-layer clusters and statistics."""
    import transformers

    return {
        "method": "MoEfication (balanced k-means neuron partition + fitted linear router), training-free",
        "script": "examples/moefy.py",
        "source_model": Path(dense_dir).name,
        "options": asdict(opts),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "combination": {
            "router_softmax_topk_renormalise": True,
            "down_proj_scale": opts.top_k,
            "logit_spread": opts.logit_spread,
            "note": (
                "router scaled so renormalised top-k weights are ~1/k; down_proj x k; k=E reproduces dense"
            ),
        },
        "layers": [{"layer": i, **f.stats, "clusters": f.clusters} for i, f in enumerate(fits)],
        **(extra or {}),
    }


def save(moe: torch.nn.Module, out: str | Path, dense_dir: str | Path, meta: dict) -> Path:
    """``save_pretrained`` + tokenizer files + ``moefication.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    moe.save_pretrained(str(out))
    for name in TOKENIZER_FILES:
        src = Path(dense_dir) / name
        if src.is_file() and not (out / name).exists():
            shutil.copy2(src, out / name)
    (out / "moefication.json").write_text(json.dumps(meta, indent=1) + "\n")
    return out


def evaluate(
    model: torch.nn.Module, tokenizer: Any, datasets: list[str], max_tokens: int, seq_len: int = 256
) -> dict:
    """Clean perplexity on each dataset (first ``max_tokens`` tokens, windows of ``seq_len``)."""
    from cimconvert.datasets import load_text, token_ids
    from cimconvert.evaluation.perplexity import perplexity

    res = {}
    for name in datasets:
        ids = token_ids(tokenizer, load_text(name), max_tokens)
        res[name] = perplexity(model, ids, seq_len=seq_len, batch_size=4)
    return res


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    d = MoefyOptions()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dense", type=Path, help="dense Llama-architecture HF folder")
    p.add_argument("out", type=Path, help="output folder (Mixtral checkpoint)")
    p.add_argument(
        "--experts", type=int, default=d.experts, help="experts per layer E (divides intermediate size)"
    )
    p.add_argument("--top-k", type=int, default=d.top_k, help="experts per token k")
    p.add_argument("--router", choices=ROUTERS, default=d.router)
    p.add_argument("--seed", type=int, default=d.seed, help="k-means++ seed (layer i uses seed*1000+i)")
    p.add_argument("--calib-data", default=d.calib_data, help="calibration dataset (never heldout/wikitext2)")
    p.add_argument("--calib-tokens", type=int, default=d.calib_tokens)
    p.add_argument("--calib-seq-len", type=int, default=d.calib_seq_len)
    p.add_argument("--kmeans-iters", type=int, default=d.kmeans_iters)
    p.add_argument("--ridge", type=float, default=d.ridge, help="relative ridge of the lsq router")
    p.add_argument("--logit-spread", type=float, default=d.logit_spread, help="router temperature target")
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--eval",
        default="",
        help="comma-separated datasets for clean PPL of dense and MoE, e.g. heldout,wikitext2",
    )
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--check-reload", action="store_true", help="reload the saved folder and compare logits")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    from transformers import AutoTokenizer

    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    opts = MoefyOptions(**{f.name: getattr(a, f.name) for f in fields(MoefyOptions)})
    t0 = time.time()
    log(f"loading {a.dense}")
    dense = load_dense(a.dense, opts.dtype)
    tok = AutoTokenizer.from_pretrained(str(a.dense))
    moe, fits = moefy(dense, tok, opts)
    extra: dict[str, Any] = {"build_seconds": round(time.time() - t0, 1)}
    datasets = [s for s in a.eval.split(",") if s]
    if datasets:
        log(f"clean PPL on {datasets} ({a.eval_tokens} tokens)")
        extra["eval"] = {
            "tokens": a.eval_tokens,
            "dense": evaluate(dense, tok, datasets, a.eval_tokens),
            "moe": evaluate(moe, tok, datasets, a.eval_tokens),
        }
        log(f"PPL {json.dumps(extra['eval'])}")
    save(moe, a.out, a.dense, record(opts, fits, a.dense, extra))
    log(f"wrote {a.out}")
    if a.check_reload:
        from transformers import AutoModelForCausalLM

        back = AutoModelForCausalLM.from_pretrained(str(a.out), dtype=getattr(torch, opts.dtype)).eval()
        ids = calibration_ids(tok, opts)[:1, :64]
        with torch.no_grad():
            diff = float((back(input_ids=ids).logits - moe(input_ids=ids).logits).abs().max())
        log(f"reload check: max |logit diff| = {diff:.3g}")
        if diff != 0.0:
            return 1
    print(json.dumps({"out": str(a.out), **extra}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
