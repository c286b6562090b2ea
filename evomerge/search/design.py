"""Shared skeleton of the model-based strategies (``bo``, ``map``): the warm start and a
Sobol design are asked first, then every batch comes from a model of the data so far.
State is numpy arrays only, so a strategy pickles into the run checkpoint."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.search.algorithms import Strategy


def require_continuous(space: Any, algorithm: str) -> None:
    """One-line ConfigError when the genome has a categorical method gene."""
    genes = space.genes_per_slot() if hasattr(space, "genes_per_slot") else []
    if "method" in genes:
        raise ConfigError(
            f"algorithm={algorithm} models continuous genes; genome methods {list(space.methods)} add a categorical method choice. "
            "Use a single-method genome: genome=blocks_ta, genome=modelwise_ta, genome=layerwise_ties or genome.methods=[ties]"
        )


def sobol_design(n: int, n_var: int, seed: int) -> np.ndarray:
    from scipy.stats import qmc

    if n <= 0:
        return np.zeros((0, n_var))
    with warnings.catch_warnings():  # a budget rarely allows a power of 2; the first n points still spread
        warnings.filterwarnings("ignore", message="The balance properties of Sobol")
        return qmc.Sobol(n_var, scramble=True, seed=seed).random(n)


class DesignThenModel(Strategy):
    """Subclasses set ``pop_size`` and implement ``_propose(q)``; ``F`` holds the losses told
    so far and ``S`` their standard errors (NaN where unknown)."""

    def _start(self, n_var: int, n_obj: int, seed: int, initial: np.ndarray | None, n_sobol: int) -> None:
        self.n_var, self.n_obj, self.seed = n_var, n_obj, int(seed)
        warm = np.zeros((0, n_var)) if initial is None or not len(initial) else np.asarray(initial, dtype=float)
        self.initial_used = len(warm)
        self.design = np.vstack([warm, sobol_design(max(n_sobol, 0), n_var, self.seed)])
        self.X = np.zeros((0, n_var))
        self.F = np.zeros((0, n_obj))
        self.S = np.zeros((0, n_obj))
        self.rounds = 0
        self.last_propose_s = 0.0

    def has_next(self) -> bool:
        return True

    def extend_budget(self, max_evals: int) -> None:
        """More budget on resume: the model rounds simply go on (anytime). Only ``map``'s design
        size was chosen from the first budget; the extended run keeps that design."""

    def ask(self) -> np.ndarray:
        if len(self.design):
            batch, self.design = self.design[: self.pop_size], self.design[self.pop_size :]
            return batch
        return self._propose(self.pop_size)

    def tell(self, X: np.ndarray, F: np.ndarray, S: np.ndarray | None = None) -> None:
        F = np.asarray(F, dtype=float)
        self.X = np.vstack([self.X, np.asarray(X, dtype=float)])
        self.F = np.vstack([self.F, F])
        self.S = np.vstack([self.S, np.full(F.shape, np.nan) if S is None else np.asarray(S, dtype=float)])

    def _propose(self, q: int) -> np.ndarray:
        raise NotImplementedError
