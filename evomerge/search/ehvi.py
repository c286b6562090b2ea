"""Analytic expected hypervolume improvement on a lean GP posterior (``acquisition: ehvi``).

Why: qLogNEHVI integrates over the noisy front with Monte-Carlo samples of every told point
jointly; on cheap candidates (the toy zoo: a third of a second each) its 100-300 acquisition
calls of 30-50 ms per round cost more than the candidates themselves, and a round grows with
the budget (60 s at 480 points). Here a round is a handful of batched linear-algebra passes:

* **hyperparameters** are fitted (BoTorch's ``SingleTaskGP`` + ``fit_gpytorch_mll``, the same
  model as ``qlognehvi``) on the first ``fit_size(n)`` told points, a geometric ladder, so a fit
  happens only when the data grew by a quarter; fits are memoised by their data, so every
  round stays a pure function of the data and the seed (exact resume, overlap, async);
* the **posterior** at all ``n`` told points is then exact for those hyperparameters
  (``LeanPosterior``: one Cholesky per objective, batched predictions of thousands of points);
* the **front** is the posterior mean's non-dominated set at the told points (the noise-robust
  plug-in, instead of integrating over sampled fronts);
* **EHVI** of one point is Yang et al.'s closed form over the box decomposition of the region
  that front does not dominate (``expected_improvement_volume``), as BoTorch's analytic
  ``ExpectedHypervolumeImprovement`` computes it (tested against it);
* a **batch** of q is chosen greedily: each chosen point (and each pending one) is believed at
  its posterior mean, noise-free (kriging believer), which removes its neighbourhood's
  improvement before the next pick;
* the **maximiser** is a scrambled Sobol set followed by three rounds of local perturbation
  around the best points: no gradients, no L-BFGS, all points of a pass in one call.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

SOBOL_POINTS = 1024
LOCAL_POINTS = 512  # per refinement pass, around the best TOP points
LOCAL_SCALES = (0.1, 0.03, 0.01)  # perturbation standard deviation, as a share of the unit box
TOP = 8
BELIEVER_NOISE = 1e-6  # standardised variance of a believed (fantasy) observation
FIT_GROWTH = 1.25  # hyperparameters are refitted when the data grew by this factor
FIT_MIN = 16
_FITS: OrderedDict[str, Any] = OrderedDict()  # process-local memo: data digest -> fitted model
_FITS_KEPT = 4


def fit_size(n_told: int) -> int:
    """How many of the first told points the hyperparameters are fitted on: the largest step of
    the ladder 16, 20, 25, 31, ... (x1.25, rounded up) not above ``n_told`` (all of them below 16)."""
    if n_told <= FIT_MIN:
        return n_told
    size = FIT_MIN
    while True:
        nxt = int(np.ceil(size * FIT_GROWTH))
        if nxt > n_told:
            return size
        size = nxt


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=float)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def fitted_model(fit, X: np.ndarray, F: np.ndarray, S: np.ndarray) -> Any:
    """``fit(X, F, S)`` on these data, memoised by their bytes (a fit is deterministic: the
    same data give the same hyperparameters, so the memo only saves time)."""
    key = _digest(X, F, S)
    if key in _FITS:
        _FITS.move_to_end(key)
        return _FITS[key]
    model = fit(X, F, S)
    _FITS[key] = model
    while len(_FITS) > _FITS_KEPT:
        _FITS.popitem(last=False)
    return model


@dataclass
class LeanPosterior:
    """The exact GP posterior of latent scores, for the hyperparameters of a fitted multi-output
    ``SingleTaskGP``, conditioned on any data: ``predict`` gives mean and variance in score space."""

    covar: Any  # the fitted model's covariance module (batch of one kernel per objective)
    constant: Any  # m: the constant prior mean (standardised)
    y_mean: Any  # m: the outcome standardisation of the fitted model
    y_std: Any
    X: Any  # n x d
    chol: Any  # m x n x n
    alpha: Any  # m x n x 1

    @classmethod
    def build(cls, model: Any, X: Any, Y: Any, noise: Any) -> LeanPosterior:
        """``model``'s hyperparameters, conditioned on scores ``Y`` (n x m, score space) with
        observation variances ``noise`` (n x m, score space)."""
        tf = model.outcome_transform
        y_mean, y_std = tf.means.reshape(-1), tf.stdvs.reshape(-1)
        constant = model.mean_module.constant.reshape(-1)
        lean = cls(model.covar_module, constant, y_mean, y_std, X, None, None)
        lean._factor(Y, noise)
        return lean

    def _factor(self, Y: Any, noise: Any) -> None:
        import torch

        y = ((Y - self.y_mean) / self.y_std).T.unsqueeze(-1) - self.constant.reshape(-1, 1, 1)  # m x n x 1
        var = (noise / self.y_std**2).T  # m x n
        K = self.covar(self.X, self.X).to_dense() + torch.diag_embed(var)
        self.chol = _cholesky(K)
        self.alpha = torch.cholesky_solve(y, self.chol)
        self._Y, self._noise = Y, noise

    def predict(self, Xc: Any) -> tuple[Any, Any]:
        """Mean and variance (b x m, score space) of the latent scores at ``Xc`` (b x d)."""
        import torch

        Ks = self.covar(Xc, self.X).to_dense()  # m x b x n
        mean = (Ks @ self.alpha).squeeze(-1) + self.constant.reshape(-1, 1)  # m x b
        v = torch.linalg.solve_triangular(self.chol, Ks.transpose(-1, -2), upper=False)  # m x n x b
        prior = self.covar(Xc, Xc, diag=True)  # m x b
        var = (prior - (v * v).sum(-2)).clamp_min(0.0)
        return (mean * self.y_std.reshape(-1, 1) + self.y_mean.reshape(-1, 1)).T, (var * self.y_std.reshape(-1, 1) ** 2).T

    def believe(self, x: Any, y: Any) -> LeanPosterior:
        """The posterior with ``x`` (k x d) observed at ``y`` (k x m) without noise (a fantasy)."""
        import torch

        new = LeanPosterior(self.covar, self.constant, self.y_mean, self.y_std, torch.cat([self.X, x]), None, None)
        noise = torch.full_like(y, BELIEVER_NOISE) * self.y_std**2
        new._factor(torch.cat([self._Y, y]), torch.cat([self._noise, noise]))
        return new


def _cholesky(K: Any) -> Any:
    """Cholesky factor with growing jitter when the matrix is numerically not positive definite."""
    import torch

    L, info = torch.linalg.cholesky_ex(K)
    jitter = 1e-8
    while bool((info > 0).any()) and jitter < 1.0:
        L, info = torch.linalg.cholesky_ex(K + jitter * torch.eye(K.shape[-1], dtype=K.dtype))
        jitter *= 10
    return L


def expected_improvement_volume(mu: Any, sigma: Any, lower: Any, upper: Any) -> Any:
    """EHVI of points with independent Gaussian scores ``N(mu, sigma^2)`` (b x m), maximised,
    given the cells ``[lower, upper]`` (c x m; upper may be inf) that partition the region not yet
    dominated: per cell the product over objectives of E[(min(Y, u) - l)+], summed over cells."""
    import torch

    normal = torch.distributions.Normal(torch.zeros((), dtype=mu.dtype), torch.ones((), dtype=mu.dtype))
    upper = upper.clamp_max(1e10)
    mu, sigma = mu.unsqueeze(-2), sigma.clamp_min(1e-9).unsqueeze(-2)  # b x 1 x m

    def psi(a, b):  # sigma * pdf(z_b) + (mu - a) * (1 - cdf(z_b))
        z = (b - mu) / sigma
        return sigma * normal.log_prob(z).exp() + (mu - a) * (1 - normal.cdf(z))

    per_objective = psi(lower, lower) - psi(lower, upper) + (upper - lower) * (1 - normal.cdf((upper - mu) / sigma))
    return per_objective.prod(-1).sum(-1)


def improvement_cells(front: Any, ref: Any, alpha: float = 0.0) -> tuple[Any, Any]:
    """Lower and upper bounds of the boxes partitioning what ``front`` (maximised) leaves
    undominated above ``ref`` (BoTorch's box decompositions: exact, or approximate at ``alpha``)."""
    from botorch.utils.multi_objective.box_decompositions.non_dominated import (
        FastNondominatedPartitioning,
        NondominatedPartitioning,
    )

    if alpha > 0:
        part = NondominatedPartitioning(ref_point=ref, Y=front, alpha=alpha)
    else:
        part = FastNondominatedPartitioning(ref_point=ref, Y=front)
    bounds = part.get_hypercell_bounds()
    return bounds[0], bounds[1]


def maximise(score, n_var: int, seed: int) -> Any:
    """The point of [0, 1]^n_var with the highest ``score`` (a batched function of b x n_var):
    a scrambled Sobol set, then local Gaussian perturbations around the best ``TOP`` points at
    shrinking scales; deterministic for a seed."""
    import torch
    from torch.quasirandom import SobolEngine

    generator = torch.Generator().manual_seed(int(seed))
    pool = SobolEngine(n_var, scramble=True, seed=int(seed) % (2**31)).draw(SOBOL_POINTS).double()
    values = score(pool)
    for scale in LOCAL_SCALES:
        best = pool[torch.topk(values, min(TOP, len(values))).indices]
        local = best.repeat(LOCAL_POINTS // len(best), 1)
        local = (local + scale * torch.randn(local.shape, generator=generator, dtype=torch.double)).clamp(0.0, 1.0)
        pool = torch.cat([best, local])
        values = score(pool)
    return pool[int(torch.argmax(values))].unsqueeze(0)


def update_spread(var: Any, noise: Any) -> Any:
    """Standard deviation of the change of the posterior mean at a point once it is observed with
    noise variance ``noise``: var / sqrt(var + noise). Near a point already scored many times it
    vanishes, where the latent spread sqrt(var) stays at the noise level."""
    return var / (var + noise).sqrt().clamp_min(1e-12)


def _ehvi_at(posterior: LeanPosterior, lower: Any, upper: Any, noise: Any, points: Any) -> Any:
    mean, var = posterior.predict(points)
    spread = var.sqrt() if noise is None else update_spread(var, noise)
    return expected_improvement_volume(mean, spread, lower, upper)


def propose(model: Any, X: Any, Y: Any, noise: Any, q: int, ref: Any, seed: int, pending: Any = None, alpha: float = 0.0,
            mean_update: bool = False) -> Any:
    """``q`` points (q x d), greedy under the kriging believer, from the posterior of ``model``'s
    hyperparameters conditioned on told scores ``Y`` (n x m) with variances ``noise``.

    ``mean_update``: the gain is the expected improvement of the posterior-mean front by the
    candidate's mean after observing it with the typical noise (the median told variance per
    objective), not of its latent score: on noisy scores the latent form keeps re-proposing
    points of the front, whose latent spread never falls below the noise, and the front then
    fills with lucky re-samples (the winner's curse)."""
    import torch
    from botorch.utils.multi_objective.pareto import is_non_dominated

    posterior = LeanPosterior.build(model, X, Y, noise)
    typical_noise = noise.median(0).values if mean_update else None
    told_mean, _ = posterior.predict(X)
    front = told_mean
    if pending is not None and len(pending):
        believed, _ = posterior.predict(pending)
        posterior = posterior.believe(pending, believed)
        front = torch.cat([front, believed])
    chosen = []
    for k in range(q):
        front = front[is_non_dominated(front)]
        lower, upper = improvement_cells(front, ref, alpha)
        x = maximise(partial(_ehvi_at, posterior, lower, upper, typical_noise), X.shape[-1], seed * 31 + k)
        chosen.append(x)
        if k < q - 1:
            mean, _ = posterior.predict(x)
            posterior = posterior.believe(x, mean)
            front = torch.cat([front, mean])
    return torch.cat(chosen)
