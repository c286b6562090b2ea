"""Candidates per minute on the default toy zoo, and where the time goes.

Each candidate = in-place merge of a random layer-wise mixed-method genome + lm-eval
scoring of the default fitness tasks (math, lang, target) on the 100-doc subsets. Time
inside the model's forward/generate calls is measured by wrapping HFLM's
``_model_call``/``_model_generate``; the rest of ``evaluate`` is harness overhead.

    python experiments/bench_fitness.py [--candidates 20] [--device cpu|cuda] [--subset 100] [--mode new|old|both]

``--mode old`` scores the way evomerge did before requests were reused: one
``evaluator.evaluate`` call plus a full ``gc.collect()`` per candidate. ``both`` runs old
then new on the same candidates and checks that they give the same scores.
"""

from __future__ import annotations

import argparse
import gc
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
        self.add(lm)

    def add(self, lm) -> None:
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


class Tally:
    def __init__(self):
        self.merge_s = self.eval_s = self.model_s = self.total = 0.0
        self.n = 0
        self.scores: list[dict[str, float]] = []

    def line(self, mode: str) -> str:
        harness_s = self.eval_s - self.model_s
        return (
            f"[{mode}] candidates per minute: {60 * self.n / self.total:.1f}  ({self.total / self.n * 1e3:.0f} ms each)\n"
            f"[{mode}] share of time: merge {self.merge_s / self.total:6.1%} | model forward/generate {self.model_s / self.total:6.1%} | "
            f"harness overhead {harness_s / self.total:6.1%} | loop {1 - (self.merge_s + self.eval_s) / self.total:6.1%}"
        )


def score(mode: str, fitness, plain_lm=None) -> dict[str, float]:
    if mode == "old":  # what LmEvalFitness.__call__ did before: evaluate() on a plain HFLM, then gc
        out = fitness.evaluate_with_harness(lm=plain_lm)
        gc.collect()
        return out
    return dict(fitness())


def bench(modes: list[str], merger, fitness, timer, recipes, plain_lm) -> dict[str, Tally]:
    """Each candidate is scored by every mode in turn, so both see the same machine load."""
    tallies = {m: Tally() for m in modes}
    merger.apply(recipes[0])
    for m in modes:
        score(m, fitness, plain_lm)  # warm-up (builds the fast path's requests)
    for recipe in recipes[1:]:
        for m in modes:
            t = tallies[m]
            timer.seconds = 0.0
            start = time.perf_counter()
            merger.apply(recipe)
            t.merge_s += time.perf_counter() - start
            t0 = time.perf_counter()
            t.scores.append(score(m, fitness, plain_lm))
            t.eval_s += time.perf_counter() - t0
            t.model_s += timer.seconds
            t.total += time.perf_counter() - start
            t.n += 1
    return tallies


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--candidates", type=int, default=20)
    p.add_argument("--subset", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--mode", choices=("new", "old", "both"), default="both")
    args = p.parse_args()
    quiet_libraries()
    zoo = build_zoo(default_cache_dir(), ZooConfig())
    merger = Merger(ModelPool(zoo.base, zoo.experts), device=args.device)
    fitness = LmEvalFitness(merger.model, merger.tokenizer, TASKS, subset_size=args.subset, batch_size=args.batch_size, max_length=64)
    from lm_eval.models.huggingface import HFLM

    plain_lm = HFLM(pretrained=merger.model, tokenizer=merger.tokenizer, batch_size=args.batch_size, max_length=64)
    timer = ModelTimer(fitness.lm, merger.device)
    timer.add(plain_lm)
    space = GenomeSpace(
        n_experts=2, n_layers=merger.n_layers, expert_names=list(zoo.experts),
        methods=("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp"), layer_groups=2,
    )
    rng = np.random.default_rng(0)
    recipes = [space.decode(rng.random(space.n_var)) for _ in range(args.candidates + 1)]
    docs = sum(len(v) for v in fitness.subset.values())
    print(f"device {merger.device}, {args.candidates} candidates, {docs} docs each ({len(TASKS)} tasks)")
    modes = ["old", "new"] if args.mode == "both" else [args.mode]
    tallies = bench(modes, merger, fitness, timer, recipes, plain_lm)
    for m in modes:
        print(tallies[m].line(m))
    if len(modes) == 2:
        same = tallies["old"].scores == tallies["new"].scores
        print(f"old and new scores identical on all {args.candidates} candidates: {same}")


if __name__ == "__main__":
    main()
