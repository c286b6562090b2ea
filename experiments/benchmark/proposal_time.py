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
run's budget grows, and what ``algorithm.max_baseline`` saves; ``--ehvi`` adds ``acquisition=ehvi``.

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


def replay(run_dir: Path, points: list[int], caps: list[int | None], reps: int, ehvi: bool = False) -> None:
    """One round of q candidates at each size, per cap (and with ``acquisition=ehvi``), interleaved;
    prints the ratio to the first cap. An ehvi round's median is a round between refits (its
    hyperparameter fit is memoised after the first repetition); its max includes the fit."""
    from evomerge.search import ehvi as ehvi_module

    strategy, X, F, S = told_data(run_dir)
    strategy._proposal(strategy.pop_size, X[:16], F[:16], S[:16], None, 0)  # noqa: SLF001 -- imports and first-call costs, untimed
    configured = strategy.acquisition
    variants = [str(cap) for cap in caps] + (["ehvi"] if ehvi else [])
    for n in points:
        if n > len(X):
            print(json.dumps({"points": n, "skipped": f"the run told {len(X)} points"}))
            continue
        ehvi_module._FITS.clear()  # noqa: SLF001 -- the first ehvi repetition fits, as a round at a ladder step does
        times: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(reps):
            for variant in variants:  # interleaved: a busy machine slows every variant alike
                if variant == "ehvi":
                    strategy.acquisition = "ehvi"
                else:
                    strategy.acquisition, strategy.max_baseline = configured, None if variant == "None" else int(variant)
                started = time.perf_counter()
                strategy._proposal(strategy.pop_size, X[:n], F[:n], S[:n], None, 1_000 + rep)  # noqa: SLF001
                times[variant].append(time.perf_counter() - started)
        base = statistics.median(times[variants[0]])
        row: dict[str, Any] = {"points": n, "q": strategy.pop_size}
        row.update({f"max_baseline={v}": round(statistics.median(times[v]), 2) for v in variants if v != "ehvi"})
        if ehvi:
            row.update({"ehvi": round(statistics.median(times["ehvi"]), 3), "ehvi with its fit": round(max(times["ehvi"]), 2)})
        row.update({f"ratio {variants[0]}/{v}": round(base / statistics.median(times[v]), 2) for v in variants[1:]})
        print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--replay", type=Path, help="a finished algorithm=bo run directory: time rounds on its own data")
    ap.add_argument("--points", type=int, nargs="+", default=[64, 144, 300, 480])
    ap.add_argument("--caps", type=lambda v: None if v == "none" else int(v), nargs="+", default=[None, 64],
                    help="max_baseline values to compare (none = every point); the first is the reference")
    ap.add_argument("--ehvi", action="store_true", help="also time acquisition=ehvi rounds on the same data")
    args = ap.parse_args()
    if args.replay is not None:
        replay(args.replay, args.points, args.caps, args.reps, args.ehvi)
        return
    makers = {
        "bo qlognehvi": lambda q: BayesStrategy(pop_size=q, n_init=1),
        "bo qlognparego": lambda q: BayesStrategy(pop_size=q, n_init=1, acquisition="qlognparego"),
        "bo ehvi": lambda q: BayesStrategy(pop_size=q, n_init=1, acquisition="ehvi"),
        "map": lambda q: QuadraticSurrogateStrategy(pop_size=q),
    }
    for n_var, n_points, q in CASES:
        for name, make in makers.items():
            times = time_strategy(make, n_var, n_points, q, args.reps)
            print(json.dumps({"algorithm": name, "genes": n_var, "points": n_points, "q": q,
                              "median_s": round(statistics.median(times), 3), "max_s": round(max(times), 3)}), flush=True)


if __name__ == "__main__":
    main()
