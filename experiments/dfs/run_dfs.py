"""PS vs DFS vs PS+DFS at equal budget (issue 16).

- ``ps``: the default parameter-space search (NSGA-II, layer-wise mixed genome, warm start)
  with the whole budget;
- ``dfs``: a data-flow (layer-path) search over base + experts (``+experiment=toy_dfs``:
  NSGA-II, warm-started with the identity path, each expert's layers and the stack);
- ``ps_dfs``: ``ps`` with half the budget, then a DFS over its knee (embeddings and head
  from it) + the experts with the other half (``+experiment=toy_ps_dfs``); its front is the
  union of both runs' fronts.

Every run evaluates base and experts (not counted in the budget); its chosen points (knee,
best per objective, on validation) and the references are re-scored on the full test split
(``fitness.test_rescore=true``; re-scoring every front point did not fit the shared CPU).
``val_hv``: hypervolume (reference score 0) of the validation front + references;
``test_hv``: of the chosen points + references on the test split (PS+DFS: both stages'
chosen points). Also: test scores of the knee and of the best point per objective, chosen
on validation among those points.

    python experiments/dfs/run_dfs.py                         # toy, budget 48, seeds 0 1 2
    python experiments/dfs/run_dfs.py --setting smollm2 --budgets 24 --seeds 0

Runs go to ``runs/dfs/<setting>/<search>/<budget>/seed-<s>[/ps|/dfs]``; finished runs are
skipped. Results: ``results.json`` (``{setting: {search: {budget: [{seed, val_hv, test_hv,
evals, ...}]}}}``) and ``results.md`` next to this file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import run_evomerge  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS: dict[str, dict[str, list[str]]] = {
    # PS as measured (docs/dfs.md): NSGA-II over the layer-wise mixed genome, the default until
    # 2026-12-05, with the smollm2 preset's former 3 layer groups and population 12
    "toy": {"ps": ["algorithm=nsga2", "genome=layerwise_mixed"], "dfs": ["+experiment=toy_dfs"], "ps_dfs": ["+experiment=toy_ps_dfs"]},
    "smollm2": {
        "ps": ["+experiment=smollm2", "algorithm=nsga2", "genome=layerwise_mixed", "genome.layer_groups=3", "algorithm.pop_size=12"],
        "dfs": ["+experiment=smollm2", "genome=dfs", "algorithm=nsga2", "algorithm.pop_size=12", "genome.repeats=1"],
        "ps_dfs": ["+experiment=smollm2", "genome=dfs", "algorithm=nsga2", "algorithm.pop_size=12", "genome.repeats=1"],
    },
}
SEARCHES = ["ps", "dfs", "ps_dfs"]


def run(target: Path, args: list[str]) -> Path:
    if (target / "summary.json").is_file():
        return target
    if (target / "config.yaml").is_file():
        args = [f"resume={target}"]
    else:
        args = [*args, "fitness.test_rescore=true", "search.progress=false", "report.html=false", f"hydra.run.dir={target}"]
    return run_evomerge(args, target, "dfs")


def run_search(root: Path, setting: str, search: str, budget: int, seed: int) -> list[Path]:
    where = root / setting / search / str(budget) / f"seed-{seed}"
    common = [f"seed={seed}", f"fitness.subset_seed={seed}"]
    if search in ("ps", "dfs"):
        return [run(where, [*SETTINGS[setting][search], *common, f"search.max_evals={budget}"])]
    first = budget // 2
    ps = run(where / "ps", [*SETTINGS[setting]["ps"], *common, f"search.max_evals={first}"])
    knee = ps / "recipes" / "knee.yaml"
    dfs = run(where / "dfs", [*SETTINGS[setting]["ps_dfs"], *common, f"genome.merged={knee}", f"search.max_evals={budget - first}"])
    return [ps, dfs]


def hv(points: list[list[float]]) -> float:
    from evomerge.search.pareto import hypervolume

    p = np.array(points, dtype=float)
    return round(float(hypervolume(1.0 - p, np.ones(p.shape[1]))), 6) if len(p) else 0.0


def measure(runs: list[Path]) -> dict[str, Any]:
    """HV of the union of the runs' fronts + references (validation and test); test scores
    of the knee / best-per-objective of the union, chosen on validation."""
    from evomerge.search.pareto import knee_point, nondominated

    val_front, val, test, evals = [], [], [], 0
    for r in runs:
        s = json.loads((r / "summary.json").read_text())
        objectives = s["objectives"]
        evals += int(s["n_evaluated"])
        by_id = {p["id"]: p["scores"] for p in s["front"]}
        val_front += [[p["scores"][o] for o in objectives] for p in s["front"]]
        for name, scores in s["references"].items():
            val_front.append([scores[o] for o in objectives])
            val.append([scores[o] for o in objectives])
            test.append([s["test"][name]["scores"][o] for o in objectives])
        for name, rid in s["chosen"].items():
            val.append([by_id[rid][o] for o in objectives])
            test.append([s["test"][name]["scores"][o] for o in objectives])
    losses = 1.0 - np.array(val)
    front = list(nondominated(losses))
    knee = front[knee_point(losses[front])]
    out: dict[str, Any] = {"val_hv": hv(val_front), "test_hv": hv(test), "evals": evals, "knee_test": dict(zip(objectives, test[knee]))}
    for i, o in enumerate(objectives):
        best = max(front, key=lambda j: (val[j][i], sum(val[j])))
        out[f"best_{o}_test"] = test[best][i]
    return out


def write_report(results: dict, out: Path) -> None:
    lines = ["# PS vs DFS vs PS+DFS at equal budget", "", "mean ± sample std over seeds; reference score 0; val HV: validation front + base + experts; test HV: chosen points (knee, best per objective) + base + experts on the test split.", ""]
    for setting, searches in results.items():
        budgets = sorted({b for s in searches.values() for b in s}, key=int)
        for budget in budgets:
            lines += [f"## {setting}, budget {budget}", "", "| search | seeds | val HV | **test HV** | knee on test | best per objective on test |", "|---|---|---|---|---|---|"]
            for name in SEARCHES:
                rows = searches.get(name, {}).get(budget)
                if not rows:
                    continue

                def ms(key: str) -> str:
                    v = np.array([r[key] for r in rows], dtype=float)
                    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.4f}"

                objs = list(rows[0]["knee_test"])
                knee = ", ".join(f"{o} {np.mean([r['knee_test'][o] for r in rows]):.3f}" for o in objs)
                best = ", ".join(f"{o} {np.mean([r[f'best_{o}_test'] for r in rows]):.3f}" for o in objs)
                lines.append(f"| `{name}` | {len(rows)} | {ms('val_hv')} | {ms('test_hv')} | {knee} | {best} |")
            lines.append("")
    (out / "results.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", default="toy", choices=list(SETTINGS))
    ap.add_argument("--searches", nargs="+", default=SEARCHES, choices=SEARCHES)
    ap.add_argument("--budgets", nargs="+", type=int, default=[48])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--root", type=Path, default=Path("runs/dfs"))
    ap.add_argument("--out", type=Path, default=HERE)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    results_file = args.out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    for seed in args.seeds:
        for budget in args.budgets:
            for search in args.searches:
                where = args.root / args.setting / search / str(budget) / f"seed-{seed}"
                if args.report_only:
                    runs = [where] if search != "ps_dfs" else [where / "ps", where / "dfs"]
                    if not all((r / "summary.json").is_file() for r in runs):
                        continue
                else:
                    runs = run_search(args.root, args.setting, search, budget, seed)
                rows = results.setdefault(args.setting, {}).setdefault(search, {}).setdefault(str(budget), [])
                rows[:] = [r for r in rows if r["seed"] != seed] + [{"seed": seed, **measure(runs)}]
                rows.sort(key=lambda r: r["seed"])
                args.out.mkdir(parents=True, exist_ok=True)
                results_file.write_text(json.dumps(results, indent=1))
                write_report(results, args.out)
    print((args.out / "results.md").read_text() if (args.out / "results.md").is_file() else "no results yet")


if __name__ == "__main__":
    main()
