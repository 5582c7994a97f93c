"""Measure the MoEfied real-weights MoE (examples/moefy.py): dense vs MoE clean PPL, k ladder, load, entropy.

Usage (from the repository root; CIMCONVERT_SHARED_DATA must point at the shared data for wikitext2)::

    python benchmarks/real_moe_build.py models/smollm2-135m-instruct --threads 2

Fits each (experts E, router) configuration once on the ``calib`` text, then builds the Mixtral model for
every k of the ladder (the fit does not depend on k) and measures clean perplexity on the first
``--eval-tokens`` tokens of ``heldout`` (and ``wikitext2`` for the dense model and the chosen
configuration). The chosen configuration is the sparsest (smallest k/E, k < E) whose heldout PPL is
within ``--budget`` (20 %) of the dense model's. A diagnostic row per E also routes by the true top-k
activation mass (``OracleRouting``), to separate partition loss from router loss. For the chosen
configuration: expert load per layer on heldout, router
entropy per layer, a PNG. Writes ``benchmarks/results/real_moe_build.{json,md}`` and ``..._load.png``.
Every row carries the ``examples/moefy.py`` command that builds and evaluates that model on its own.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DENSE_REL = "models/smollm2-135m-instruct"


def _load_moefy() -> Any:
    spec = importlib.util.spec_from_file_location("moefy", ROOT / "examples" / "moefy.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moefy"] = mod
    spec.loader.exec_module(mod)
    return mod


moefy = _load_moefy()


def command(opts: Any, datasets: str = "heldout") -> str:
    """The examples/moefy.py command that builds and evaluates this configuration."""
    d = moefy.MoefyOptions()
    extra = "".join(
        f" --{k.replace('_', '-')} {v}"
        for k, v in vars(opts).items()
        if k not in ("experts", "top_k", "router", "seed", "calib_tokens") and v != getattr(d, k)
    )
    return (
        f"python examples/moefy.py {DENSE_REL} models/smollm2-moe-e{opts.experts}k{opts.top_k}-{opts.router}"
        f" --experts {opts.experts} --top-k {opts.top_k} --router {opts.router} --seed {opts.seed}"
        f" --calib-tokens {opts.calib_tokens}{extra} --eval {datasets}"
    )


@torch.no_grad()
def routing_stats(moe: torch.nn.Module, tokens: torch.Tensor, seq_len: int = 256) -> list[dict]:
    """Per layer on ``tokens``: top-k load counts, load entropy and mean per-token softmax entropy (bits)."""
    layers = moe.model.layers
    n_exp = moe.config.num_local_experts
    counts = [torch.zeros(n_exp) for _ in layers]
    ent = [[0.0, 0] for _ in layers]

    def hook(i: int):
        def fn(_m, _args, out):
            logits, _scores, idx = out
            counts[i] += torch.bincount(idx.flatten(), minlength=n_exp).float()
            p = torch.softmax(logits.float(), -1)
            ent[i][0] += float(-(p * torch.log2(p.clamp_min(1e-30))).sum())
            ent[i][1] += p.shape[0]

        return fn

    hooks = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        n = tokens.numel() // seq_len
        for rows in torch.split(tokens[: n * seq_len].view(n, seq_len), 4):
            moe(input_ids=rows, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, c in enumerate(counts):
        load = c / c.sum()
        h = float(-(load * torch.log2(load.clamp_min(1e-30))).sum())
        out.append(
            {
                "layer": i,
                "load": [round(float(v), 5) for v in load],
                "load_entropy_bits": h,
                "load_max_over_mean": float(load.max() * n_exp),
                "token_entropy_bits": ent[i][0] / max(ent[i][1], 1),
            }
        )
    return out


def plot(stats: list[dict], fits_stats: list[dict], title: str, path: Path, layers: tuple[int, ...]) -> None:
    """Expert load bars for a few layers + router entropy per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(layers) + 1, figsize=(3.2 * (len(layers) + 1), 3.2))
    n_exp = len(stats[0]["load"])
    for ax, li in zip(axes, layers, strict=False):
        ax.bar(range(n_exp), stats[li]["load"], color="tab:blue")
        ax.axhline(1 / n_exp, color="k", ls="--", lw=0.8)
        ax.set_title(f"layer {li} load (heldout)")
        ax.set_xlabel("expert")
    ax = axes[-1]
    x = [s["layer"] for s in stats]
    ax.plot(x, [s["load_entropy_bits"] for s in stats], "o-", label="load entropy")
    ax.plot(
        x, [f["token_entropy_bits_unit_spread"] for f in fits_stats], "s-", label="token entropy, unit spread"
    )
    ax.plot(x, [s["token_entropy_bits"] for s in stats], "^-", label="token entropy, stored router")
    ax.axhline(math.log2(n_exp), color="k", ls="--", lw=0.8)
    ax.set_xlabel("layer")
    ax.set_ylabel("bits")
    ax.set_title("router entropy")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the ladder and write the result files."""
    from transformers import AutoTokenizer

    from cimconvert.datasets import load_text, token_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dense", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.20, help="allowed relative clean-PPL increase")
    p.add_argument("--out", type=Path, default=RESULTS / "real_moe_build")
    p.add_argument("--save", type=Path, default=None, help="also save the chosen MoE checkpoint here")
    p.add_argument("--cache", type=Path, default=None, help="JSON cache of measured rows (resume)")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the .json")
    a = p.parse_args(argv)
    if a.render:
        res = json.loads(a.out.with_suffix(".json").read_text())
        a.out.with_suffix(".md").write_text(render(res, a.out.name + "_load.png"))
        return 0
    torch.set_num_threads(a.threads)
    t_start = time.time()
    dense = moefy.load_dense(a.dense)
    tok = AutoTokenizer.from_pretrained(str(a.dense))
    base = moefy.MoefyOptions(seed=a.seed, calib_tokens=a.calib_tokens)
    ids = moefy.calibration_ids(tok, base)
    inputs = moefy.collect_ffn_inputs(dense, ids)
    moefy.log(f"calibration inputs collected ({ids.numel()} tokens)")
    res: dict[str, Any] = {"eval_tokens": a.eval_tokens, "calib_tokens": a.calib_tokens, "seed": a.seed}
    cache: dict[str, Any] = json.loads(a.cache.read_text()) if a.cache and a.cache.is_file() else {}
    if "dense" not in cache:
        cache["dense"] = moefy.evaluate(dense, tok, ["heldout", "wikitext2"], a.eval_tokens)
    res["dense"] = cache["dense"]
    res["dense_command"] = (
        f"cimconvert eval {DENSE_REL} --profile chipA --seeds 1 --max-tokens {a.eval_tokens} --json"
        " [--dataset wikitext2]  # clean_ppl"
    )
    moefy.log(f"dense {res['dense']}")
    ladders = {
        (8, "lsq"): (2, 4, 6, 7),
        (8, "centroid"): (7,),
        (16, "lsq"): (14, 15),
    }
    oracle_k = {8: (6, 7), 16: (15,)}
    fits_by: dict[tuple[int, str], list] = {}

    def fits_for(n_exp: int, router: str, stats_k: int) -> list:
        if (n_exp, router) not in fits_by:
            o = replace(base, experts=n_exp, router=router, top_k=stats_k)
            fits_by[(n_exp, router)] = moefy.fit_all(dense, inputs, o, progress=False)
            moefy.log(f"fitted E={n_exp} {router} (k-dependent statistics at k={stats_k})")
        return fits_by[(n_exp, router)]

    def measure(o: Any, oracle: bool) -> dict:
        key = f"{o.experts}-{o.router}-{o.top_k}-{o.logit_spread:g}"
        if key in cache and (not oracle or "oracle_heldout_ppl" in cache[key]):
            return cache[key]
        fits = fits_for(o.experts, o.router, max(k for k in ladders[(o.experts, o.router)] if k < o.experts))
        if o.logit_spread != base.logit_spread:  # the router temperature only rescales the router
            f = o.logit_spread / base.logit_spread
            fits = [moefy.LayerFit(x.clusters, x.router * f, x.stats) for x in fits]
        moe = moefy.build_moe(dense, fits, o)
        got = {"heldout_ppl": moefy.evaluate(moe, tok, ["heldout"], a.eval_tokens)["heldout"]}
        if oracle:
            with moefy.OracleRouting(moe):
                got["oracle_heldout_ppl"] = moefy.evaluate(moe, tok, ["heldout"], a.eval_tokens)["heldout"]
        cache[key] = got
        if a.cache:
            a.cache.write_text(json.dumps(cache, indent=1))
        return got

    def row(o: Any, oracle: bool = False) -> dict:
        got = measure(o, oracle)
        r = {
            "experts": o.experts,
            "router": o.router,
            "top_k": o.top_k,
            "logit_spread": o.logit_spread,
            "active_ffn_fraction": o.top_k / o.experts,
            **got,
            "rel_to_dense": got["heldout_ppl"] / res["dense"]["heldout"] - 1,
            "command": command(o),
        }
        extra = f", oracle {r['oracle_heldout_ppl']:.3f}" if "oracle_heldout_ppl" in r else ""
        moefy.log(
            f"E={o.experts} {o.router} k={o.top_k} spread {o.logit_spread:g}: heldout PPL "
            f"{r['heldout_ppl']:.3f} ({r['rel_to_dense']:+.1%}){extra}"
        )
        return r

    rows = [
        row(replace(base, experts=n, router=rt, top_k=k), rt == "lsq" and k in oracle_k[n])
        for (n, rt), ks in ladders.items()
        for k in ks
    ]
    # the sparsest configuration (smallest k/E, k < E) within the budget; ties: lower PPL
    ok = [r for r in rows if r["top_k"] < r["experts"] and r["rel_to_dense"] <= a.budget]
    chosen = (
        min(ok, key=lambda r: (r["active_ffn_fraction"], r["heldout_ppl"]))
        if ok
        else min((r for r in rows if r["top_k"] < r["experts"]), key=lambda r: r["heldout_ppl"])
    )
    res["within_budget"] = bool(ok)
    copts = replace(base, experts=chosen["experts"], router=chosen["router"], top_k=chosen["top_k"])
    # the other combination design at the chosen k: a soft weighted top-k (not exact at k = E)
    rows.append(row(replace(copts, logit_spread=1.0)))
    stats_k = max(k for k in ladders[(copts.experts, copts.router)] if k < copts.experts)
    if stats_k != copts.top_k:
        fits_by.pop((copts.experts, copts.router), None)
    cfits = fits_for(copts.experts, copts.router, copts.top_k)
    moe = moefy.build_moe(dense, cfits, copts)
    res["chosen"] = {
        "options": vars(copts),
        "ppl": {"heldout": chosen["heldout_ppl"], **moefy.evaluate(moe, tok, ["wikitext2"], a.eval_tokens)},
        "command": command(copts, "heldout,wikitext2"),
    }
    moefy.log(f"chosen {res['chosen']}")
    if a.save:
        meta = moefy.record(
            copts,
            cfits,
            a.dense,
            {
                "built_by": "benchmarks/real_moe_build.py",
                "eval": {"tokens": a.eval_tokens, "dense": res["dense"], "moe": res["chosen"]["ppl"]},
            },
        )
        moefy.save(moe, a.save, a.dense, meta)
        moefy.log(f"saved the chosen MoE to {a.save}")
    held = token_ids(tok, load_text("heldout"), a.eval_tokens)
    rstats = routing_stats(moe, held)
    fit_stats = [f.stats for f in cfits]
    for r, f in zip(rstats, fit_stats, strict=True):
        r.update(
            {
                k: f[k]
                for k in (
                    "router_r2",
                    "topk_recall",
                    "mass_captured",
                    "oracle_mass_captured",
                    "token_entropy_bits_unit_spread",
                    "router_scale",
                    "raw_logit_spread",
                )
            }
        )
    res["chosen"]["layers"] = rstats
    res["ladder"] = rows
    res["wall_seconds"] = round(time.time() - t_start, 1)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    png = a.out.with_name(a.out.name + "_load.png")
    n_layers = len(rstats)
    plot(
        rstats,
        fit_stats,
        f"MoEfied SmolLM2-135M, E={copts.experts} k={copts.top_k} {copts.router}",
        png,
        (0, n_layers // 2, n_layers - 1),
    )
    a.out.with_suffix(".md").write_text(render(res, png.name))
    moefy.log(f"wrote {a.out}.json/.md, {png.name} in {res['wall_seconds']} s")
    return 0


def render(res: dict, png: str) -> str:
    """Markdown tables of a result dict (the ``.md`` next to the ``.json``)."""
    d = res["dense"]
    c = res["chosen"]
    o = c["options"]
    lines = [
        "# Real-weights MoE (MoEfied SmolLM2-135M-Instruct): build measurements",
        "",
        "Produced by `python benchmarks/real_moe_build.py models/smollm2-135m-instruct` "
        f"({res['wall_seconds']} s on 2 CPU threads); see `docs/REAL_MOE.md` for how the model is made. "
        f"Clean perplexity on the first {res['eval_tokens']} tokens (windows of 256), calibration: first "
        f"{res['calib_tokens']} tokens of `calib`, seed {res['seed']}.",
        "",
        "## Dense vs chosen MoE (clean)",
        "",
        "| model | heldout PPL | wikitext2 PPL | command |",
        "|---|---|---|---|",
        f"| dense SmolLM2-135M-Instruct | {d['heldout']:.3f} | {d['wikitext2']:.3f} "
        f"| `{res['dense_command']}` |",
        f"| MoE E={o['experts']} k={o['top_k']} router={o['router']} | {c['ppl']['heldout']:.3f} "
        f"({c['ppl']['heldout'] / d['heldout'] - 1:+.1%}) | {c['ppl']['wikitext2']:.3f} "
        f"({c['ppl']['wikitext2'] / d['wikitext2'] - 1:+.1%}) | `{c['command']}` |",
        "",
        "## k ladder (heldout, clean)",
        "",
        "| E | router | k | active FFN | logit spread | heldout PPL | vs dense | oracle-routed PPL "
        "| command |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ladder"]:
        oracle = f"{r['oracle_heldout_ppl']:.3f}" if "oracle_heldout_ppl" in r else "–"
        lines.append(
            f"| {r['experts']} | {r['router']} | {r['top_k']} | {r['active_ffn_fraction']:.0%} "
            f"| {r['logit_spread']:g} | {r['heldout_ppl']:.3f} | {r['rel_to_dense']:+.1%} | {oracle} "
            f"| `{r['command']}` |"
        )
    lines += [
        "",
        f"## Chosen model: expert load and router entropy per layer (heldout, {res['eval_tokens']} tokens)",
        "",
        f"![load and entropy]({png})",
        "",
        "load = share of the top-k slots each expert receives (uniform = 1/E); load entropy in bits (max "
        f"log2 E = {math.log2(o['experts']):.0f}); token entropy = mean per-token entropy of the router "
        "softmax, "
        "with the stored (temperature-scaled) router and with logits rescaled to unit spread; recall = share "
        "of the true top-k experts by activation mass (calib) that the router picks; mass = share of the "
        "activation mass the router's top-k carries (oracle: the best possible top-k).",
        "",
        "| layer | load per expert | max/mean | load H | token H stored | token H unit | R² | recall "
        "| mass (oracle) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in c["layers"]:
        lines.append(
            f"| {s['layer']} | {' '.join(f'{v:.3f}' for v in s['load'])} | {s['load_max_over_mean']:.2f} "
            f"| {s['load_entropy_bits']:.3f} | {s['token_entropy_bits']:.4f} "
            f"| {s['token_entropy_bits_unit_spread']:.3f} | {s['router_r2']:.3f} | {s['topk_recall']:.3f} "
            f"| {s['mass_captured']:.3f} ({s['oracle_mass_captured']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
