"""Measure the MoEfied real-weights MoE (examples/moefy.py): dense vs MoE clean PPL, k ladder, load, entropy.

Usage (from the repository root; CIMCONVERT_SHARED_DATA must point at the shared data for wikitext2)::

    python benchmarks/real_moe_build.py models/smollm2-135m-instruct --threads 2

Fits each (experts E, router) configuration once on the ``calib`` text, then builds the Mixtral model for
every k of the ladder (the fit does not depend on k) and measures clean perplexity on the first
``--eval-tokens`` tokens of ``heldout`` (and ``wikitext2`` for the dense model and the chosen
configuration). The chosen configuration is the smallest k, over E=8 and both routers, whose heldout
PPL is within ``--budget`` (20 %) of the dense model's. For it: expert load per layer on heldout, router
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

    from cimconvert.data import load_text, token_ids

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dense", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--calib-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget", type=float, default=0.20, help="allowed relative clean-PPL increase")
    p.add_argument("--out", type=Path, default=RESULTS / "real_moe_build")
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
    res["dense"] = moefy.evaluate(dense, tok, ["heldout", "wikitext2"], a.eval_tokens)
    res["dense_command"] = (
        f"cimconvert eval {DENSE_REL} --profile chipA --seeds 1 --max-tokens {a.eval_tokens} --json"
        " [--dataset wikitext2]  # clean_ppl"
    )
    moefy.log(f"dense {res['dense']}")
    ladders = {
        (8, "lsq"): (2, 4, 6, 8),
        (8, "centroid"): (4, 6),
        (16, "lsq"): (4, 8, 12),
        (16, "centroid"): (8, 12),
    }
    rows: list[dict] = []
    fits_by: dict[tuple[int, str], list] = {}
    for (n_exp, router), ks in ladders.items():
        opts = replace(base, experts=n_exp, router=router, top_k=ks[len(ks) // 2])
        fits = moefy.fit_all(dense, inputs, opts, progress=False)
        fits_by[(n_exp, router)] = fits
        for k in ks:
            o = replace(opts, top_k=k)
            moe = moefy.build_moe(dense, fits, o)
            ppl = moefy.evaluate(moe, tok, ["heldout"], a.eval_tokens)["heldout"]
            row = {
                "experts": n_exp,
                "router": router,
                "top_k": k,
                "logit_spread": o.logit_spread,
                "active_ffn_fraction": k / n_exp,
                "heldout_ppl": ppl,
                "rel_to_dense": ppl / res["dense"]["heldout"] - 1,
                "command": command(o),
            }
            rows.append(row)
            moefy.log(f"E={n_exp} {router} k={k}: heldout PPL {ppl:.3f} ({row['rel_to_dense']:+.1%})")
            del moe
    ok = [r for r in rows if r["experts"] == 8 and r["rel_to_dense"] <= a.budget]
    chosen = (
        min(ok, key=lambda r: (r["top_k"], r["heldout_ppl"]))
        if ok
        else min(rows, key=lambda r: r["heldout_ppl"])
    )
    copts = replace(base, experts=chosen["experts"], router=chosen["router"], top_k=chosen["top_k"])
    cfits = fits_by[(copts.experts, copts.router)]
    # the other combination design at the chosen k: a soft weighted top-k (not exact at k = E)
    for spread in (0.1, 1.0):
        o = replace(copts, logit_spread=spread)
        moe = moefy.build_moe(dense, moefy.fit_all(dense, inputs, o, progress=False), o)
        ppl = moefy.evaluate(moe, tok, ["heldout"], a.eval_tokens)["heldout"]
        rows.append(
            {
                "experts": o.experts,
                "router": o.router,
                "top_k": o.top_k,
                "logit_spread": spread,
                "active_ffn_fraction": o.top_k / o.experts,
                "heldout_ppl": ppl,
                "rel_to_dense": ppl / res["dense"]["heldout"] - 1,
                "command": command(o),
            }
        )
        moefy.log(f"chosen with logit spread {spread}: heldout PPL {ppl:.3f}")
        del moe
    cfits = moefy.fit_all(dense, inputs, copts, progress=False)  # stats at the chosen k
    moe = moefy.build_moe(dense, cfits, copts)
    res["chosen"] = {
        "options": vars(copts),
        "ppl": moefy.evaluate(moe, tok, ["heldout", "wikitext2"], a.eval_tokens),
        "command": command(copts, "heldout,wikitext2"),
    }
    moefy.log(f"chosen {res['chosen']}")
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
        "| E | router | k | active FFN | logit spread | heldout PPL | vs dense | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in res["ladder"]:
        lines.append(
            f"| {r['experts']} | {r['router']} | {r['top_k']} | {r['active_ffn_fraction']:.0%} "
            f"| {r['logit_spread']:g} "
            f"| {r['heldout_ppl']:.3f} | {r['rel_to_dense']:+.1%} | `{r['command']}` |"
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
