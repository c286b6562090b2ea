"""Search strategies behind one ask-and-tell interface.

Every Hydra ``algorithm`` config targets one of the factories below (``_partial_``);
the search loop calls it with the problem size once known. Strategies hold no model
objects, so the whole strategy (pymoo algorithm state and RNG included) pickles into
the run checkpoint.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import numpy as np

from evomerge.errors import ConfigError


UNLIMITED_EVALS = 10**12


def _population_size(algorithm: Any) -> int:
    return int(getattr(algorithm, "pop_size", None) or getattr(getattr(algorithm, "es", None), "popsize", 0) or 10**9)


class Strategy:
    """ask() -> X in [0,1]^(P x n_var); tell(X, F, S) with F to minimise (P x n_obj) and
    S the standard error of each loss (P x n_obj; NaN where the fitness gave none): a
    model-based strategy uses it as observation noise, the others ignore it. The loop, not
    the strategy, counts the evaluation budget; a strategy stops by ``has_next()``.

    A strategy with ``supports_async`` also serves the steady-state loop (``executor.mode=
    async``): ``ask_one()`` -> one genome (the budget it stands for is spent when asked),
    ``tell_one(x, f, s)`` in completion order. Only strategies whose next candidate never
    waits on earlier results declare it (see ``require_async``)."""

    name = "strategy"
    multi_objective = True
    supports_async = False
    pop_size = 16  # in async mode: the block of completions reported as one "generation"
    initial_used = 0  # how many of the warm-start genomes given to setup() it will ask

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        """``initial``: genomes to put in the first population (e.g. the experts)."""
        raise NotImplementedError

    def has_next(self) -> bool:
        raise NotImplementedError

    def lost_state(self) -> str | None:
        """Why this strategy, unpickled from a checkpoint, cannot continue exactly (the loop
        then replays the search from the archive), or None."""
        return None

    def ask(self) -> np.ndarray:
        raise NotImplementedError

    def tell(self, X: np.ndarray, F: np.ndarray, S: np.ndarray | None = None) -> None:
        raise NotImplementedError

    def ask_one(self) -> np.ndarray:
        raise NotImplementedError

    def tell_one(self, x: np.ndarray, f: np.ndarray, s: np.ndarray | None = None) -> None:
        """Candidates are independent of results: nothing to learn."""


# Why the pymoo algorithms are generational only: their survival (non-dominated sorting,
# crowding, reference directions, CMA-ES's covariance update, DE's one-to-one replacement)
# is defined over a whole offspring population; telling them one individual at a time
# would be a different algorithm (a steady-state variant pymoo does not provide), not the
# one configured. Random, Sobol, grid and hand-made points never depend on results: their ask
# order is the same in both modes, so the same seed gives the same candidates; bo proposes
# with the running candidates as pending points.


def async_algorithms() -> list[str]:
    """Names of the strategies that serve the steady-state loop, from the strategy classes
    themselves (so a new one is listed without editing this)."""
    import evomerge.search.bayes  # noqa: F401 -- defines its strategy classes

    names, todo = set(), [Strategy]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if getattr(sub, "supports_async", False):
                names.add(sub.name)
    return sorted(names)


def require_async(strategy: Strategy) -> None:
    """One-line ConfigError unless ``strategy`` can run in the steady-state loop."""
    if not getattr(strategy, "supports_async", False):
        raise ConfigError(
            f"executor.mode=async: algorithm {strategy.name} is generational only (its selection needs whole generations); "
            f"use executor.mode=generational, or an algorithm that supports async: {', '.join(async_algorithms())}"
        )


def scalarize(F: np.ndarray, weights: Sequence[float] | None) -> np.ndarray:
    """Weighted mean of the objectives, for single-objective algorithms."""
    w = np.ones(F.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (F.shape[1],):
        raise ConfigError(f"algorithm.objective_weights needs {F.shape[1]} values, got {list(w)}")
    return (F @ w / w.sum())[:, None]


def _sampling_base():
    from pymoo.core.sampling import Sampling

    return Sampling


class SeededSampling(_sampling_base()):  # type: ignore[misc]
    """pymoo sampling: the given genomes first, uniform random ones for the rest."""

    def __init__(self, seeds: np.ndarray):
        super().__init__()
        self.seeds = seeds

    def _do(self, problem, n_samples, *args, random_state=None, **kwargs):
        seeds = self.seeds[:n_samples]
        rest = random_state.random((n_samples - len(seeds), problem.n_var))
        return np.vstack([seeds, rest])


class PymooStrategy(Strategy):
    """Adapts a pymoo algorithm (built by ``build(n_obj, n_var)``) to ask-and-tell."""

    def __init__(self, name: str, build: Callable[[int, int], Any], multi_objective: bool, objective_weights=None, mixed_space=None):
        self.name = name
        self._build = build
        self.multi_objective = multi_objective
        self.objective_weights = objective_weights
        self.mixed_space = mixed_space  # a GenomeSpace, for MixedVariableGA
        self.algorithm: Any = None
        self._pop: Any = None

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        from pymoo.core.problem import Problem

        n_eff = n_obj if self.multi_objective else 1
        if self.mixed_space is not None:
            problem = Problem(vars=self.mixed_space.mixed_variables(), n_obj=n_eff)
        else:
            problem = Problem(n_var=n_var, n_obj=n_eff, xl=np.zeros(n_var), xu=np.ones(n_var))
        self.problem = problem
        self.algorithm = self._build(n_eff, n_var)
        init = getattr(self.algorithm, "initialization", None)
        if initial is not None and len(initial) and self.mixed_space is None and init is not None:
            init.sampling = SeededSampling(np.asarray(initial, dtype=float))
        # the loop counts the budget (repeats served from the archive are free), so pymoo's own
        # termination never cuts a search short; algorithms that converge stop by themselves
        self.algorithm.setup(problem, termination=("n_eval", UNLIMITED_EVALS), seed=seed, verbose=False)
        self.initial_used = 0 if initial is None or init is None or self.mixed_space is not None else min(len(initial), _population_size(self.algorithm))

    def has_next(self) -> bool:
        return bool(self.algorithm.has_next())

    def lost_state(self) -> str | None:
        from evomerge.search.cmaes import lost_state

        return lost_state(self.algorithm)

    def ask(self) -> np.ndarray:
        self._pop = self.algorithm.ask()
        X = self._pop.get("X")
        if self.mixed_space is not None:
            return np.stack([self.mixed_space.from_mixed(x) for x in X])
        return np.asarray(X, dtype=float)

    def tell(self, X: np.ndarray, F: np.ndarray, S: np.ndarray | None = None) -> None:
        from pymoo.problems.static import StaticProblem

        F_eff = F if self.multi_objective else scalarize(F, self.objective_weights)
        self.algorithm.evaluator.eval(StaticProblem(self.problem, F=F_eff), self._pop)
        self.algorithm.tell(infills=self._pop)
        self._pop = None


class RandomStrategy(Strategy):
    """Uniform random genomes: the baseline every algorithm must beat."""

    name = "random"
    supports_async = True

    def __init__(self, pop_size: int = 16):
        self.pop_size = int(pop_size)

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        self.n_var, self.left = n_var, max_evals  # left: batch sizes only (the loop counts the budget)
        self.rng = np.random.default_rng(seed)
        self.initial = np.zeros((0, n_var)) if initial is None else np.asarray(initial, dtype=float)
        self.initial_used = len(self.initial)

    def has_next(self) -> bool:
        return True

    def ask(self) -> np.ndarray:
        size = self.pop_size
        seeds, self.initial = self.initial[:size], self.initial[size:]
        return np.vstack([seeds, self.rng.random((size - len(seeds), self.n_var))])

    def tell(self, X: np.ndarray, F: np.ndarray, S: np.ndarray | None = None) -> None:
        self.left -= len(X)

    def ask_one(self) -> np.ndarray:
        # the same stream as ask(): seeds first, then rows of the same generator
        if len(self.initial):
            x, self.initial = self.initial[0], self.initial[1:]
            return x
        return self.rng.random(self.n_var)


class SobolStrategy(RandomStrategy):
    """A scrambled Sobol sequence over the unit cube: space-filling like a grid, but spends any
    budget (a full grid has points_per_axis ** genes points) and no warm start is needed."""

    name = "sobol"

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        super().setup(n_var, n_obj, max_evals, seed, initial)
        self.seed, self.drawn = int(seed), 0  # the sampler is rebuilt from these (checkpoints hold plain numbers)

    def _next(self, n: int) -> np.ndarray:
        from scipy.stats import qmc

        sampler = qmc.Sobol(self.n_var, scramble=True, seed=self.seed)
        if self.drawn:
            sampler.fast_forward(self.drawn)
        self.drawn += n
        return sampler.random(n)

    def ask(self) -> np.ndarray:
        seeds, self.initial = self.initial[: self.pop_size], self.initial[self.pop_size :]
        return np.vstack([seeds, self._next(self.pop_size - len(seeds))]) if len(seeds) < self.pop_size else seeds

    def ask_one(self) -> np.ndarray:
        if len(self.initial):
            x, self.initial = self.initial[0], self.initial[1:]
            return x
        return self._next(1)[0]


class GridStrategy(Strategy):
    """A full grid over the unit cube with as many points per axis as the budget allows
    (use with a small genome, e.g. model-wise task-arithmetic weights)."""

    name = "grid"
    supports_async = True

    def __init__(self, pop_size: int = 16, points_per_axis: int | None = None):
        self.pop_size = int(pop_size)
        self.points_per_axis = points_per_axis

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        p = self.points_per_axis or max(2, int(math.floor(max_evals ** (1.0 / n_var) + 1e-9)))
        if p**n_var > max_evals and self.points_per_axis is None:
            raise ConfigError(f"a grid over {n_var} genes needs at least {2**n_var} evaluations; raise search.max_evals or use a smaller genome")
        axis = np.linspace(0.0, 1.0, p)
        self.points = np.array(list(itertools.product(axis, repeat=n_var)))[:max_evals]
        self.next = 0

    def has_next(self) -> bool:
        return self.next < len(self.points)

    def ask(self) -> np.ndarray:
        batch = self.points[self.next : self.next + self.pop_size]
        return batch

    def tell(self, X: np.ndarray, F: np.ndarray, S: np.ndarray | None = None) -> None:
        self.next += len(X)

    def ask_one(self) -> np.ndarray:
        self.next += 1
        return self.points[self.next - 1]


# ---------------------------------------------------------------- factories (Hydra targets)


def nsga2(pop_size: int = 16) -> Strategy:
    from pymoo.algorithms.moo.nsga2 import NSGA2

    return PymooStrategy("nsga2", lambda n_obj, n_var: NSGA2(pop_size=pop_size), True)


def nsga3(pop_size: int = 16, n_partitions: int = 6) -> Strategy:
    from pymoo.algorithms.moo.nsga3 import NSGA3
    from pymoo.util.ref_dirs import get_reference_directions

    def build(n_obj: int, n_var: int):
        ref_dirs = get_reference_directions("das-dennis", n_obj, n_partitions=n_partitions)
        return NSGA3(ref_dirs=ref_dirs, pop_size=max(pop_size, len(ref_dirs)))

    return PymooStrategy("nsga3", build, True)


def smsemoa(pop_size: int = 16) -> Strategy:
    from pymoo.algorithms.moo.sms import SMSEMOA

    return PymooStrategy("smsemoa", lambda n_obj, n_var: SMSEMOA(pop_size=pop_size), True)


def agemoea(pop_size: int = 16) -> Strategy:
    from pymoo.algorithms.moo.age import AGEMOEA

    return PymooStrategy("agemoea", lambda n_obj, n_var: AGEMOEA(pop_size=pop_size), True)


def ga(pop_size: int = 16, objective_weights: Sequence[float] | None = None) -> Strategy:
    from pymoo.algorithms.soo.nonconvex.ga import GA

    return PymooStrategy("ga", lambda n_obj, n_var: GA(pop_size=pop_size, eliminate_duplicates=True), False, objective_weights)


def de(pop_size: int = 16, objective_weights: Sequence[float] | None = None) -> Strategy:
    from pymoo.algorithms.soo.nonconvex.de import DE

    return PymooStrategy("de", lambda n_obj, n_var: DE(pop_size=pop_size), False, objective_weights)


def cmaes(sigma: float = 1 / 6, pop_size: int | None = None, objective_weights: Sequence[float] | None = None) -> Strategy:
    from evomerge.search.cmaes import ResumableCMAES

    def build(n_obj: int, n_var: int):
        return ResumableCMAES(x0=np.full(n_var, 0.5), sigma=sigma, popsize=pop_size, restarts=0)

    return PymooStrategy("cmaes", build, False, objective_weights)


def mixed_ga(space, pop_size: int = 16) -> Strategy:
    """pymoo's MixedVariableGA (method genes as true categorical variables), multi-objective."""
    from pymoo.core.mixed import MixedVariableGA
    from pymoo.algorithms.moo.nsga2 import RankAndCrowding

    return PymooStrategy("mixed_ga", lambda n_obj, n_var: MixedVariableGA(pop_size=pop_size, survival=RankAndCrowding()), True, mixed_space=space)


def random_search(pop_size: int = 16) -> Strategy:
    return RandomStrategy(pop_size)


def sobol(pop_size: int = 16) -> Strategy:
    return SobolStrategy(pop_size)


def grid(pop_size: int = 16, points_per_axis: int | None = None) -> Strategy:
    return GridStrategy(pop_size, points_per_axis)


class HandMadeStrategy(Strategy):
    """Evaluates named hand-made merges of the genome (``GenomeSpace.hand_made_genomes``)
    and nothing else: the "what a user would do by hand" baselines of the benchmark."""

    name = "hand_made"
    supports_async = True

    def __init__(self, space, points: Sequence[str], pop_size: int = 16):
        self.pop_size = int(pop_size)
        available = space.hand_made_genomes()
        missing = [p for p in points if p not in available]
        if missing or not points:
            raise ConfigError(
                f"algorithm.points: {missing[0] if missing else 'none given'!r} is not a hand-made merge this genome can express; "
                f"available: {', '.join(available)}"
            )
        self.points = np.array([available[p] for p in points])

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        self.points = self.points[:max_evals]
        self.next = 0

    def has_next(self) -> bool:
        return self.next < len(self.points)

    def ask(self) -> np.ndarray:
        return self.points[self.next : self.next + self.pop_size]

    def tell(self, X: np.ndarray, F: np.ndarray, S: np.ndarray | None = None) -> None:
        self.next += len(X)

    def ask_one(self) -> np.ndarray:
        self.next += 1
        return self.points[self.next - 1]


def hand_made(space, points: Sequence[str] = ("ties:default",), pop_size: int = 16) -> Strategy:
    return HandMadeStrategy(space, list(points), pop_size)
