"""Model-based searches (algorithm=bo, algorithm=map) and adaptive layer blocks."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.bayes import BayesStrategy, baseline_fraction, noise_variances
from evomerge.search.blocks import adaptive_blocks, brute_force_segments, layer_features, segment_layers, total_cost
from evomerge.search.genome import GenomeSpace
from evomerge.search.surrogate import QuadraticSurrogateStrategy, fit_ridge, quadratic_features


def two_bowls(X: np.ndarray) -> np.ndarray:
    """A 2-objective problem whose Pareto set is x0 in [0.2, 0.8] with the rest at 0.5."""
    rest = ((X[:, 1:] - 0.5) ** 2).sum(axis=1)
    return np.stack([(X[:, 0] - 0.2) ** 2 + rest, (X[:, 0] - 0.8) ** 2 + rest], axis=1)


# ---------------------------------------------------------------- adaptive blocks


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_blocks", [1, 2, 3, 4])
def test_segmentation_dp_equals_brute_force(seed, n_blocks):
    rng = np.random.default_rng(seed)
    norms = rng.gamma(2.0, 1.0, size=(8, 2))
    features, mass = layer_features(norms), norms.sum(axis=1)
    blocks = segment_layers(features, mass, n_blocks)
    best_blocks, best_cost = brute_force_segments(features, mass, n_blocks)
    assert total_cost(blocks, features, mass, n_blocks) == pytest.approx(best_cost, abs=1e-9)
    assert blocks == best_blocks
    assert blocks[0][0] == 0 and blocks[-1][1] == 7 and all(blocks[i][1] + 1 == blocks[i + 1][0] for i in range(n_blocks - 1))


def test_blocks_follow_where_the_experts_change():
    # expert 0 lives in layers 0-3, expert 1 in layers 4-7: one border, right between them
    norms = np.array([[1.0, 0.01]] * 4 + [[0.01, 1.0]] * 4)
    assert adaptive_blocks(norms, 2) == [(0, 3), (4, 7)]


def test_genome_with_explicit_layer_ranges():
    space = GenomeSpace(n_experts=2, n_layers=6, methods=("task_arithmetic",), layer_ranges=[(0, 0), (1, 4), (5, 5)], separate_embed_head=False)
    assert [s.layers for s in space.slots] == [(0, 0), (1, 4), (5, 5)] and space.n_var == 6
    with pytest.raises(ConfigError, match="contiguous"):
        GenomeSpace(n_experts=2, n_layers=6, methods=("task_arithmetic",), layer_ranges=[(0, 2), (4, 5)])


# ---------------------------------------------------------------- BO


def test_noise_variances_fill_unknown_and_floor():
    var = noise_variances(np.array([0.1, np.nan, 0.0]))
    assert var[0] == pytest.approx(0.01) and var[1] == pytest.approx(0.05**2) and var[2] > 0
    assert noise_variances(np.array([np.nan, np.nan])) is None


def test_bo_refuses_method_genes_with_one_line():
    space = GenomeSpace(n_experts=2, n_layers=4, methods=("ties", "task_arithmetic"))
    with pytest.raises(ConfigError, match="genome=blocks_ta"):
        BayesStrategy(space)
    with pytest.raises(ConfigError, match="genome=blocks_ta"):
        QuadraticSurrogateStrategy(space)


def test_bo_uses_the_standard_errors_as_noise():
    from gpytorch.likelihoods import FixedNoiseGaussianLikelihood

    s = BayesStrategy(pop_size=2, n_init=0)
    s.setup(2, 2, 20, seed=0)
    X = np.random.default_rng(0).random((10, 2))
    se = np.stack([np.linspace(0.02, 0.2, 10), np.full(10, 0.05)], axis=1)  # one noisy end
    s.tell(X, two_bowls(X), se)
    model = s._fit()
    assert isinstance(model.likelihood, FixedNoiseGaussianLikelihood)
    noise = model.likelihood.noise.detach().numpy()  # per objective and point, in standardised units
    ratio = noise / (se.T**2)
    assert np.allclose(ratio, ratio[:, :1])  # each point's own variance, scaled by the outcome's
    s2 = BayesStrategy(pop_size=2, n_init=0)
    s2.setup(2, 2, 20, seed=0)
    s2.tell(X, two_bowls(X))  # no standard errors: the noise is inferred
    assert not isinstance(s2._fit().likelihood, FixedNoiseGaussianLikelihood)


def test_bo_design_first_then_model_proposals_are_exact_after_pickling():
    s = BayesStrategy(pop_size=4, n_init=4)
    warm = np.array([[0.5, 0.5, 0.5]])
    s.setup(3, 2, 40, seed=1, initial=warm)
    first = s.ask()
    assert np.array_equal(first[0], warm[0]) and first.shape == (4, 3)  # warm start, then Sobol
    s.tell(first, two_bowls(first), np.full((4, 2), 0.01))
    second = s.ask()  # the last design point, alone (the design held 5)
    s.tell(second, two_bowls(second))
    clone = pickle.loads(pickle.dumps(s))
    a, b = s.ask(), clone.ask()
    assert a.shape == (4, 3) and np.all((a >= 0) & (a <= 1))
    assert np.array_equal(a, b)  # a resumed run proposes exactly the same batch


def test_bo_finds_the_front_of_a_smooth_problem():
    s = BayesStrategy(pop_size=4, n_init=6, raw_samples=64, num_restarts=2)
    s.setup(2, 2, 30, seed=0)
    for _ in range(5):
        X = s.ask()
        s.tell(X, two_bowls(X), np.full((len(X), 2), 0.001))
    model_points = s.X[6:]
    # the proposals concentrate near the Pareto set (x1 = 0.5, x0 in [0.2, 0.8])
    assert np.median(np.abs(model_points[:, 1] - 0.5)) < 0.2


@pytest.mark.parametrize(("n_obj", "configured", "expected"), [(2, None, 0.0), (4, None, 0.0), (5, None, 1e-3), (6, None, 1e-2), (3, 0.01, 0.01), (5, 0.0, 0.0)])
def test_bo_approximates_the_front_partitioning_only_from_five_objectives(monkeypatch, n_obj, configured, expected):
    import botorch.acquisition.multi_objective.logei as logei

    seen = {}
    original = logei.qLogNoisyExpectedHypervolumeImprovement

    def spy(*args, **kwargs):
        seen["alpha"] = kwargs.get("alpha", 0.0)
        return original(*args, **kwargs)

    monkeypatch.setattr(logei, "qLogNoisyExpectedHypervolumeImprovement", spy)
    s = BayesStrategy(pop_size=2, n_init=0, raw_samples=16, num_restarts=1, mc_samples=8, maxiter=5, partitioning_alpha=configured)
    s.setup(3, n_obj, 40, seed=0)
    rng = np.random.default_rng(0)
    X = rng.random((12, 3))
    F = np.stack([((X - c) ** 2).sum(axis=1) for c in np.linspace(0.1, 0.9, n_obj)], axis=1)
    s.tell(X, F, np.full_like(F, 0.02))
    batch = s.ask()
    assert seen["alpha"] == pytest.approx(expected)
    assert batch.shape == (2, 3) and np.all((batch >= 0) & (batch <= 1))


@pytest.mark.parametrize("alpha", [-0.1, 1.0])
def test_bo_refuses_a_partitioning_alpha_outside_its_range(alpha):
    with pytest.raises(ConfigError, match="partitioning_alpha"):
        BayesStrategy(partitioning_alpha=alpha)


def test_bo_steady_state_keeps_running_candidates_pending():
    s = BayesStrategy(pop_size=2, n_init=2, raw_samples=32, num_restarts=1)
    s.setup(2, 2, 10, seed=0)
    xs = [s.ask_one() for _ in range(2)]  # the design
    for x in xs:
        s.tell_one(x, two_bowls(x[None])[0], np.array([0.01, 0.01]))
    a = s.ask_one()
    assert len(s.pending) == 1 and np.array_equal(s.pending[0], a)
    b = s.ask_one()  # proposed with a pending: not the same point
    assert not np.allclose(a, b)
    s.tell_one(a, two_bowls(a[None])[0])
    assert len(s.pending) == 1 and len(s.X) == 3


@pytest.mark.parametrize("n_told", [1, 7, 63, 64, 65, 100, 144, 333, 480, 1999])
def test_baseline_fraction_keeps_exactly_the_cap_as_botorch_counts_it(n_told):
    import math

    kept = math.ceil(baseline_fraction(n_told, 64) * n_told)  # BoTorch keeps ceil(max_frac * n)
    assert kept == min(n_told, 64)
    assert baseline_fraction(n_told, None) == 1.0


def _noisy_strategy(max_baseline: int | None) -> BayesStrategy:
    """Past its design, told 30 noisy points of a flat problem: most are non-dominated in some sample."""
    s = BayesStrategy(pop_size=2, n_init=0, raw_samples=32, num_restarts=1, max_baseline=max_baseline)
    s.setup(2, 2, 60, seed=3)
    rng = np.random.default_rng(3)
    X = rng.random((30, 2))
    s.tell(X, 0.5 + 0.05 * rng.standard_normal((30, 2)), np.full((30, 2), 0.05))
    return s


def test_bo_baseline_cap_bounds_the_noisy_front_and_is_a_no_op_above_the_points_told(monkeypatch):
    import botorch.acquisition.multi_objective.utils as botorch_utils

    sizes: list[int] = []
    prune = botorch_utils.prune_inferior_points_multi_objective

    def recording(*args, **kwargs):
        kept = prune(*args, **kwargs)
        sizes.append(len(kept))
        return kept

    monkeypatch.setattr(botorch_utils, "prune_inferior_points_multi_objective", recording)
    uncapped = _noisy_strategy(None).ask()
    loose = _noisy_strategy(30).ask()  # a cap at the points told changes nothing
    capped = _noisy_strategy(5).ask()
    assert sizes[0] > 5 and sizes[1] == sizes[0] and sizes[2] == 5
    assert np.array_equal(uncapped, loose)
    assert capped.shape == (2, 2) and np.all((capped >= 0) & (capped <= 1))


@pytest.mark.parametrize("value", [0, -3])
def test_bo_refuses_a_baseline_cap_below_one(value):
    with pytest.raises(ConfigError, match="max_baseline"):
        BayesStrategy(max_baseline=value)


# ---------------------------------------------------------------- overlapped rounds (evomerge/search/proposals.py)


def _told_strategy(overlap: bool = True) -> tuple[BayesStrategy, np.ndarray]:
    """A strategy past its design: returns it and the last batch it asked (not yet told)."""
    s = BayesStrategy(pop_size=3, n_init=6, raw_samples=32, num_restarts=1, overlap=overlap)
    s.setup(3, 2, 40, seed=2)
    first = s.ask()
    s.tell(first, two_bowls(first), np.full((3, 2), 0.01))
    return s, s.ask()  # the design's last batch: the first model round is fixed now


def test_overlapped_round_sees_the_data_before_its_pending_batch():
    s, last = _told_strategy()
    spec = s.next_round
    assert spec is not None and spec.n_told == 3 and np.array_equal(spec.pending, last)
    s.tell(last, two_bowls(last), np.full((3, 2), 0.01))
    expected, _ = s.compute_round(spec)  # from the first 3 points, the last batch pending
    got = s.ask()
    assert np.array_equal(got, expected)
    assert s.next_round.n_told == 6 and np.array_equal(s.next_round.pending, got)
    # without overlap the round sees all 6 points and no pending batch: another batch
    plain, last_plain = _told_strategy(overlap=False)
    assert np.array_equal(last_plain, last) and getattr(plain, "next_round", None) is None
    plain.tell(last_plain, two_bowls(last_plain), np.full((3, 2), 0.01))
    assert not np.allclose(plain.ask(), got)


def test_the_worker_proposes_exactly_what_the_process_would():
    from evomerge.search import proposals

    try:
        s, last = _told_strategy()
        assert proposals._running is not None and proposals._running[0] is s.next_round  # started in the worker
        s.tell(last, two_bowls(last), np.full((3, 2), 0.01))
        resumed = pickle.loads(pickle.dumps(s))  # a resumed run: no worker result for its round
        from_worker = s.ask()
        in_process = resumed.ask()
        assert np.array_equal(from_worker, in_process)
    finally:
        proposals.shutdown()
    assert proposals._pool is None


def test_the_worker_stops_when_its_driver_is_killed(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = (
        "import time\n"
        "from evomerge.search import proposals\n"
        "proposals.warm_up(); proposals._warming.result()\n"
        "print(*proposals._pool._processes, flush=True)\n"
        "time.sleep(600)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    worker = int(driver.stdout.readline())
    os.kill(driver.pid, signal.SIGKILL)  # no atexit, no shutdown: as a killed run
    driver.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    assert not _alive(worker), "the proposal worker outlived its killed driver"


def _alive(pid: int) -> bool:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False
    except OSError:
        os.kill(pid, 0)
        return True


def test_a_failed_worker_round_is_computed_in_process(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from evomerge.search import proposals

    def broken(strategy, spec):
        raise RuntimeError("worker died")

    monkeypatch.setattr(proposals, "_compute", broken)
    monkeypatch.setattr(proposals, "_get_pool", lambda: ThreadPoolExecutor(1))
    monkeypatch.setattr(proposals, "_broken", False)
    s, last = _told_strategy()
    s.tell(last, two_bowls(last), np.full((3, 2), 0.01))
    expected, _ = s.compute_round(s.next_round)
    assert np.array_equal(s.ask(), expected)
    assert proposals._broken  # and later rounds are not sent to it again


@pytest.mark.parametrize(("threads", "on_cpu", "overlap", "expected"), [(2, True, True, 1), (16, True, True, 15), (1, True, True, None),
                                                                         (2, False, True, None), (2, True, False, None)])
def test_scoring_leaves_the_worker_one_core_only_when_both_use_the_cpu(threads, on_cpu, overlap, expected):
    from evomerge.search.proposals import scoring_threads

    assert scoring_threads(threads, on_cpu, overlap) == expected


# ---------------------------------------------------------------- MAP


def test_ridge_recovers_a_quadratic():
    rng = np.random.default_rng(0)
    X = rng.random((40, 3))
    true = np.arange(1, 11, dtype=float) / 10
    y = quadratic_features(X) @ true
    coef = fit_ridge(quadratic_features(X), y, np.ones(40))
    assert np.allclose(quadratic_features(X) @ coef, y, atol=1e-3)


def test_map_proposes_points_on_the_surrogate_front():
    s = QuadraticSurrogateStrategy(pop_size=4, nsga_pop=40, nsga_gen=40)
    s.setup(2, 2, 40, seed=0)
    X = s.ask()
    while len(s.design):
        s.tell(X, two_bowls(X), np.full((len(X), 2), 0.01))
        X = s.ask()
    s.tell(X, two_bowls(X), np.full((len(X), 2), 0.01))
    proposal = s.ask()  # the quadratic fits two_bowls exactly: proposals lie on its Pareto set
    assert proposal.shape == (4, 2)
    assert np.all(np.abs(proposal[:, 1] - 0.5) < 0.05) and np.all((proposal[:, 0] > 0.15) & (proposal[:, 0] < 0.85))
    clone = pickle.loads(pickle.dumps(s))
    assert np.array_equal(s.ask(), clone.ask())


# ---------------------------------------------------------------- end to end: kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["bo", "bo_overlap", "bo_ehvi", "map"])
def test_model_based_search_resumes_exactly_after_a_kill(test_zoo, tmp_path, algorithm):
    from tests.test_cli import _search_keys, cli, kill_mid_run, pool_args

    # bo_overlap: the next round proposed in the worker while a batch is scored, killed mid-round;
    # bo_ehvi: analytic EHVI, whose memoised hyperparameter fits a resumed process recomputes
    overlap = {"bo_overlap": ["algorithm.overlap=true"], "bo_ehvi": ["algorithm.acquisition=ehvi"]}.get(algorithm, [])
    algorithm = algorithm.removesuffix("_overlap").removesuffix("_ehvi")
    args = [
        *pool_args(test_zoo), f"algorithm={algorithm}", *overlap, "genome=blocks_ta", "genome.n_blocks=2", "algorithm.pop_size=4",
        "search.max_evals=16", "fitness.test_rescore=false", "report.plots=false", "report.html=false",
    ]
    args += ["algorithm.n_init=4", "algorithm.raw_samples=32", "algorithm.num_restarts=1"] if algorithm == "bo" else ["algorithm.nsga_pop=20", "algorithm.nsga_gen=20"]
    reference = tmp_path / "uninterrupted"
    proc = cli(*args, f"hydra.run.dir={reference}", cwd=tmp_path)
    assert "adaptive blocks (2)" in proc.stderr and "served from the references" in proc.stderr
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["budget"]["evaluated"] == 16 and summary["n_evaluated"] == 16
    records = [json.loads(line) for line in (reference / "archive.jsonl").read_text().splitlines()]
    model_rounds = [r for r in records if r["kind"] == "search" and "propose_s" in r.get("extra", {})]
    assert model_rounds and all(r["extra"]["propose_s"] < 60 for r in model_rounds)

    run = tmp_path / "killed"
    kill_mid_run(args, run, tmp_path, after=9)
    before = _search_keys(run)
    assert 9 <= len(before) < 16, "the kill should land mid-run"
    cli(f"resume={run}", cwd=tmp_path)
    after = _search_keys(run)
    assert after[: len(before)] == before and after == _search_keys(reference)

    # anytime: more budget on resume goes on from where the run stopped (the benchmark's
    # budget 48 extends its budget-24 run); bo does not depend on the budget at all, so the
    # extended run is the run started with the larger budget
    proc = cli(f"resume={reference}", "search.max_evals=24", cwd=tmp_path)
    extended = _search_keys(reference)
    assert len(extended) == 24 and extended[:16] == after
    if algorithm == "bo":
        fresh = tmp_path / "fresh24"
        cli(*[a.replace("search.max_evals=16", "search.max_evals=24") for a in args], f"hydra.run.dir={fresh}", cwd=tmp_path)
        assert _search_keys(fresh) == extended
