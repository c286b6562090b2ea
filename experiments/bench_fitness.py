"""Candidates per minute on the default toy zoo, and where the time goes.

Each candidate = in-place merge of a random layer-wise mixed-method genome + lm-eval
scoring of the default fitness tasks (math, lang, target) on the 100-doc subsets. Time
inside the model's forward/generate calls is measured by wrapping HFLM's
``_model_call``/``_model_generate``; the rest of ``evaluate`` is harness overhead.

    python experiments/bench_fitness.py [--candidates 20] [--device cpu|cuda] [--subset 100]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness, quiet_libraries
from evomerge.merge.merger import Merger
from evomerge.pool import ModelPool
from evomerge.search.genome import GenomeSpace
from evomerge.zoo.build import ZooConfig, build_zoo, default_cache_dir

TASKS = [
    FitnessTask("math", "toy_math", "exact_match,first-number"),
    FitnessTask("lang", "toy_lang", "acc,none"),
    FitnessTask("target", "toy_target", "exact_match,first-number"),
]


class ModelTimer:
    """Accumulates wall time spent inside the wrapped model calls."""

    def __init__(self, lm, device: torch.device):
        self.seconds = 0.0
        self.device = device
        for name in ("_model_call", "_model_generate"):
            setattr(lm, name, self._wrap(getattr(lm, name)))

    def _wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds += time.perf_counter() - start
            return out

        return timed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--subset", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    args = p.parse_args()
    quiet_libraries()
    zoo = build_zoo(default_cache_dir(), ZooConfig())
    merger = Merger(ModelPool(zoo.base, zoo.experts), device=args.device)
    fitness = LmEvalFitness(merger.model, merger.tokenizer, TASKS, subset_size=args.subset, batch_size=args.batch_size, max_length=64)
    timer = ModelTimer(fitness.lm, merger.device)
    space = GenomeSpace(
        n_experts=2, n_layers=merger.n_layers, expert_names=list(zoo.experts),
        methods=("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp"), layer_groups=2,
    )
    rng = np.random.default_rng(0)
    merger.apply(space.decode(rng.random(space.n_var)))
    fitness()  # warm-up
    timer.seconds = 0.0
    merge_s = eval_s = 0.0
    started = time.perf_counter()
    for _ in range(args.candidates):
        recipe = space.decode(rng.random(space.n_var))
        t = time.perf_counter()
        merger.apply(recipe)
        merge_s += time.perf_counter() - t
        t = time.perf_counter()
        fitness()
        eval_s += time.perf_counter() - t
    total = time.perf_counter() - started
    model_s = timer.seconds
    harness_s = eval_s - model_s
    docs = sum(len(v) for v in fitness.subset.values())
    print(f"device {merger.device}, {args.candidates} candidates, {docs} docs each ({len(TASKS)} tasks)")
    print(f"candidates per minute: {60 * args.candidates / total:.1f}  ({total / args.candidates * 1e3:.0f} ms each)")
    print(f"share of time: merge {merge_s / total:6.1%} | model forward/generate {model_s / total:6.1%} | "
          f"harness overhead {harness_s / total:6.1%} | loop {1 - (merge_s + eval_s) / total:6.1%}")


if __name__ == "__main__":
    main()
