"""How long a model-based search takes to propose (fit + acquisition), on synthetic data.

Prints one JSON line per case: the median and max proposal time over ``--reps`` proposals of
``algorithm=bo`` (qLogNEHVI and qLogNParEGO) and ``algorithm=map`` at the sizes the issue
names (8 genes / 48 points / q=4 as ``bo_blocks`` at budget 48; 32 genes / 100 points / q=1 as an
async worker asking for one candidate). The objectives are two smooth bowls plus noise with a
known standard error, as a fitness with 40-item subsets would give.

    python experiments/benchmark/proposal_time.py [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from evomerge.search.bayes import BayesStrategy
from evomerge.search.surrogate import QuadraticSurrogateStrategy

CASES = [  # (genes, points, q)
    (8, 48, 4),
    (32, 100, 1),
]


def synthetic(n_points: int, n_var: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.random((n_points, n_var))
    a, b = np.full(n_var, 0.3), np.full(n_var, 0.7)
    score = np.stack([1 - ((X - a) ** 2).mean(1), 1 - ((X - b) ** 2).mean(1)], axis=1)
    S = np.full_like(score, 0.05)
    F = 1.0 - np.clip(score + rng.normal(0, 0.05, score.shape), 0, 1)  # minimised, as the loop tells
    return X, F, S


def time_strategy(make, n_var: int, n_points: int, q: int, reps: int) -> list[float]:
    times = []
    for rep in range(reps):
        strategy = make(q)
        strategy.setup(n_var, 2, max_evals=10_000, seed=rep)
        X, F, S = synthetic(n_points, n_var, rep)
        strategy.design = strategy.design[:0]  # the data stand in for the design: model rounds only
        strategy.tell(X, F, S)
        started = time.perf_counter()
        strategy._propose(q)  # noqa: SLF001 -- the proposal itself, without the loop around it
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    makers = {
        "bo qlognehvi": lambda q: BayesStrategy(pop_size=q, n_init=1),
        "bo qlognparego": lambda q: BayesStrategy(pop_size=q, n_init=1, acquisition="qlognparego"),
        "map": lambda q: QuadraticSurrogateStrategy(pop_size=q),
    }
    for n_var, n_points, q in CASES:
        for name, make in makers.items():
            times = time_strategy(make, n_var, n_points, q, args.reps)
            print(json.dumps({"algorithm": name, "genes": n_var, "points": n_points, "q": q,
                              "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}), flush=True)


if __name__ == "__main__":
    main()
