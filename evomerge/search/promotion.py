"""Multi-fidelity promotion: could a partly scored candidate still enter the front?

A score from ``n`` of a split's ``N`` items is the full split's score up to sampling
error; its standard error with the finite-population correction,
``se * sqrt((N - n) / (N - 1))``, is zero once every item is scored. A candidate is
promoted (scored on more items) unless some current front point, at its pessimistic end
(score - k se), dominates the candidate at its optimistic end (score + k se). When every
true score lies inside its ``k`` standard errors, no candidate that an exact evaluation
would put on the front is dropped: a front point that rules it out would dominate it
exactly as well.

The front is read from the live archive, so resume needs no state of its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from evomerge.search.archive import Archive, Record
from evomerge.search.pareto import nondominated


@dataclass(frozen=True)
class Interval:
    """Scores (maximised, one per objective) with a half width per objective."""

    scores: np.ndarray
    half_width: np.ndarray

    @property
    def low(self) -> np.ndarray:
        return self.scores - self.half_width

    @property
    def high(self) -> np.ndarray:
        return self.scores + self.half_width


def finite_population_se(stderr: float, n: int, n_total: int) -> float:
    """How far a mean of ``n`` of ``n_total`` items may sit from the mean of all of them.

    A zero standard error from a small sample (all items right or all wrong) is floored
    at ``1 / (n + 2)`` (about the binomial error of one more item either way)."""
    if n >= n_total:
        return 0.0
    se = max(float(stderr) if math.isfinite(stderr) else 0.0, 1.0 / (n + 2))
    return se * math.sqrt((n_total - n) / max(n_total - 1, 1))


def could_enter_front(candidate: Interval, front: Sequence[Interval]) -> bool:
    """False when a front point's pessimistic scores dominate the candidate's optimistic ones."""
    for f in front:
        if np.all(f.low >= candidate.high) and np.any(f.low > candidate.high):
            return False
    return True


class Promoter:
    """Decides promotions against the front of an archive (search records without error)."""

    def __init__(self, objectives: Sequence[str], n_total: Mapping[str, int], k: float = 2.0, archive: Archive | None = None):
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        self.objectives = list(objectives)
        self.n_total = dict(n_total)
        self.k = float(k)
        self.archive = archive

    def interval(self, scores: Mapping[str, float], stderr: Mapping[str, float], fidelity: Mapping[str, int]) -> Interval:
        s = np.array([float(scores[o]) for o in self.objectives])
        hw = np.array(
            [
                self.k * finite_population_se(stderr.get(o, 0.0), int(fidelity.get(o, self.n_total[o])), self.n_total[o])
                for o in self.objectives
            ]
        )
        return Interval(s, hw)

    def front(self) -> list[Record]:
        if self.archive is None:
            return []
        recs = [r for r in self.archive.search_records() if r.error is None and all(o in r.scores for o in self.objectives)]
        if not recs:
            return []
        idx = nondominated(np.array([[1.0 - r.scores[o] for o in self.objectives] for r in recs]))
        return [recs[i] for i in idx]

    def should_promote(self, scores: Mapping[str, float], stderr: Mapping[str, float], fidelity: Mapping[str, int]) -> bool:
        if all(int(fidelity.get(o, 0)) >= self.n_total[o] for o in self.objectives):
            return False  # already exact
        front = [self.interval(r.scores, r.stderr, r.fidelity) for r in self.front()]
        return could_enter_front(self.interval(scores, stderr, fidelity), front)
