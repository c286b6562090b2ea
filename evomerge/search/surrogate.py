"""MAP-style search (``algorithm=map``): quadratic surrogates per objective + NSGA-III.

MAP (Li et al., ICLR 2025) fits one quadratic model per task over the merge coefficients
and reads the whole Pareto front off the surrogates. Here that is one round of a loop:
each round fits a weighted ridge quadratic per objective to every candidate told so far
(weights 1 / standard error^2: noisy scores pull less; the ridge strength chosen by
leave-one-out error, so fewer points than coefficients still give a usable model), runs
NSGA-III on the surrogates, and evaluates the ``pop_size`` points of the surrogate front
that add the most predicted hypervolume to the observed front. The first batches are the
warm start and a Sobol design of about one point per quadratic coefficient.

Pure numpy (pymoo for NSGA-III); the state is arrays only, so it pickles and a resumed
run proposes exactly what the uninterrupted one would.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.search.algorithms import Strategy
from evomerge.search.design import DesignThenModel, require_continuous, sobol_design
from evomerge.search.pareto import hypervolume, nondominated

RIDGE_GRID = tuple(10.0**e for e in range(-6, 3))
MIN_DISTANCE = 1e-3  # a proposal this close (max-norm) to an evaluated genome is not new


def quadratic_features(X: np.ndarray) -> np.ndarray:
    """[1, x_i, x_i * x_j (i <= j)] for every row of X."""
    X = np.atleast_2d(np.asarray(X, dtype=float))
    pairs = [X[:, i] * X[:, j] for i, j in itertools.combinations_with_replacement(range(X.shape[1]), 2)]
    return np.column_stack([np.ones(len(X)), X, *pairs])


def n_coefficients(n_var: int) -> int:
    return (n_var + 1) * (n_var + 2) // 2


def fit_ridge(Phi: np.ndarray, y: np.ndarray, weights: np.ndarray, grid: tuple[float, ...] = RIDGE_GRID) -> np.ndarray:
    """Weighted ridge regression (intercept not penalised), the strength with the least
    weighted leave-one-out error (closed form via the hat matrix)."""
    w = np.asarray(weights, dtype=float)
    w = w / w.mean()
    sw = np.sqrt(w)[:, None]
    A, b = Phi * sw, y * sw[:, 0]
    penalty = np.eye(Phi.shape[1])
    penalty[0, 0] = 0.0
    best: tuple[float, np.ndarray] = (np.inf, np.zeros(Phi.shape[1]))
    for lam in grid:
        M = A.T @ A + lam * penalty
        try:
            inv = np.linalg.inv(M)
        except np.linalg.LinAlgError:
            continue
        coef = inv @ A.T @ b
        hat = np.einsum("ij,jk,ik->i", A, inv, A)
        resid = (b - A @ coef) / np.maximum(1.0 - hat, 1e-6)
        loo = float(np.mean(resid**2))
        if loo < best[0]:
            best = (loo, coef)
    return best[1]


class QuadraticSurrogateStrategy(DesignThenModel):
    name = "map"

    def __init__(self, space: Any = None, pop_size: int = 8, n_init: int | None = None, nsga_pop: int = 100, nsga_gen: int = 100):
        if space is not None:
            require_continuous(space, self.name)
        self.pop_size, self.nsga_pop, self.nsga_gen = int(pop_size), int(nsga_pop), int(nsga_gen)
        self.n_init = None if n_init is None else int(n_init)
        if self.pop_size < 1 or self.nsga_pop < 4 or self.nsga_gen < 1:
            raise ConfigError("algorithm=map needs pop_size >= 1, nsga_pop >= 4 and nsga_gen >= 1")

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        warm = 0 if initial is None else len(initial)
        # about one point per coefficient, but never more than half the budget
        n_sobol = self.n_init if self.n_init is not None else max(self.pop_size, min(n_coefficients(n_var), max_evals // 2)) - warm
        self._start(n_var, n_obj, seed, initial, n_sobol)

    # ---- surrogate
    def coefficients(self) -> np.ndarray:
        """(n_obj x n_coef) ridge quadratics of the losses."""
        Phi = quadratic_features(self.X)
        out = []
        for j in range(self.n_obj):
            s = self.S[:, j]
            known = np.isfinite(s)
            var = np.where(known, s, np.nanmedian(s) if known.any() else 1.0) ** 2 if known.any() else np.ones(len(s))
            out.append(fit_ridge(Phi, self.F[:, j], 1.0 / np.maximum(var, 1e-4)))
        return np.array(out)

    def predict(self, X: np.ndarray, coef: np.ndarray) -> np.ndarray:
        return quadratic_features(X) @ coef.T

    def _propose(self, q: int) -> np.ndarray:
        started = time.perf_counter()
        self.rounds += 1
        round_seed = self.seed * 100_003 + self.rounds
        coef = self.coefficients()
        X_front, F_front = self._surrogate_front(coef, round_seed)
        chosen = self._pick(X_front, F_front, q, round_seed)
        self.last_propose_s = time.perf_counter() - started
        return chosen

    def _surrogate_front(self, coef: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        from pymoo.algorithms.moo.nsga3 import NSGA3
        from pymoo.core.problem import Problem
        from pymoo.optimize import minimize
        from pymoo.util.ref_dirs import get_reference_directions

        predict = self.predict

        class Surrogate(Problem):
            def _evaluate(self, x, out, *args, **kwargs):
                out["F"] = predict(x, coef)

        partitions = 12 if self.n_obj == 2 else (6 if self.n_obj == 3 else 3)
        ref_dirs = get_reference_directions("das-dennis", self.n_obj, n_partitions=partitions)
        algorithm = NSGA3(ref_dirs=ref_dirs, pop_size=max(self.nsga_pop, len(ref_dirs)))
        problem = Surrogate(n_var=self.n_var, n_obj=self.n_obj, xl=np.zeros(self.n_var), xu=np.ones(self.n_var))
        result = minimize(problem, algorithm, ("n_gen", self.nsga_gen), seed=seed % (2**31), verbose=False)
        X = np.atleast_2d(result.X) if result.X is not None else np.zeros((0, self.n_var))
        X = np.vstack([X, np.atleast_2d(result.pop.get("X"))])  # the last population too: more to choose from
        return X, predict(X, coef)

    def _pick(self, X: np.ndarray, F: np.ndarray, q: int, seed: int) -> np.ndarray:
        """Greedy: the candidate adding the most predicted hypervolume to the observed front
        (plus the ones already picked); then the farthest from everything picked."""
        ok = [r for r in self.F if np.all(np.isfinite(r))]
        observed = np.array(ok) if ok else np.zeros((0, self.n_obj))
        ref = np.ones(self.n_obj)
        current = observed[nondominated(observed)] if len(observed) else observed
        picked: list[int] = []
        taken = list(self.X)
        candidates = [i for i in range(len(X)) if _far_from(X[i], taken)]
        while len(picked) < q and candidates:
            base = hypervolume(np.vstack([current, F[picked]]) if picked else current, ref)
            gains = [hypervolume(np.vstack([current, F[picked], F[i][None]]), ref) - base for i in candidates]
            i = candidates[int(np.argmax(gains))]
            if max(gains) <= 1e-12:
                break
            picked.append(i)
            taken.append(X[i])
            candidates = [c for c in candidates if c != i and _far_from(X[c], taken)]
        rng = np.random.default_rng(seed % (2**32))
        while len(picked) < q and candidates:  # no more predicted gain: spread along the surrogate front
            dist = [min(np.abs(F[c] - F[p]).max() for p in picked) if picked else rng.random() for c in candidates]
            i = candidates[int(np.argmax(dist))]
            picked.append(i)
            taken.append(X[i])
            candidates = [c for c in candidates if c != i and _far_from(X[c], taken)]
        out = X[picked] if picked else np.zeros((0, self.n_var))
        if len(out) < q:  # the surrogate front collapsed onto evaluated points: explore
            out = np.vstack([out, sobol_design(q - len(out), self.n_var, seed)])
        return np.clip(out, 0.0, 1.0)


def _far_from(x: np.ndarray, others: list[np.ndarray]) -> bool:
    return all(np.abs(x - o).max() > MIN_DISTANCE for o in others)


def map_search(space=None, pop_size: int = 8, n_init: int | None = None, nsga_pop: int = 100, nsga_gen: int = 100) -> Strategy:
    """Hydra target of ``configs/algorithm/map.yaml``."""
    return QuadraticSurrogateStrategy(space, pop_size, n_init, nsga_pop, nsga_gen)
