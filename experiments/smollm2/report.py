"""Real-model experiment, step 3: compare the searched front with the baselines at equal
budget and write results.md + compare.png next to this script.

    python experiments/smollm2/report.py [--budget 48]

Reads the runs in experiments/smollm2/runs/ (nsga2-s0, grid_ta, random-s0) and scores
TIES with default settings (weights 1, density 0.5) -- a single recipe -- on the same
validation subset and on the test split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from evomerge.search.archive import Archive
from evomerge.search.pareto import hypervolume, nondominated

HERE = Path(__file__).resolve().parent
RUNS = {
    "nsga2 (layer-wise mixed, 40 genes)": "nsga2-s0",
    "nsga2 (model-wise TIES, 4 genes)": "nsga2-modelwise-ties",
    "grid (model-wise TA, 6x6)": "grid_ta",
    "random (layer-wise mixed, 40 genes)": "random-s0",
}
OBJ = ["math", "roman"]


def ties_default(run_dir: Path) -> dict:
    """Score TIES (w=1, density=0.5) with the run's own pool, subset and tasks."""
    from omegaconf import OmegaConf

    from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
    from evomerge.merge.recipe import Recipe
    from evomerge.run import open_session

    cfg = OmegaConf.load(run_dir / "config.yaml")
    session = open_session(cfg, run_dir)
    session.merger.apply(Recipe.uniform("ties", {"weight": [1.0, 1.0], "density": [0.5, 0.5]}, session.merger.n_layers))
    validation = session.fitness()
    tasks = [FitnessTask(t["name"], t["task"], t["metric"]) for t in list(cfg.fitness.objectives) + list(cfg.fitness.extra)]
    test = LmEvalFitness(session.merger.model, session.merger.tokenizer, tasks, split="test", batch_size=cfg.fitness.batch_size,
                         max_length=cfg.fitness.max_length, include_paths=list(cfg.fitness.include_paths))()
    return {"validation": validation, "test": test}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=int, default=48)
    args = p.parse_args()
    ref = np.ones(len(OBJ))
    out: dict = {"budget": args.budget, "runs": {}}
    first_run = None
    for name, folder in RUNS.items():
        run = HERE / "runs" / folder
        if not (run / "summary.json").is_file():
            print(f"skipping {name}: {run} has no summary.json yet")
            continue
        first_run = first_run or run
        all_search = Archive(run / "archive.jsonl").search_records()[: args.budget]
        search = [r for r in all_search if r.error is None]
        F = np.array([r.losses for r in search])
        summary = json.loads((run / "summary.json").read_text())
        out["runs"][name] = {
            "hypervolume": hypervolume(F, ref),
            "evaluations": len(all_search),
            "front": [search[i].scores for i in nondominated(F)],
            "test": summary.get("test", {}),
            "references": summary["references"],
            "mean_merge_s": summary.get("mean_merge_s"),
            "mean_eval_s": summary.get("mean_eval_s"),
            "candidates_per_hour": 3600 / (summary.get("mean_merge_s", 0) + summary.get("mean_eval_s", 1)),
        }
    if first_run is not None:
        ties = ties_default(first_run)
        v = ties["validation"]
        out["ties_default"] = {**ties, "hypervolume": hypervolume(np.array([[1 - v[o] for o in OBJ]]), ref)}
    (HERE / "results.json").write_text(json.dumps(out, indent=2))
    plot(out)
    write_md(out)
    print((HERE / "results.md").read_text())


def plot(out: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 5))
    for (name, r), marker in zip(out["runs"].items(), "osv^"):
        pts = sorted((s["math"], s["roman"]) for s in r["front"])
        ax.plot(*zip(*pts), marker + "-", ms=5, label=f"{name}: HV {r['hypervolume']:.3f}")
    if "ties_default" in out:
        v = out["ties_default"]["validation"]
        ax.scatter(v["math"], v["roman"], marker="D", s=60, c="k", zorder=5, label=f"TIES default: HV {out['ties_default']['hypervolume']:.3f}")
    refs = next(iter(out["runs"].values()))["references"]
    for label, s in refs.items():
        ax.scatter(s["math"], s["roman"], marker="*", s=180, zorder=6, label=label)
    ax.set_xlabel("math (word problems) exact match, validation subset")
    ax.set_ylabel("roman numerals exact match, validation subset")
    ax.set_title(f"SmolLM2-135M merges, {out['budget']} evaluations each")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "compare.png", dpi=110)
    plt.close(fig)


def write_md(out: dict) -> None:
    lines = [
        f"| search (budget {out['budget']}) | evaluations | hypervolume | merge s / candidate | eval s / candidate | candidates / hour | knee on test: math / roman / target |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in out["runs"].items():
        knee = r["test"].get("knee", {}).get("scores", {})
        k = " / ".join(f"{knee.get(o, float('nan')):.2f}" for o in ("math", "roman", "target")) if knee else "-"
        lines.append(f"| {name} | {r['evaluations']} | {r['hypervolume']:.4f} | {r['mean_merge_s']:.2f} | {r['mean_eval_s']:.1f} | {r['candidates_per_hour']:.0f} | {k} |")
    if "ties_default" in out:
        t = out["ties_default"]["test"]
        lines.append(f"| TIES default (w=1, d=0.5), one recipe | 1 | {out['ties_default']['hypervolume']:.4f} | | | | {t['math']:.2f} / {t['roman']:.2f} / {t['target']:.2f} |")
    first = next(iter(out["runs"].values()))
    lines += ["", "Best points of each search on the held-out test split (full 100 items per task):", "",
              "| run | point | math | roman | target |", "|---|---|---|---|---|"]
    for name, r in out["runs"].items():
        for point, rec in r["test"].items():
            if point.startswith("best_") or point == "knee":
                s = rec["scores"]
                lines.append(f"| {name} | {point} (#{rec['id']}) | {s['math']:.2f} | {s['roman']:.2f} | {s['target']:.2f} |")
    lines += ["", "Source models on the test split:", "", "| model | math | roman | target |", "|---|---|---|---|"]
    for label in ("base", "expert:math", "expert:roman"):
        if label in first["test"]:
            s = first["test"][label]["scores"]
            lines.append(f"| {label} | {s['math']:.2f} | {s['roman']:.2f} | {s['target']:.2f} |")
    lines += ["", "![fronts](compare.png)", ""]
    (HERE / "results.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
