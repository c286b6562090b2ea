"""Multi-fidelity estimator: small subset first, promotion toward the full split.

Each task's docs are put in one fixed order per run (the first ``subset_size`` are the
fixed-subset estimator's subset, the rest a seeded permutation), saved in
``<run_dir>/fidelity.json``. Fidelity ``i`` scores the first ``n_i`` docs, ``n_0 =
subset_size`` and ``n_{i+1} = growth * n_i`` up to the whole split. After each level the
candidate -- still in the live model, nothing is merged again -- is promoted only if it
could enter the current front (``evomerge.search.promotion``); only the new docs are
scored. The archive keeps the highest-fidelity score with its item counts.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.estimators.saved import read_saved
from evomerge.estimators.base import FitnessContext, Scores
from evomerge.estimators.lm_eval_fitness import choose_subset, require_single_tasks
from evomerge.search.promotion import Promoter

FIDELITY_FILE = "fidelity.json"


def fidelity_levels(first: int, n_total: int, growth: float, cap: int | None = None) -> list[int]:
    """Item counts per fidelity: first, first * growth, ... up to min(n_total, cap)."""
    if growth <= 1.0:
        raise ConfigError(f"fitness.estimator.growth must be > 1, got {growth}")
    top = n_total if cap is None else min(int(cap), n_total)
    levels = [min(int(first), top)]
    while levels[-1] < top:
        levels.append(min(top, int(math.ceil(levels[-1] * growth))))
    return levels


def doc_order(n_docs: int, first: int, seed: int) -> list[int]:
    """The subset estimator's subset (same seed) first, then the other docs shuffled."""
    head = choose_subset(n_docs, first, seed)
    rest = sorted(set(range(n_docs)) - set(head))
    rng = np.random.default_rng(seed + 7919)
    return head + [int(i) for i in rng.permutation(rest)]


class MultiFidelityEstimator:
    def __init__(
        self,
        ctx: FitnessContext,
        k: float = 2.0,
        growth: float = 2.0,
        max_items: int | None = None,
        fitness: Any = None,
    ):
        if ctx.subset_size is None:
            raise ConfigError("the multifidelity estimator needs fitness.subset_size (its first fidelity)")
        self.fitness = fitness or ctx.full_split_fitness()
        require_single_tasks(self.fitness, "multifidelity")
        self.objectives = list(ctx.objectives)
        n_docs = dict(self.fitness.scorer.n_docs)
        path = ctx.run_dir / FIDELITY_FILE if ctx.run_dir is not None else None
        if path is not None and path.exists():
            saved = read_saved(path, "order")
            self.order = {t: [int(i) for i in v] for t, v in saved["order"].items()}
            self.levels = {t: [int(n) for n in v] for t, v in saved["levels"].items()}
        else:
            self.order = {
                t: doc_order(n, int(ctx.subset_size), ctx.subset_seed + i) for i, (t, n) in enumerate(sorted(n_docs.items()))
            }
            self.levels = {t: fidelity_levels(int(ctx.subset_size), n, float(growth), max_items) for t, n in n_docs.items()}
            if path is not None:
                path.write_text(json.dumps({"order": self.order, "levels": self.levels}))
        self.n_levels = max(len(v) for v in self.levels.values())
        by_name = {t.name: t.task for t in self.fitness.tasks}
        top = {t: v[-1] for t, v in self.levels.items()}
        self.promoter = Promoter(self.objectives, {o: top[by_name[o]] for o in self.objectives}, k=k)
        self.promotions = 0

    @property
    def objective_names(self) -> list[str]:
        return self.fitness.objective_names

    def attach(self, archive) -> None:
        """The search loop's archive: its front decides promotions (live, so resume works)."""
        self.promoter.archive = archive

    def _ids(self, level: int, start_level: int | None = None) -> dict[str, list[int]]:
        out = {}
        for t, order in self.order.items():
            lv = self.levels[t]
            hi = lv[min(level, len(lv) - 1)]
            lo = 0 if start_level is None else lv[min(start_level, len(lv) - 1)]
            if hi > lo:
                out[t] = order[lo:hi]
        return out

    def __call__(self) -> Scores:
        items = self.fitness.score_items(self._ids(0))
        scores = self.fitness.scores_from_items(items)
        level = 0
        while level + 1 < self.n_levels and self.promoter.should_promote(scores, scores.stderr, scores.fidelity):
            more = self._ids(level + 1, start_level=level)
            level += 1
            if more:
                items = items.merged(self.fitness.score_items(more))
                scores = self.fitness.scores_from_items(items)
            self.promotions += 1
        return scores
