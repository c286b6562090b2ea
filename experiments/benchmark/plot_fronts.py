"""Test-split fronts of two benchmark runs side by side, one panel per objective pair.

    python experiments/benchmark/plot_fronts.py --setting smollm2_k3 --budget 48 --seed 1 \
        --out docs/smollm2_k3_fronts.png

Reads the finished runs' summary.json (runs/benchmark/<setting>/<search>/<budget>/seed-<seed>):
every front point's scores on the held-out test split (exact merges, as in the test HV), plus
the base and the experts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"default": "tab:blue", "grid_ta": "tab:orange"}


def front_test_scores(summary: dict) -> list[dict[str, float]]:
    """Test scores of the run's final front (the points its test HV counts, references aside)."""
    return [entry["scores"] for name, entry in summary["test"].items() if name.startswith("front:")]


def weakest_share(scores: dict[str, float], refs: dict[str, dict[str, float]], objectives: list[str]) -> float:
    """min over objectives of score / (the expert's own test score on it); experts are named by
    their objective (expert:math scores objective math)."""
    shares = []
    for o in objectives:
        best = refs.get(f"expert:{o}", {}).get(o) or max(r[o] for r in refs.values())
        shares.append(scores[o] / best if best > 0 else 0.0)
    return min(shares)


def load_summary(root: Path, setting: str, search: str, budget: int, seed: int) -> dict:
    path = root / setting / search / str(budget) / f"seed-{seed}" / "summary.json"
    if not path.is_file():
        sys.exit(f"plot_fronts: error: {path} does not exist (run the benchmark first)")
    summary = json.loads(path.read_text())
    if "test" not in summary:
        sys.exit(f"plot_fronts: error: {path} has no test scores (the run was made without fitness.test_rescore)")
    return summary


def plot(summaries: dict[str, dict], title: str, out: Path) -> None:
    first = next(iter(summaries.values()))
    objectives = list(first["objectives"])
    pairs = list(itertools.combinations(objectives, 2))
    cols = 2 if len(pairs) == 3 else len(pairs) + 1
    rows = -(-(len(pairs) + 1) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 4.0 * rows), squeeze=False)
    axes = [list(grid.flat)]
    refs = {name: entry["scores"] for name, entry in first["test"].items() if name == "base" or name.startswith("expert:")}
    for ax, (x, y) in zip(axes[0], pairs):
        for search, summary in summaries.items():
            pts = front_test_scores(summary)
            ax.scatter([p[x] for p in pts], [p[y] for p in pts], s=22, alpha=0.75, color=COLORS.get(search), label=f"{search} front ({len(pts)})")
        for name, scores in refs.items():
            ax.scatter(scores[x], scores[y], marker="*", s=90, color="black", zorder=3)
            if name.removeprefix("expert:") in (x, y):  # the others sit near the origin, with the base
                ax.annotate(name.removeprefix("expert:"), (scores[x], scores[y]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel(f"{x} (test)")
        ax.set_ylabel(f"{y} (test)")
        ax.grid(alpha=0.3)
    # a pair hides the third objective; the weakest skill of each point shows what a merge keeps of all
    ax = axes[0][-1]
    for search, summary in summaries.items():
        kept = sorted((weakest_share(p, refs, objectives) for p in front_test_scores(summary)), reverse=True)
        ax.plot(range(1, len(kept) + 1), kept, marker="o", ms=4, color=COLORS.get(search), label=search)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_xlabel("front points, sorted")
    ax.set_ylabel("weakest skill kept (share of its expert's test score)")
    ax.set_ylim(0, None)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=Path("runs/benchmark"))
    ap.add_argument("--setting", required=True)
    ap.add_argument("--budget", type=int, required=True)
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--searches", nargs="+", default=["default", "grid_ta"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    summaries = {s: load_summary(args.root, args.setting, s, args.budget, args.seed) for s in args.searches}
    title = f"{args.setting}, budget {args.budget}, seed {args.seed}: final fronts re-scored on the test split (stars: experts; base at the origin)"
    plot(summaries, title, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
