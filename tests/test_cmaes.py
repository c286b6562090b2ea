"""CMA-ES (algorithm=cmaes, the sakana_cmaes baseline): resumable and reproducible.

The budget extension / resume equivalence on a whole search loop is in
tests/test_integrity.py (test_budget_extension_on_resume_matches_a_longer_run)."""

from __future__ import annotations

import dill
import numpy as np
import pytest

from evomerge.search import cmaes as cmaes_module
from evomerge.search.algorithms import cmaes


def sphere(X: np.ndarray) -> np.ndarray:
    """Two objectives whose mean is a sphere around 0.3: CMA-ES keeps improving on it."""
    d = ((X - 0.3) ** 2).sum(axis=1)
    return np.stack([d, d + 0.01 * X[:, 0]], axis=1)


def asks(seed: int, generations: int, pickle_every: bool) -> list[np.ndarray]:
    np.random.seed(123)  # the loop restores numpy's global state on resume; here it is never touched
    strategy = cmaes(pop_size=6)
    strategy.setup(5, 2, max_evals=1000, seed=seed)
    out = []
    for _ in range(generations):
        assert strategy.has_next()
        X = strategy.ask()
        out.append(X.copy())
        strategy.tell(X, sphere(X))
        if pickle_every:
            state = np.random.get_state()
            strategy = dill.loads(dill.dumps(strategy))
            np.random.set_state(state)
    return out


@pytest.mark.parametrize("seed", [0, 7])
def test_a_pickled_and_restored_cmaes_asks_what_the_uninterrupted_one_asks(seed):
    straight = asks(seed, 6, pickle_every=False)
    restored = asks(seed, 6, pickle_every=True)
    assert [x.shape for x in straight] == [x.shape for x in restored] and straight[2].shape == (6, 5)
    assert all(np.array_equal(a, b) for a, b in zip(straight, restored))


def test_seed_zero_is_reproducible_and_other_seeds_are_passed_unchanged(monkeypatch):
    first, second = asks(0, 3, pickle_every=False), asks(0, 3, pickle_every=False)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))
    assert not np.array_equal(asks(1, 3, pickle_every=False)[1], first[1])
    strategy = cmaes()
    strategy.setup(4, 2, max_evals=100, seed=0)
    assert strategy.algorithm.options["seed"] == cmaes_module.SEED_FOR_ZERO
    strategy.setup(4, 2, max_evals=100, seed=5)
    assert strategy.algorithm.options["seed"] == 5


def test_a_checkpoint_of_the_old_cmaes_is_replayed_from_the_archive(tmp_path, capsys):
    """A cmaes checkpoint written before the fix (plain pymoo CMAES, state lost) is set aside and
    the search replayed from the archive: extending it ends like one longer run."""
    from pymoo.algorithms.soo.nonconvex.cmaes import CMAES
    from test_integrity import Counting, loop, result

    from evomerge.search.algorithms import PymooStrategy

    old = PymooStrategy("cmaes", lambda n_obj, n_var: CMAES(x0=np.full(n_var, 0.5), sigma=1 / 6, popsize=6, restarts=0), False)
    run = tmp_path / "run"
    loop(run, max_evals=19, strategy=old).run(Counting())
    longer = tmp_path / "longer"
    loop(longer, max_evals=40, strategy=cmaes(pop_size=6)).run(Counting())
    capsys.readouterr()
    loop(run, max_evals=40, strategy=cmaes(pop_size=6)).run(Counting())
    assert "cannot continue the search (it holds a CMA-ES written before 2026-12-08" in capsys.readouterr().err
    assert (run / "checkpoint.pkl.stale").exists()
    assert len(result(longer)) == 40 and result(run) == result(longer)
