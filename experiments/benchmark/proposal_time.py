"""How long a model-based search takes to propose (fit + acquisition), on synthetic data.

Prints one JSON line per case: the median and max proposal time over ``--reps`` proposals of
``algorithm=bo`` (qLogNEHVI and qLogNParEGO) and ``algorithm=map`` at the sizes the issue
names (8 genes / 48 points / q=4 as ``bo_blocks`` at budget 48; 32 genes / 100 points / q=1 as an
async worker asking for one candidate). The objectives are two smooth bowls plus noise with a
known standard error, as a fitness with 40-item subsets would give.

    python experiments/benchmark/proposal_time.py [--reps 5]

``--replay RUN_DIR`` instead times one ``bo`` round on a finished run's own data (its checkpoint's
told points, scores and standard errors) at the first N of them, as configured and with the
noisy-front baseline capped (``--caps``), side by side in one process: what a round costs as a
run's budget grows, and what ``algorithm.max_baseline`` saves.

    python experiments/benchmark/proposal_time.py --replay runs/benchmark/toy/default/480/seed-0 --points 64 144 300 480
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

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


def told_data(run_dir: Path) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray]:
    """The ``bo`` strategy of a run's checkpoint and the points it was told (X, F, S)."""
    import dill

    from evomerge.search.loop import CHECKPOINT_MAGIC

    data = (run_dir / "checkpoint.pkl").read_bytes()
    if data.startswith(CHECKPOINT_MAGIC):
        data = data[len(CHECKPOINT_MAGIC) + 32 :]
    strategy = dill.loads(data).strategy
    if not isinstance(strategy, BayesStrategy):
        raise SystemExit(f"{run_dir} did not run algorithm=bo ({type(strategy).__name__})")
    return strategy, strategy.X, strategy.F, strategy.S


def replay(run_dir: Path, points: list[int], caps: list[int | None], reps: int) -> None:
    """One round of q candidates at each size, per cap, interleaved; prints the ratio to uncapped."""
    strategy, X, F, S = told_data(run_dir)
    strategy._proposal(strategy.pop_size, X[:16], F[:16], S[:16], None, 0)  # noqa: SLF001 -- imports and first-call costs, untimed
    for n in points:
        if n > len(X):
            print(json.dumps({"points": n, "skipped": f"the run told {len(X)} points"}))
            continue
        times: dict[str, list[float]] = {str(cap): [] for cap in caps}
        for rep in range(reps):
            for cap in caps:  # interleaved: a busy machine slows every variant alike
                strategy.max_baseline = cap
                started = time.perf_counter()
                strategy._proposal(strategy.pop_size, X[:n], F[:n], S[:n], None, 1_000 + rep)  # noqa: SLF001
                times[str(cap)].append(time.perf_counter() - started)
        base = statistics.median(times[str(caps[0])])
        print(json.dumps({"points": n, "q": strategy.pop_size, **{f"max_baseline={cap}": round(statistics.median(times[str(cap)]), 2) for cap in caps},
                          **{f"ratio {caps[0]}/{cap}": round(base / statistics.median(times[str(cap)]), 2) for cap in caps[1:]}}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--replay", type=Path, help="a finished algorithm=bo run directory: time rounds on its own data")
    ap.add_argument("--points", type=int, nargs="+", default=[64, 144, 300, 480])
    ap.add_argument("--caps", type=lambda v: None if v == "none" else int(v), nargs="+", default=[None, 64],
                    help="max_baseline values to compare (none = every point); the first is the reference")
    args = ap.parse_args()
    if args.replay is not None:
        replay(args.replay, args.points, args.caps, args.reps)
        return
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
