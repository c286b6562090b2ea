"""Real-model experiment, step 3: compare the searched fronts with the baselines at equal
budget (`evomerge compare`, written as compare.md / compare.png / compare.html here) and
score TIES with default settings (weights 1, density 0.5) -- a single recipe -- on the same
validation subset and on the test split (ties_default.json).

    python experiments/smollm2/report.py [--budget 48] [--no-ties]

Reads the runs in experiments/smollm2/runs/ (nsga2-s0, nsga2-modelwise-ties, grid_ta, random-s0).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = {
    "nsga2 (layer-wise mixed, 40 genes)": "nsga2-s0",
    "nsga2 (model-wise TIES, 4 genes)": "nsga2-modelwise-ties",
    "grid (model-wise TA, 6x6)": "grid_ta",
    "random (layer-wise mixed, 40 genes)": "random-s0",
}


def ties_default(run_dir: Path) -> dict:
    """Score TIES (w=1, density=0.5) with the run's own pool, subset and tasks (needs the models)."""
    from omegaconf import OmegaConf

    from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
    from evomerge.merge.recipe import Recipe
    from evomerge.session import open_session

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
    p.add_argument("--no-ties", action="store_true", help="skip scoring the TIES-default recipe")
    args = p.parse_args()
    present = {name: HERE / "runs" / folder for name, folder in RUNS.items() if (HERE / "runs" / folder / "summary.json").is_file()}
    for name in RUNS.keys() - present.keys():
        print(f"skipping {name}: experiments/smollm2/runs/{RUNS[name]} has no summary.json yet")
    if not present:
        raise SystemExit("no finished runs in experiments/smollm2/runs (see README.md, Reproduce)")
    labels = ",".join(f"'{name}'" for name in present)
    cmd = [sys.executable, "-m", "evomerge", "compare", f"runs=[{','.join(map(str, present.values()))}]", f"budget={args.budget}",
           f"labels=[{labels}]", f"out={HERE}"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    if not args.no_ties:
        ties = ties_default(next(iter(present.values())))
        (HERE / "ties_default.json").write_text(json.dumps(ties, indent=2))
        print("TIES default (w=1, d=0.5):", json.dumps(ties))


if __name__ == "__main__":
    main()
