"""Analytic EHVI on the lean GP posterior (algorithm.acquisition=ehvi, evomerge/search/ehvi.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from evomerge.search import ehvi
from evomerge.search.bayes import BayesStrategy
from tests.test_bayes import two_bowls


def _fitted(n: int = 20, d: int = 3, m: int = 2, seed: int = 0, noise: float = 0.01):
    s = BayesStrategy(pop_size=2, n_init=1)
    s.setup(d, m, 100, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.random((n, d))
    F = np.concatenate([two_bowls(X), ((X - 0.5) ** 2).sum(1, keepdims=True)], axis=1)[:, :m]
    S = np.full_like(F, np.sqrt(noise))
    s.tell(X, F, S)
    return s, s._fit(), X, F, S


def test_lean_posterior_equals_the_fitted_models_posterior():
    _, model, X, F, S = _fitted()
    lean = ehvi.LeanPosterior.build(model, torch.as_tensor(X), torch.as_tensor(1 - F), torch.as_tensor(S**2))
    test = torch.rand(50, 3, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    mean, var = lean.predict(test)
    with torch.no_grad():
        post = model.posterior(test)
    assert torch.allclose(mean, post.mean, atol=1e-8) and torch.allclose(var, post.variance, atol=1e-8)


def test_a_believed_point_has_no_variance_left_and_keeps_its_mean():
    _, model, X, F, S = _fitted()
    lean = ehvi.LeanPosterior.build(model, torch.as_tensor(X), torch.as_tensor(1 - F), torch.as_tensor(S**2))
    x = torch.tensor([[0.3, 0.6, 0.2]], dtype=torch.double)
    mean, var = lean.predict(x)
    after_mean, after_var = lean.believe(x, mean).predict(x)
    assert torch.allclose(after_mean, mean, atol=1e-4)
    assert (after_var < 1e-3 * var).all()


@pytest.mark.parametrize("m", [2, 3])
def test_ehvi_equals_botorchs_analytic_ehvi(m):
    from botorch.acquisition.multi_objective.analytic import (
        ExpectedHypervolumeImprovement,
    )
    from botorch.utils.multi_objective.box_decompositions.non_dominated import (
        FastNondominatedPartitioning,
    )
    from botorch.utils.multi_objective.pareto import is_non_dominated

    _, model, X, F, S = _fitted(m=m)
    Y = torch.as_tensor(1 - F)
    front = Y[is_non_dominated(Y)]
    ref = torch.zeros(m, dtype=torch.double)
    test = torch.rand(40, 3, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = ExpectedHypervolumeImprovement(model, ref.tolist(), FastNondominatedPartitioning(ref, Y=front))(test[:, None, :])
        post = model.posterior(test)
    lower, upper = ehvi.improvement_cells(front, ref)
    got = ehvi.expected_improvement_volume(post.mean, post.variance.sqrt(), lower, upper)
    assert got.shape == (40,) and torch.allclose(got, expected, atol=1e-10)


def test_ehvi_of_a_certain_point_is_its_hypervolume_improvement():
    # front {(0.5, 0.5)}, reference (0, 0): the point (1, 0.25) adds 1 * 0.25 - 0.5 * 0.25 = 0.125;
    # a point the front dominates adds nothing
    front = torch.tensor([[0.5, 0.5]], dtype=torch.double)
    lower, upper = ehvi.improvement_cells(front, torch.zeros(2, dtype=torch.double))
    mu = torch.tensor([[1.0, 0.25], [0.4, 0.4]], dtype=torch.double)
    got = ehvi.expected_improvement_volume(mu, torch.full_like(mu, 1e-12), lower, upper)
    assert torch.allclose(got, torch.tensor([0.125, 0.0], dtype=torch.double), atol=1e-12)


def test_uncertainty_raises_the_expected_improvement_of_a_dominated_mean():
    front = torch.tensor([[0.5, 0.5]], dtype=torch.double)
    lower, upper = ehvi.improvement_cells(front, torch.zeros(2, dtype=torch.double))
    mu = torch.tensor([[0.4, 0.4], [0.4, 0.4]], dtype=torch.double)
    sigma = torch.tensor([[0.01, 0.01], [0.2, 0.2]], dtype=torch.double)
    low, high = ehvi.expected_improvement_volume(mu, sigma, lower, upper)
    assert 0 <= low < 1e-6 < high


@pytest.mark.parametrize("n", [0, 1, 15, 16, 19, 20, 24, 25, 26, 31, 32, 100, 480])
def test_the_fit_ladder_refits_only_when_the_data_grew_by_a_quarter(n):
    size = ehvi.fit_size(n)
    assert size <= n and (size == n if n <= 16 else size > n / ehvi.FIT_GROWTH - 1)
    assert ehvi.fit_size(size) == size  # a ladder step maps to itself
    if n > 16:
        assert ehvi.fit_size(n + 1) in (size, n + 1)  # it changes only onto a new ladder step


def test_the_fit_ladder_steps():
    steps = sorted({ehvi.fit_size(n) for n in range(16, 60)})
    assert steps == [16, 20, 25, 32, 40, 50]


def _ehvi_strategy(seed: int = 3) -> BayesStrategy:
    s = BayesStrategy(pop_size=4, n_init=6, acquisition="ehvi")
    s.setup(3, 2, 60, seed=seed)
    for _ in range(3):
        X = s.ask()
        s.tell(X, two_bowls(X), np.full((len(X), 2), 0.02))
    return s


def test_an_ehvi_round_is_a_pure_function_of_the_data_and_the_seed():
    s = _ehvi_strategy()
    clone = pickle.loads(pickle.dumps(s))
    a = s.ask()
    ehvi._FITS.clear()  # a resumed process has no memo: the fit is recomputed, the same
    b = clone.ask()
    assert a.shape == (4, 3) and np.all((a >= 0) & (a <= 1)) and np.array_equal(a, b)
    assert len(np.unique(np.round(a, 6), axis=0)) == 4  # the believer spreads a batch


def test_ehvi_keeps_pending_candidates_out_of_a_batch():
    s = _ehvi_strategy()
    X, F, S = s.X, s.F, s.S
    alone = s._proposal(1, X, F, S, None, 11)
    pending = s._proposal(1, X, F, S, alone, 11)
    assert np.abs(pending - alone).max() > 1e-3  # a running candidate is believed: not asked again


def test_ehvi_finds_the_front_of_a_smooth_problem():
    s = BayesStrategy(pop_size=4, n_init=6, acquisition="ehvi")
    s.setup(2, 2, 30, seed=0)
    for _ in range(5):
        X = s.ask()
        s.tell(X, two_bowls(X), np.full((len(X), 2), 0.001))
    model_points = s.X[6:]
    assert np.median(np.abs(model_points[:, 1] - 0.5)) < 0.2  # near the Pareto set x1 = 0.5


def test_ehvi_works_without_standard_errors():
    s = BayesStrategy(pop_size=2, n_init=4, acquisition="ehvi")
    s.setup(2, 2, 20, seed=1)
    for _ in range(3):
        X = s.ask()
        s.tell(X, two_bowls(X))
    X = s.ask()
    assert X.shape == (2, 2) and np.isfinite(X).all()


def test_the_update_spread_vanishes_where_observing_again_cannot_move_the_mean():
    var = torch.tensor([0.0, 1e-4, 1e-2, 1.0], dtype=torch.double)
    spread = ehvi.update_spread(var, torch.tensor(0.01, dtype=torch.double))
    assert spread[0] == 0 and torch.all(spread[1:] < var[1:].sqrt())  # never more than the latent spread
    assert torch.all(spread[1:] > spread[:-1])  # grows with what is unknown
    assert torch.allclose(ehvi.update_spread(var, torch.tensor(0.0, dtype=torch.double))[1:], var[1:].sqrt())  # no noise: the latent spread


def test_ehvi_update_is_a_pure_round_too_and_differs_from_the_latent_form():
    s = _ehvi_strategy()
    s.acquisition = "ehvi_update"
    clone = pickle.loads(pickle.dumps(s))
    a = s.ask()
    ehvi._FITS.clear()
    assert np.array_equal(a, clone.ask())
    update = s._proposal(4, s.X, s.F, s.S, None, 5)
    s.acquisition = "ehvi"
    assert not np.allclose(update, s._proposal(4, s.X, s.F, s.S, None, 5))  # the flag reaches the round
