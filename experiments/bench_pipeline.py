"""evomerge's candidate vs the disk pipeline, per candidate, same candidates, interleaved.

evomerge: merge in place into the live model (``Merger.apply``) + lm-eval scoring of resident
requests (``LmEvalFitness``). The disk pipeline, as a user runs it without evomerge: mergekit
writes the merge to a folder (``run_merge`` on the recipe's mergekit config), transformers
loads it, ``lm_eval.simple_evaluate`` scores it. Both score the same validation items of the
same tasks (the first items of the test split, the split simple_evaluate scores) with the same batch size; the script checks that the scores agree and prints each
candidate's seconds on both sides and the ratio of the means.

    python experiments/bench_pipeline.py                                  # SmolLM2-135M (experiments/smollm2/prepare.py)
    python experiments/bench_pipeline.py --setting toy --candidates 2 --limit 10   # the shipped toy zoo: seconds
    python experiments/bench_pipeline.py --json out.json

Timed on whatever the machine runs beside it: read the ratio of one run, interleaved, not
the absolute seconds of two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness, quiet_libraries
from evomerge.estimators.tasks import packaged_task_dir
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import ModelPool


@dataclass
class Setting:
    base: str
    experts: dict[str, str]
    tasks: list[FitnessTask]
    include_path: str
    batch_size: int
    max_length: int | None


def toy_setting() -> Setting:
    from evomerge.zoo.shipped import shipped_zoo

    zoo = shipped_zoo("default")
    tasks = [FitnessTask("math", "toy_math", "exact_match,first-number"), FitnessTask("lang", "toy_lang", "acc,none")]
    return Setting(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}, tasks, str(packaged_task_dir()), 64, None)


def smollm2_setting() -> Setting:
    folder = Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")) / "smollm2"
    if not (folder / "expert_roman").is_dir():
        sys.exit(f"no SmolLM2 models in {folder}: run python experiments/smollm2/prepare.py first (or --setting toy)")
    tasks = [FitnessTask("math", "smollm2_math", "exact_match,extract"), FitnessTask("roman", "smollm2_roman", "exact_match,extract")]
    return Setting(str(folder / "base"), {"math": str(folder / "expert_math"), "roman": str(folder / "expert_roman")}, tasks,
                   str(folder / "tasks"), 40, 256)


def candidates(n: int, n_layers: int, seed: int) -> list[Recipe]:
    """Model-wise TIES merges with random weights and densities (what a search proposes)."""
    rng = np.random.default_rng(seed)
    return [Recipe.uniform("ties", {"weight": rng.uniform(0.2, 1.2, 2).round(3).tolist(), "density": rng.uniform(0.2, 0.9, 2).round(3).tolist()},
                           n_layers) for _ in range(n)]


def disk_pipeline(recipe: Recipe, s: Setting, items: dict[str, list[int]], scratch: Path) -> dict[str, float]:
    """mergekit -> folder -> transformers -> simple_evaluate, as a user would chain them."""
    import yaml
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = scratch / "merged"
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_mergekit_yaml(base=s.base, experts=list(s.experts.values()))))
    run_merge(config, str(out), MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, lazy_unpickle=False))
    model_args = f"pretrained={out},dtype=float32" + (f",max_length={s.max_length}" if s.max_length else "")
    results = simple_evaluate(model="hf", model_args=model_args, tasks=sorted(items), batch_size=s.batch_size, device="cpu",
                              task_manager=TaskManager(include_path=s.include_path, include_defaults=False), samples=items,
                              bootstrap_iters=0, log_samples=False)
    return {t.name: float(results["results"][t.task][t.metric]) for t in s.tasks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", choices=["smollm2", "toy"], default="smollm2")
    ap.add_argument("--candidates", type=int, default=4)
    ap.add_argument("--limit", type=int, default=40, help="items per task (40: the search's subset size on smollm2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    quiet_libraries()
    s = smollm2_setting() if args.setting == "smollm2" else toy_setting()
    merger = Merger(ModelPool(s.base, s.experts), device="cpu", table_size=None)
    # the test split: the one simple_evaluate scores (a task's validation split needs a task
    # file of its own there); the first --limit items on both sides
    fitness = LmEvalFitness(merger.model, merger.tokenizer, s.tasks, split="test", batch_size=s.batch_size, max_length=s.max_length,
                            include_paths=[s.include_path], subset={t.task: list(range(args.limit)) for t in s.tasks})
    items = {t.task: list(range(args.limit)) for t in s.tasks}
    rows = []
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="evomerge-bench-pipeline-") as tmp:
        os.chdir(s.include_path)  # lm-eval alone resolves a task's data files against the working directory
        try:
            for i, recipe in enumerate(candidates(args.candidates, merger.n_layers, args.seed)):
                started = time.perf_counter()
                merger.apply(recipe)
                ours = dict(fitness())
                ours_s = time.perf_counter() - started
                started = time.perf_counter()
                theirs = disk_pipeline(recipe, s, items, Path(tmp))
                disk_s = time.perf_counter() - started
                same = all(abs(ours[k] - theirs[k]) < 1e-12 for k in ours)
                rows.append({"candidate": i, "evomerge_s": round(ours_s, 3), "disk_s": round(disk_s, 3), "scores": ours, "disk_scores": theirs, "same_scores": same})
                print(f"candidate {i}: evomerge {ours_s:6.2f} s, disk pipeline {disk_s:6.2f} s ({disk_s / ours_s:4.1f}x), "
                      f"scores {'equal' if same else f'DIFFER: {ours} vs {theirs}'}", flush=True)
        finally:
            os.chdir(cwd)
    # the first candidate of each side pays one-time costs (lm-eval's request building, mergekit's imports)
    steady = rows[1:] or rows
    ratio = statistics.mean(r["disk_s"] for r in steady) / statistics.mean(r["evomerge_s"] for r in steady)
    summary = {"setting": args.setting, "candidates": args.candidates, "items_per_task": args.limit, "batch_size": s.batch_size,
               "threads": torch.get_num_threads(), "rows": rows, "ratio_after_first": round(ratio, 2),
               "all_scores_equal": all(r["same_scores"] for r in rows)}
    print(f"disk pipeline / evomerge per candidate (mean of candidates 2..{len(rows)}): {ratio:.1f}x; "
          f"scores equal on every candidate: {summary['all_scores_equal']}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
