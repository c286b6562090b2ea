"""Multi-fidelity promotion on a real search stream (toy zoo): items, seconds, front quality.

For each seed, the same search (default genome, NSGA-II, ``--budget`` evaluations, seeded
with the hand-made references) runs once per arm:

- ``subset``: the default estimator at the default ``fitness.subset_size`` (100 of 200);
- ``subset_<first>``: the same estimator on ``--first`` items per task;
- ``multifidelity``: starts at ``--first`` items and promotes (x2) toward the full split
  while a candidate could enter the running front (k = 2 standard errors).

Per arm: items scored per candidate and task (mean over search candidates), evaluation
seconds per candidate, and the final front (the run's own, from its archived scores)
re-scored on the full validation split, with the hypervolume of that re-scored front
(losses 1 - score, reference point 1 per objective). Extra tasks are off (objectives only).

    python experiments/estimators/search_stream.py [--seeds 0 1 2] [--budget 48] [--first 20]

Results go to ``results.json`` under ``"search_stream"`` (the main table keeps the
issue's shape).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def arms(first: int) -> dict[str, list[str]]:
    return {
        "subset": ["fitness/estimator=subset"],
        f"subset_{first}": ["fitness/estimator=subset", f"fitness.subset_size={first}"],
        "multifidelity": ["fitness/estimator=multifidelity", f"fitness.subset_size={first}", "fitness.estimator.k=2.0"],
    }


def run_one(run_dir: Path, overrides: list[str], seed: int, budget: int, log: Path) -> float:
    cmd = [
        sys.executable, "-m", "evomerge", f"seed={seed}", f"search.max_evals={budget}", "device=cpu",
        "fitness.extra=[]", "fitness.test_rescore=false", "search.progress=false", "report.html=false",
        "report.plots=false", f"hydra.run.dir={run_dir}", *overrides,
    ]
    started = time.perf_counter()
    with open(log, "w") as fh:
        subprocess.run(cmd, check=True, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - started


def _seed(run_dir: Path) -> int:
    import yaml

    return int(yaml.safe_load((run_dir / "config.yaml").read_text())["seed"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budget", type=int, default=48)
    p.add_argument("--first", type=int, default=20, help="first fidelity (items per task) of multifidelity")
    p.add_argument("--out", default=str(HERE / "results.json"))
    p.add_argument("--keep", default=None, help="keep the run folders here")
    p.add_argument("--arms", nargs="+", default=None, help="run only these arms (default: all)")
    p.add_argument("--from-runs", nargs="+", default=None, metavar="ARM=RUN_DIR",
                   help="analyse existing (possibly unfinished) run folders instead of running searches")
    p.add_argument("--no-rescore", dest="rescore", action="store_false",
                   help="skip re-scoring the fronts on the full split (front_hv_full_split is then left out)")
    p.add_argument("--max-candidates", type=int, default=None,
                   help="analyse only the first N search candidates of each run (equal counts for unfinished runs)")
    args = p.parse_args()

    from measure import compose

    from evomerge.estimators.lm_eval_fitness import LmEvalFitness, quiet_libraries
    from evomerge.merge.merger import Merger
    from evomerge.merge.recipe import Recipe
    from evomerge.session import build_pool, fitness_tasks
    from evomerge.search.archive import Archive
    from evomerge.search.pareto import hypervolume, nondominated

    quiet_libraries()
    cfg = compose("toy", [])
    pool, _, _ = build_pool(cfg)
    merger = Merger(pool, device="cpu")
    tasks = fitness_tasks(cfg.fitness.objectives, "fitness.objectives")
    objectives = [t.name for t in tasks]
    full = LmEvalFitness(merger.model, merger.tokenizer, tasks, subset_size=None, batch_size=int(cfg.fitness.batch_size),
                         max_length=cfg.fitness.max_length)
    n_total = {t.name: full.scorer.n_docs[t.task] for t in tasks}
    exact_cache: dict[str, dict[str, float]] = {}  # recipe JSON -> full-split scores (shared by the arms)

    def exact(recipe: dict) -> dict[str, float]:
        key = json.dumps(recipe, sort_keys=True)
        if key not in exact_cache:
            merger.apply(Recipe.from_dict(recipe))
            exact_cache[key] = {o: float(v) for o, v in full().items()}
        return exact_cache[key]

    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="search_stream_"))
    root.mkdir(parents=True, exist_ok=True)
    per_run: dict[str, list[dict]] = {}
    if args.from_runs:
        jobs = [(arm, Path(d), None) for arm, d in (x.split("=", 1) for x in args.from_runs)]
    else:
        jobs = [(arm, root / arm / f"seed-{seed}", (overrides, seed)) for seed in args.seeds
                for arm, overrides in arms(args.first).items() if not args.arms or arm in args.arms]
    if args.from_runs:
        # a candidate that one arm scored on every item needs no re-scoring in another
        for _, run_dir, _ in jobs:
            for r in Archive(run_dir / "archive.jsonl").records:
                if r.error is None and all(r.fidelity.get(o, 0) >= n_total[o] for o in objectives):
                    exact_cache.setdefault(json.dumps(r.recipe, sort_keys=True), {o: float(r.scores[o]) for o in objectives})
    for arm, run_dir, todo in jobs:
        wall = None
        if todo is not None:
            wall = run_one(run_dir, todo[0], todo[1], args.budget, root / f"{arm}-{todo[1]}.log")
        recs = [r for r in Archive(run_dir / "archive.jsonl").records if r.error is None]
        search = [r for r in recs if r.kind == "search"][: args.max_candidates]
        recs = [r for r in recs if r.kind != "search"] + search
        front = [recs[i] for i in nondominated(np.array([[1 - r.scores[o] for o in objectives] for r in recs]))]
        # a score from every item of the split is already exact
        is_exact = [all(r.fidelity.get(o, 0) >= n_total[o] for o in objectives) for r in front]
        rescored = [dict(r.scores) if ok else exact(r.recipe) for r, ok in zip(front, is_exact)] if args.rescore else None
        row = {
            "seed": _seed(run_dir),
            "candidates": len(search),
            "items": float(np.mean([np.mean([r.fidelity[o] for o in objectives]) for r in search])),
            "eval_seconds_per_candidate": float(np.mean([r.eval_s for r in search])),
            "front_size": len(front),
            "front_not_exact": len(is_exact) - sum(is_exact),
            "front_hv_archived": hypervolume(np.array([[1 - r.scores[o] for o in objectives] for r in front]), np.ones(len(objectives))),
            "full_split_share": float(np.mean([all(r.fidelity[o] >= n_total[o] for o in objectives) for r in search])),
        }
        if rescored is not None:
            F = np.array([[1 - s[o] for o in objectives] for s in rescored])
            row["front_hv_full_split"] = hypervolume(F[nondominated(F)], np.ones(len(objectives)))
        if wall is not None:
            row["wall_seconds"] = wall
        per_run.setdefault(arm, []).append(row)
        print(arm, json.dumps(row), flush=True)

    summary: dict[str, dict] = {}
    for arm, rows in per_run.items():
        summary[arm] = {
            key: round(float(np.mean([r[key] for r in rows])), 4)
            for key in ("items", "eval_seconds_per_candidate", "wall_seconds", "front_hv_full_split", "front_hv_archived", "full_split_share",
                        "candidates", "front_size", "front_not_exact")
            if all(key in r for r in rows)
        }
        summary[arm]["seeds"] = [r["seed"] for r in rows]
        if all("front_hv_full_split" in r for r in rows):
            summary[arm]["front_hv_full_split_per_seed"] = [round(r["front_hv_full_split"], 4) for r in rows]
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {}
    data["search_stream"] = {"budget": args.budget, "first": args.first, "max_candidates": args.max_candidates, "arms": summary}
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
