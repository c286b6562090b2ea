"""Multi-objective Bayesian optimisation (``algorithm=bo``), on BoTorch.

One Gaussian process per objective over the genome in [0, 1]^n, fitted to every candidate
told so far; each objective's recorded standard error is that point's observation noise
(heteroscedastic: a candidate the multi-fidelity estimator promoted to more items is
trusted more). The next batch of ``pop_size`` candidates maximises q(Log)NEHVI -- the
expected gain in hypervolume over the noisy front -- or qLogNParEGO (random Chebyshev
scalarisations), chosen sequentially so a batch spreads out. The first batches are the
warm start (hand-made merges) and a scrambled Sobol design.

The strategy keeps only numpy arrays between rounds (no model objects): it pickles into
the run checkpoint, and every round refits from its data with a seed of its own, so a
resumed run proposes exactly what the uninterrupted one would. ``ask_one`` serves the
steady-state loop (``executor.mode=async``): candidates still running are ``X_pending``.

Overlap (``overlap: true``; off by default, see docs/algorithms.md): the model round that follows a batch is fixed when
that batch is asked -- the data told so far, with the batch itself as pending points -- and
computed in a worker process while the batch is scored (``evomerge/search/proposals.py``).
The round is a pure function of that data, the batch and the round's seed, so a resumed run
(which recomputes it in process) proposes exactly what the worker would have; the worker
only changes when it is ready.

Method genes are categorical; the surrogate assumes continuous genes, so genomes with a
method choice are refused (use one method per genome, e.g. ``genome=blocks_ta``).
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import numpy as np

from evomerge.errors import ConfigError
from evomerge.search import ehvi, proposals
from evomerge.search.algorithms import Strategy
from evomerge.search.design import DesignThenModel, require_continuous, sobol_design
from evomerge.search.proposals import NextRound

ACQUISITIONS = ("qlognehvi", "qlognparego", "ehvi", "ehvi_update")
NOISE_FLOOR = 1e-6  # variance: a score with SE 0 (every item agrees) is still not exact


def noise_variances(S: np.ndarray) -> np.ndarray | None:
    """Per-point observation variances from standard errors (NaN = unknown: the median of
    the known ones); None when no point has one (the GP then infers a common noise)."""
    S = np.asarray(S, dtype=float)
    known = np.isfinite(S)
    if not known.any():
        return None
    var = np.where(known, S, np.nanmedian(np.where(known, S, np.nan))) ** 2
    return np.maximum(var, NOISE_FLOOR)


PRUNE_SAMPLES = 256


def baseline_fraction(n_told: int, max_baseline: int | None) -> float:
    """BoTorch's ``max_frac`` that keeps at most ``max_baseline`` of ``n_told`` points (it keeps
    ``ceil(max_frac * n)``; the half keeps float rounding from adding one); 1 = every point.
    On noisy scores most told points are non-dominated in some posterior sample, so without a
    cap the noisy-front integral, and a round's cost, grows with the budget."""
    if max_baseline is None or n_told <= max_baseline:
        return 1.0
    return (max_baseline - 0.5) / n_told


class BayesStrategy(DesignThenModel):
    name = "bo"
    supports_async = True

    def __init__(
        self,
        space: Any = None,
        pop_size: int = 8,
        n_init: int = 8,
        acquisition: str = "qlognehvi",
        ref_point: list[float] | None = None,
        num_restarts: int = 2,
        raw_samples: int = 128,
        mc_samples: int = 32,
        maxiter: int = 50,
        partitioning_alpha: float | None = None,
        overlap: bool = False,
        ftol: float = 0.0,
        max_baseline: int | None = None,
    ):
        if acquisition not in ACQUISITIONS:
            raise ConfigError(f"algorithm.acquisition must be one of {', '.join(ACQUISITIONS)}, got {acquisition!r}")
        if space is not None:
            require_continuous(space, self.name)
        self.pop_size = int(pop_size)
        self.n_init = int(n_init)
        self.acquisition = acquisition
        self.ref_point = ref_point
        self.num_restarts, self.raw_samples, self.mc_samples, self.maxiter = int(num_restarts), int(raw_samples), int(mc_samples), int(maxiter)
        for key, value in (("pop_size", self.pop_size), ("num_restarts", self.num_restarts), ("raw_samples", self.raw_samples), ("mc_samples", self.mc_samples)):
            if value < 1:
                raise ConfigError(f"algorithm.{key} must be at least 1, got {value}")
        if partitioning_alpha is not None and not 0.0 <= float(partitioning_alpha) < 1.0:
            raise ConfigError(f"algorithm.partitioning_alpha must be in [0, 1) or null, got {partitioning_alpha}")
        self.partitioning_alpha = None if partitioning_alpha is None else float(partitioning_alpha)
        self.overlap = bool(overlap)
        if not 0.0 <= float(ftol) < 1.0:
            raise ConfigError(f"algorithm.ftol must be in [0, 1), got {ftol}")
        self.ftol = float(ftol)
        if max_baseline is not None and int(max_baseline) < 1:
            raise ConfigError(f"algorithm.max_baseline must be at least 1 or null, got {max_baseline}")
        self.max_baseline = None if max_baseline is None else int(max_baseline)

    def setup(self, n_var: int, n_obj: int, max_evals: int, seed: int, initial: np.ndarray | None = None) -> None:
        self._start(n_var, n_obj, seed, initial, self.n_init)
        self.pending: list[np.ndarray] = []
        self.next_round: NextRound | None = None

    # ---- generational, overlapped with scoring
    def ask(self) -> np.ndarray:
        if not getattr(self, "overlap", False):  # checkpoints of earlier versions have no overlap
            return super().ask()
        if getattr(self, "next_round", None) is not None:
            batch = self._collect(self.next_round)
        elif len(self.design):
            batch, self.design = self.design[: self.pop_size], self.design[self.pop_size :]
        else:  # no design at all: the first model round sees everything told
            batch = self._propose(self.pop_size)
        self.next_round = None
        if len(self.design):
            proposals.warm_up()  # the worker imports torch and BoTorch while the design is scored
        else:  # the next batch comes from the model: fix it now, start it in the background
            self.rounds += 1
            self.next_round = NextRound(n_told=len(self.X), pending=np.array(batch, dtype=float), round_no=self.rounds)
            proposals.start(self, self.next_round)
        return batch

    def _collect(self, spec: NextRound) -> np.ndarray:
        """The round ``spec`` fixed: from the worker when it computed it, else computed here
        (a resumed run, a worker that failed): the same numbers either way."""
        result = proposals.collect(spec)
        if result is None:
            result = self.compute_round(spec)
        candidates, self.last_propose_s = result
        return candidates

    def compute_round(self, spec: NextRound) -> tuple[np.ndarray, float]:
        """(candidates, seconds) of one fixed model round; pure: what the worker runs."""
        started = time.perf_counter()
        n = spec.n_told
        candidates = self._proposal(self.pop_size, self.X[:n], self.F[:n], self.S[:n], spec.pending, self._round_seed(spec.round_no))
        return candidates, time.perf_counter() - started

    # ---- steady state
    def ask_one(self) -> np.ndarray:
        if len(self.design):
            x, self.design = self.design[0], self.design[1:]
        else:
            x = self._propose(1, pending=np.array(self.pending) if self.pending else None)[0]
        self.pending.append(np.asarray(x, dtype=float))
        return x

    def tell_one(self, x: np.ndarray, f: np.ndarray, s: np.ndarray | None = None) -> None:
        x = np.asarray(x, dtype=float)
        for i, p in enumerate(self.pending):
            if np.allclose(p, x, atol=1e-12):
                del self.pending[i]
                break
        self.tell(x[None], np.asarray(f, dtype=float)[None], None if s is None else np.asarray(s, dtype=float)[None])

    # ---- the model
    def _fit(self, X_told: np.ndarray | None = None, F_told: np.ndarray | None = None, S_told: np.ndarray | None = None):
        import torch
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms.outcome import Standardize
        from gpytorch.mlls import ExactMarginalLogLikelihood

        # one GP per objective, batched: every objective is observed at the same points, so
        # one multi-output SingleTaskGP (independent GPs, own hyperparameters) does in one
        # posterior call what a ModelListGP does in one per objective
        X_told = self.X if X_told is None else X_told
        F_told = self.F if F_told is None else F_told
        S_told = self.S if S_told is None else S_told
        X = torch.as_tensor(X_told, dtype=torch.double)
        y = torch.as_tensor(1.0 - F_told, dtype=torch.double)  # scores: maximised
        var = [noise_variances(S_told[:, j]) for j in range(self.n_obj)]
        if any(v is None for v in var):  # an objective without standard errors: noise inferred
            yvar = None
        else:
            yvar = torch.as_tensor(np.stack(var, axis=1), dtype=torch.double)
        model = SingleTaskGP(X, y, train_Yvar=yvar, outcome_transform=Standardize(m=self.n_obj))
        mll = ExactMarginalLogLikelihood(model.likelihood, model)
        try:
            fit_gpytorch_mll(mll)
        except Exception:  # noqa: BLE001 -- a failed hyperparameter fit keeps the priors' values
            pass
        return model

    def _round_seed(self, round_no: int) -> int:
        return self.seed * 100_003 + round_no

    def _propose(self, q: int, pending: np.ndarray | None = None) -> np.ndarray:
        """``q`` new genomes from the acquisition over everything told (the next round)."""
        started = time.perf_counter()
        self.rounds += 1
        candidates = self._proposal(q, self.X, self.F, self.S, pending, self._round_seed(self.rounds))
        self.last_propose_s = time.perf_counter() - started
        return candidates

    def _proposal(self, q: int, X: np.ndarray, F: np.ndarray, S: np.ndarray, pending: np.ndarray | None, round_seed: int) -> np.ndarray:
        """``q`` genomes maximising the acquisition given the data ``X, F, S`` and the
        ``pending`` points; a pure function of its arguments (Sobol points while the data
        cannot support a model: fewer than two distinct points)."""
        import torch

        if len(np.unique(np.round(X, 9), axis=0)) < 2:
            return sobol_design(q, self.n_var, round_seed)
        with _torch_seed(round_seed), _one_thread(), _quiet_numerics():
            X_pending = None if pending is None or not len(pending) else torch.as_tensor(np.asarray(pending), dtype=torch.double)
            if self.acquisition in ("ehvi", "ehvi_update"):
                return np.clip(self._ehvi(q, X, F, S, X_pending, round_seed).numpy().astype(float), 0.0, 1.0)
            model = self._fit(X, F, S)
            bounds = torch.stack([torch.zeros(self.n_var, dtype=torch.double), torch.ones(self.n_var, dtype=torch.double)])
            if self.acquisition == "qlognehvi":
                candidates = self._nehvi(model, bounds, q, X_pending, X)
            else:
                candidates = self._parego(model, bounds, q, X_pending, X)
        return np.clip(candidates.detach().cpu().numpy().astype(float), 0.0, 1.0)

    def _ref(self):
        import torch

        ref = [0.0] * self.n_obj if self.ref_point is None else [float(v) for v in self.ref_point]
        if len(ref) != self.n_obj:
            raise ConfigError(f"algorithm.ref_point needs {self.n_obj} scores, got {ref}")
        return torch.tensor(ref, dtype=torch.double)

    def _alpha(self) -> float:
        """Approximation of the front's box decomposition: exact (0) up to 4 objectives, as
        BoTorch advises; from 5 on the exact one grows combinatorially (a 60-point round of
        5 objectives took 100 s exact), so BoTorch's default approximation level applies."""
        from botorch.acquisition.multi_objective.utils import get_default_partitioning_alpha

        if self.partitioning_alpha is not None:
            return self.partitioning_alpha
        with warnings.catch_warnings():  # its note that EHVI suits fewer than 7 objectives: in the docs
            warnings.simplefilter("ignore")
            return float(get_default_partitioning_alpha(self.n_obj))

    def _sampler(self):
        import torch
        from botorch.sampling.normal import SobolQMCNormalSampler

        return SobolQMCNormalSampler(sample_shape=torch.Size([self.mc_samples]))

    def _optimize(self, acq, bounds, q: int):
        from botorch.optim import optimize_acqf

        # the raw samples in one batch (init_batch_limit): one forward pass instead of
        # raw_samples / 8, the same initial points (a third fewer acquisition calls per round).
        # ftol: L-BFGS stops when the log-acquisition improves by less than this (relative);
        # 0 keeps scipy's default (2e-9): 1e-6 halves a round's calls but cost test HV at toy 48
        options: dict[str, Any] = {"batch_limit": 8, "init_batch_limit": self.raw_samples, "maxiter": self.maxiter}
        if getattr(self, "ftol", None):  # 0, and checkpoints of earlier versions: scipy's default
            options.update(ftol=self.ftol, factr=None)
        candidates, _ = optimize_acqf(
            acq, bounds=bounds, q=q, num_restarts=self.num_restarts, raw_samples=self.raw_samples, sequential=True, options=options,
        )
        return candidates

    def _nehvi(self, model, bounds, q: int, X_pending, X_told: np.ndarray):
        import torch
        from botorch.acquisition.multi_objective import logei
        from botorch.acquisition.multi_objective.logei import qLogNoisyExpectedHypervolumeImprovement
        from botorch.acquisition.multi_objective.utils import prune_inferior_points_multi_objective

        # BoTorch would JIT-compile a C++ kernel (-march=native) on first use: minutes on a
        # fresh machine, and machine-dependent rounding; the pure-torch path is the same maths
        logei._load_attempted = True

        # baseline pruned as prune_baseline=True would, from 256 posterior samples instead of
        # 2048: its pairwise dominance check is a third of a second at 100 points otherwise
        baseline = prune_inferior_points_multi_objective(
            model, torch.as_tensor(X_told, dtype=torch.double), self._ref(), num_samples=PRUNE_SAMPLES,
            max_frac=baseline_fraction(len(X_told), getattr(self, "max_baseline", None)),
        )
        acq = qLogNoisyExpectedHypervolumeImprovement(
            model=model, ref_point=self._ref(), X_baseline=baseline,
            sampler=self._sampler(), prune_baseline=False, X_pending=X_pending, alpha=self._alpha(),
        )
        return self._optimize(acq, bounds, q)

    def _ehvi(self, q: int, X: np.ndarray, F: np.ndarray, S: np.ndarray, X_pending, round_seed: int):
        """Analytic EHVI on the lean posterior (``evomerge/search/ehvi.py``): hyperparameters
        fitted on the ladder's first points (seeded by their number: a pure function of the
        data, whichever round fits them first), the posterior conditioned on every told point."""
        import torch

        n_fit = ehvi.fit_size(len(X))

        def fit(Xf, Ff, Sf):
            with _torch_seed(n_fit):
                return self._fit(Xf, Ff, Sf)

        model = ehvi.fitted_model(fit, X[:n_fit], F[:n_fit], S[:n_fit])
        Y = torch.as_tensor(1.0 - F, dtype=torch.double)
        var = [noise_variances(S[:, j]) for j in range(self.n_obj)]
        if any(v is None for v in var):  # noise inferred by the fit (one level per objective)
            level = model.likelihood.noise.detach().reshape(self.n_obj, -1)[:, 0] * model.outcome_transform.stdvs.reshape(-1) ** 2
            noise = level.expand(len(X), self.n_obj).clone()
        else:
            noise = torch.as_tensor(np.stack(var, axis=1), dtype=torch.double)
        with torch.no_grad():
            return ehvi.propose(model, torch.as_tensor(X, dtype=torch.double), Y, noise, q, self._ref(), round_seed, X_pending, self._alpha(),
                                mean_update=self.acquisition == "ehvi_update")

    def _parego(self, model, bounds, q: int, X_pending, X_told: np.ndarray):
        import torch
        from botorch.acquisition.multi_objective.parego import qLogNParEGO

        chosen = []
        for _ in range(q):  # one random scalarisation per candidate; earlier ones are pending
            pending = torch.cat([t for t in (X_pending, *chosen) if t is not None]) if (X_pending is not None or chosen) else None
            acq = qLogNParEGO(model=model, X_baseline=torch.as_tensor(X_told, dtype=torch.double), sampler=self._sampler(), X_pending=pending)
            chosen.append(self._optimize(acq, bounds, 1))
        return torch.cat(chosen)


class _one_thread:
    """Small GPs gain nothing from intra-op threads and lose a lot on a busy machine."""

    def __enter__(self):
        import torch

        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.threads)
        return False


class _quiet_numerics(warnings.catch_warnings):
    """BoTorch's numerical notes (jitter added to a covariance, an L-BFGS restart) are routine on
    small noisy data and already handled by retrying; on a user's console they read as faults."""

    def __enter__(self):
        from botorch.exceptions.warnings import BadInitialCandidatesWarning, InputDataWarning, NumericsWarning, OptimizationWarning
        from linear_operator.utils.warnings import NumericalWarning

        out = super().__enter__()
        # InputDataWarning: an objective that is constant so far (every candidate scores 0, say)
        # cannot be standardised; the GP then models it as flat, which is what it is
        for category in (NumericalWarning, NumericsWarning, OptimizationWarning, BadInitialCandidatesWarning, InputDataWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", message="Optimization failed", category=RuntimeWarning)
        return out


class _torch_seed:
    """Seed torch's global RNG for one proposal and restore it after (the acquisition's
    random restarts, the MC sampler's scrambling): the same data give the same batch."""

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self):
        import torch

        self.state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc):
        import torch

        torch.random.set_rng_state(self.state)
        return False


def bo(space=None, pop_size: int = 8, n_init: int = 8, acquisition: str = "qlognehvi", ref_point=None,
       num_restarts: int = 2, raw_samples: int = 128, mc_samples: int = 32, maxiter: int = 50,
       partitioning_alpha: float | None = None, overlap: bool = False, ftol: float = 0.0, max_baseline: int | None = None) -> Strategy:
    """Hydra target of ``configs/algorithm/bo.yaml``."""
    return BayesStrategy(space, pop_size, n_init, acquisition, ref_point, num_restarts, raw_samples, mc_samples, maxiter, partitioning_alpha,
                         overlap, ftol, max_baseline)
