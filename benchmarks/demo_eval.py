"""Clean and noisy perplexity of the shipped demo models under every shipped chip profile.

One run evaluates each demo model in examples/models/ on the held-out text (never trained on) and on
WikiText-2 test, clean and under >= 5 noise draws per profile (mean +- std). Results go to
benchmarks/results/demo_eval.json and .md; ``--write-readme`` puts the held-out table into README.md and
``--check-readme`` fails when README's table differs from the results (the check tests/test_readme_tables.py
runs through ``readme_mismatches``).

    .venv/bin/python benchmarks/demo_eval.py --seeds 5 --threads 1 --max-tokens 8192 --write-readme
    .venv/bin/python benchmarks/demo_eval.py --seeds 5 --threads 1 --max-tokens 8192 \
        --models tiny-deepseek tiny-mamba2 --write-readme      # rerun some rows, keep the others
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from cimconvert import api

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
#: The README paragraph the held-out table follows.
README_ANCHOR = "**Perplexity under each shipped profile**"
README_DATASET = "heldout"
PROFILES = ["chipA", "chipB", "hermes", "gaussian:sigma=0.05", "gaussian:sigma=0.1"]


def demo_models(names: list[str] | None = None) -> list[Path]:
    """The demo checkpoints shipped in examples/models/ (all, or those named)."""
    found = sorted(p for p in (REPO / "examples" / "models").iterdir() if (p / "config.json").is_file())
    return [p for p in found if names is None or p.name in names]


def run(seeds: int, datasets: list[str], max_tokens: int, profiles: list[str],
        models: list[str] | None = None) -> list[dict]:
    """Evaluate every (or every named) demo model × dataset × profile; one row each."""
    rows = []
    for model in demo_models(models):
        for dataset in datasets:
            for profile in profiles:
                start = time.perf_counter()
                res = api.evaluate(str(model), profile, seeds=seeds, seed=1000, dataset=dataset,
                                   max_tokens=max_tokens, progress=False)
                res["model"] = model.name
                res["seconds"] = round(time.perf_counter() - start, 1)
                rows.append(res)
                print(f"{model.name:18s} {dataset:10s} {profile:22s} clean {res['clean_ppl']:8.2f} "
                      f"noisy {res['noisy_ppl_mean']:8.2f} +- {res['noisy_ppl_std']:.2f}", flush=True)
    return rows


def to_markdown(rows: list[dict]) -> str:
    """A README-ready table."""
    lines = [
        "| model | dataset | profile | clean PPL | noisy PPL (mean ± std) | Δ | draws |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['profile']} | {r['clean_ppl']:.2f} | "
            f"{r['noisy_ppl_mean']:.2f} ± {r['noisy_ppl_std']:.2f} | {r['degradation_pct']:+.1f}% | "
            f"{len(r['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def to_pivot(rows: list[dict], dataset: str) -> str:
    """One line per model: clean PPL, then noisy mean ± std per profile, for one dataset."""
    profiles = list(dict.fromkeys(r["profile"] for r in rows if r["dataset"] == dataset))
    lines = [
        "| model | clean | " + " | ".join(profiles) + " |",
        "|---|---|" + "---|" * len(profiles),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        cells = {r["profile"]: r for r in rows if r["model"] == model and r["dataset"] == dataset}
        if not cells:
            continue
        clean = next(iter(cells.values()))["clean_ppl"]
        noisy = [
            f"{cells[p]['noisy_ppl_mean']:.1f} ± {cells[p]['noisy_ppl_std']:.1f} "
            f"({cells[p]['degradation_pct']:+.1f}%)" if p in cells else "—"
            for p in profiles
        ]
        lines.append(f"| {model} | {clean:.1f} | " + " | ".join(noisy) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict]) -> str:
    """Write the JSON and markdown results; returns the markdown."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "demo_eval.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    parts = [f"### {d}\n\n{to_pivot(rows, d)}" for d in datasets]
    text = "\n".join(parts) + "\n### all rows\n\n" + to_markdown(rows)
    (RESULTS / "demo_eval.md").write_text(text, encoding="utf-8")
    return text


def _table_span(text: str) -> tuple[int, int]:
    """Character span of the first markdown table after README_ANCHOR in ``text``."""
    anchor = text.index(README_ANCHOR)
    start = text.index("\n|", anchor) + 1
    end = start
    while end < len(text) and text.startswith("|", end):
        end = text.index("\n", end) + 1
    return start, end


def readme_table(text: str) -> str:
    """The demo-model table of README.md (its text, lines ending in newlines)."""
    start, end = _table_span(text)
    return text[start:end]


def readme_mismatches(rows: list[dict], readme: str) -> list[str]:
    """Lines of README's demo table that differ from the table the results give (empty: they match)."""
    expected = to_pivot(rows, README_DATASET).splitlines()
    printed = readme_table(readme).splitlines()
    pairs = zip(printed, expected, strict=False)
    diffs = [f"README: {got}\nresults: {want}" for got, want in pairs if got != want]
    if len(printed) != len(expected):
        diffs.append(f"README has {len(printed)} table lines, the results {len(expected)}")
    return diffs


def write_readme(rows: list[dict]) -> None:
    """Replace README's demo table with the one the results give."""
    text = README.read_text(encoding="utf-8")
    start, end = _table_span(text)
    README.write_text(text[:start] + to_pivot(rows, README_DATASET) + text[end:], encoding="utf-8")


def main() -> None:
    """Parse options, evaluate, write results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=16384)
    parser.add_argument("--datasets", nargs="+", default=["heldout", "wikitext2"])
    parser.add_argument("--profiles", nargs="+", default=PROFILES)
    parser.add_argument("--models", nargs="+", default=None, help="only these demo models (rows replaced)")
    parser.add_argument("--from-json", action="store_true", help="only re-render the markdown")
    parser.add_argument("--write-readme", action="store_true",
                        help="also put the held-out table into README.md")
    parser.add_argument("--check-readme", action="store_true",
                        help="only compare README's table with the results (exit 1 when they differ)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check_readme:
        rows = json.loads((RESULTS / "demo_eval.json").read_text(encoding="utf-8"))
        diffs = readme_mismatches(rows, README.read_text(encoding="utf-8"))
        print("\n".join(diffs) or "README demo table matches benchmarks/results/demo_eval.json")
        sys.exit(1 if diffs else 0)
    if args.from_json:
        rows = json.loads((RESULTS / "demo_eval.json").read_text(encoding="utf-8"))
    else:
        rows = run(args.seeds, args.datasets, args.max_tokens, args.profiles, args.models)
        if args.models and (RESULTS / "demo_eval.json").is_file():
            kept = json.loads((RESULTS / "demo_eval.json").read_text(encoding="utf-8"))
            rows = sorted([r for r in kept if r["model"] not in args.models] + rows,
                          key=lambda r: r["model"])  # fmt: skip
    print(write_results(rows))
    if args.write_readme:
        write_readme(rows)


if __name__ == "__main__":
    main()
