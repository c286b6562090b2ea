"""Estimators without a model: multi-fidelity promotion on constructed candidates."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.estimators.base import FitnessContext, Scores
from evomerge.estimators.items import ItemScores
from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
from evomerge.estimators.multifidelity import MultiFidelityEstimator, doc_order, fidelity_levels
from evomerge.search.archive import Archive, Record
from evomerge.search.pareto import nondominated
from evomerge.search.promotion import Interval, could_enter_front, finite_population_se

N = 200


class FakeFitness:
    """Per-item 0/1 correctness of the candidate currently "in the model" (``current``)."""

    def __init__(self, correct: dict[str, np.ndarray]):
        self.correct = correct
        self.tasks = [FitnessTask("a", "task_a", "acc,none"), FitnessTask("b", "task_b", "acc,none")]
        self.groups = {}  # no lm-eval group objectives
        self.scorer = SimpleNamespace(n_docs={t: c.shape[1] for t, c in correct.items()}, aggregation_fn=lambda t, m: np.mean)
        self.current = 0
        self.items_scored = 0

    @property
    def objective_names(self):
        return [t.name for t in self.tasks]

    def score_items(self, ids):
        self.items_scored += sum(len(v) for v in ids.values())
        return ItemScores({t: list(v) for t, v in ids.items()}, {t: {"acc,none": self.correct[t][self.current, list(v)]} for t, v in ids.items()})

    scores_from_items = LmEvalFitness.scores_from_items


def constructed_population(seed: int, n: int = 60):
    """Candidates on and behind a concave trade-off front, with per-item correctness."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, np.pi / 2, n)
    radius = rng.uniform(0.3, 0.95, n)
    p = np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1)
    correct = {t: (rng.random((n, N)) < p[:, [i]]).astype(float) for i, t in enumerate(["task_a", "task_b"])}
    return correct


def run_population(tmp_path, correct, k: float, subset: int = 20):
    fake = FakeFitness(correct)
    ctx = FitnessContext(None, None, fake.tasks, ["a", "b"], subset_size=subset, run_dir=tmp_path)
    est = MultiFidelityEstimator(ctx, k=k, growth=2.0, fitness=fake)
    archive = Archive(tmp_path / "archive.jsonl")
    est.attach(archive)
    n = correct["task_a"].shape[0]
    for i in range(n):
        fake.current = i
        s = est()
        archive.append(Record(i, "search", str(i), [0.0], {}, dict(s), [1 - s["a"], 1 - s["b"]], stderr=s.stderr, fidelity=s.fidelity))
    exact = np.stack([correct["task_a"].mean(1), correct["task_b"].mean(1)], 1)
    exact_front = set(int(i) for i in nondominated(1 - exact))
    return archive, exact, exact_front, fake.items_scored


@pytest.mark.parametrize("seed", range(6))
def test_promotion_never_drops_an_exact_front_candidate(tmp_path, seed):
    archive, exact, exact_front, items = run_population(tmp_path, constructed_population(seed), k=2.0)
    for i in exact_front:
        rec = archive.records[i]
        assert rec.fidelity == {"a": N, "b": N}, f"exact-front candidate {i} stopped at {rec.fidelity}"
        assert [rec.scores["a"], rec.scores["b"]] == pytest.approx(list(exact[i]))
    # the archive's front (highest-fidelity scores) is exactly the exact front
    F = np.array([r.losses for r in archive.records])
    assert set(int(i) for i in nondominated(F)) == exact_front
    assert items < 0.7 * len(archive.records) * 2 * N  # and it is cheaper than exact scoring


def test_without_slack_promotion_does_drop_front_candidates(tmp_path):
    """The check above can fail: with k = 0 exact-front candidates are lost."""
    dropped = 0
    for seed in range(6):
        (tmp_path / str(seed)).mkdir()
        archive, _, exact_front, _ = run_population(tmp_path / str(seed), constructed_population(seed), k=0.0)
        dropped += sum(archive.records[i].fidelity != {"a": N, "b": N} for i in exact_front)
    assert dropped > 0


def test_resume_reuses_the_saved_doc_order(tmp_path):
    correct = constructed_population(0, n=3)
    fake = FakeFitness(correct)
    ctx = FitnessContext(None, None, fake.tasks, ["a", "b"], subset_size=20, subset_seed=0, run_dir=tmp_path)
    first = MultiFidelityEstimator(ctx, fitness=fake)
    saved = json.loads((tmp_path / "fidelity.json").read_text())
    ctx2 = FitnessContext(None, None, fake.tasks, ["a", "b"], subset_size=50, subset_seed=9, run_dir=tmp_path)
    again = MultiFidelityEstimator(ctx2, fitness=fake)
    assert again.order == first.order == saved["order"] and again.levels == first.levels
    assert first.levels["task_a"] == [20, 40, 80, 160, 200]


def test_fidelity_levels_and_order():
    assert fidelity_levels(20, 200, 2.0) == [20, 40, 80, 160, 200]
    assert fidelity_levels(30, 100, 3.0, cap=80) == [30, 80]
    assert fidelity_levels(300, 200, 2.0) == [200]
    with pytest.raises(ConfigError):
        fidelity_levels(20, 200, 1.0)
    order = doc_order(10, 4, 0)
    assert sorted(order) == list(range(10)) and order[:4] == sorted(order[:4])


def test_promotion_rule_by_hand():
    # front point 0.8 +- 0.05 pessimistic 0.75; candidate 0.6 +- 0.1 optimistic 0.7 -> dominated
    front = [Interval(np.array([0.8, 0.8]), np.array([0.05, 0.05]))]
    assert not could_enter_front(Interval(np.array([0.6, 0.6]), np.array([0.1, 0.1])), front)
    # wider candidate interval reaches 0.8 > 0.75 on one objective -> may enter
    assert could_enter_front(Interval(np.array([0.6, 0.6]), np.array([0.2, 0.1])), front)
    # finite-population correction: sqrt(0.25*0.75/20)=0.0968 * sqrt(180/199) = 0.0921; zero at the full split
    assert finite_population_se(0.0968246, 20, 200) == pytest.approx(0.092085, abs=1e-5)
    assert finite_population_se(0.1, 200, 200) == 0.0
    assert finite_population_se(0.0, 18, 200) == pytest.approx(0.05 * np.sqrt(182 / 199))


def test_scores_are_a_dict_with_stderr_and_fidelity():
    s = Scores({"a": 0.5}, {"a": 0.1}, {"a": 20})
    assert s == {"a": 0.5} and s.stderr == {"a": 0.1} and s.fidelity == {"a": 20}


def test_estimator_configs_build_their_targets():
    import inspect
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder = Path(__file__).resolve().parents[1] / "configs" / "fitness" / "estimator"
    names = sorted(p.stem for p in folder.glob("*.yaml"))
    assert names == ["irt", "multifidelity", "subset"]
    for name in names:
        factory = instantiate(OmegaConf.load(folder / f"{name}.yaml"))
        inspect.signature(factory).bind(FitnessContext(None, None, [], []))  # every option is a real parameter


def test_bad_estimator_option_is_a_config_error():
    from omegaconf import OmegaConf

    from evomerge.estimators.build import build_estimator

    node = OmegaConf.create({"_target_": "evomerge.estimators.multifidelity.MultiFidelityEstimator", "_partial_": True, "bogus": 1})
    with pytest.raises(ConfigError, match="invalid fitness.estimator option"):
        build_estimator(node, FitnessContext(None, None, [], []))
    with pytest.raises(ConfigError, match="must be a config with a _target_"):
        build_estimator(OmegaConf.create({"k": 1}), FitnessContext(None, None, [], []))


def test_archives_without_stderr_or_fidelity_still_load(tmp_path):
    line = {"id": 0, "kind": "search", "key": "k", "genome": [0.1], "recipe": {}, "scores": {"a": 0.5}, "losses": [0.5]}
    (tmp_path / "archive.jsonl").write_text(json.dumps(line) + "\n")
    rec = Archive(tmp_path / "archive.jsonl").records[0]
    assert rec.stderr == {} and rec.fidelity == {} and rec.scores == {"a": 0.5}


def test_front_separability_marks_overlapping_neighbours():
    from evomerge.search.report import separable_from_neighbours

    def rec(i, a, b, se):
        return Record(i, "search", str(i), [0.0], {}, {"a": a, "b": b}, [1 - a, 1 - b], stderr={"a": se, "b": se})

    # 0 and 1 differ by 0.05 in a and b; 2 SE combined = 2 * hypot(0.03, 0.03) = 0.0849 -> not separable
    # 2 is 0.3 away from 1 -> separable from its only neighbour
    front = [rec(0, 0.2, 0.9, 0.03), rec(1, 0.25, 0.85, 0.03), rec(2, 0.55, 0.55, 0.03)]
    assert separable_from_neighbours(front, ["a", "b"]) == [False, False, True]
    exact = [rec(0, 0.2, 0.9, 0.0), rec(1, 0.25, 0.85, 0.0)]
    assert separable_from_neighbours(exact, ["a", "b"]) == [True, True]


def test_multifidelity_search_resumes_to_the_same_archive(tmp_path):
    """A multi-fidelity search killed after a generation and resumed ends with the archive
    (scores, fidelities) of an uninterrupted one."""
    from evomerge.search.algorithms import nsga2
    from evomerge.search.genome import GenomeSpace
    from evomerge.search.loop import SearchLoop

    space = GenomeSpace(n_experts=2, n_layers=2, methods=("task_arithmetic",), separate_embed_head=False)

    def make(run_dir):
        fake = FakeFitness({"task_a": np.zeros((1, N)), "task_b": np.zeros((1, N))})
        ctx = FitnessContext(None, None, fake.tasks, ["a", "b"], subset_size=20, run_dir=run_dir)
        est = MultiFidelityEstimator(ctx, k=2.0, fitness=fake)

        def evaluate(recipe):
            w0, w1 = recipe.groups[1].params["weight"]
            p = [w0 * (1 - 0.5 * w1), w1 * (1 - 0.5 * w0)]
            rng = np.random.default_rng(int(1e6 * w0) * 7 + int(1e6 * w1))
            for t, pt in zip(["task_a", "task_b"], p):
                fake.correct[t] = (rng.random((1, N)) < max(0.0, min(1.0, pt))).astype(float)
            return est(), 0.0, 0.0

        return est, evaluate

    def loop_for(run_dir):
        return SearchLoop(space, nsga2(pop_size=6), ["a", "b"], run_dir, max_evals=24, seed=0, progress=False)

    (tmp_path / "whole").mkdir()
    est, evaluate = make(tmp_path / "whole")
    loop = loop_for(tmp_path / "whole")
    est.attach(loop.archive)
    loop.run(evaluate)

    class Killed(Exception):
        pass

    def kill(lp):
        if lp.state.generation == 2:
            raise Killed

    (tmp_path / "killed").mkdir()
    est, evaluate = make(tmp_path / "killed")
    loop = loop_for(tmp_path / "killed")
    est.attach(loop.archive)
    with pytest.raises(Killed):
        loop.run(evaluate, on_generation=kill)
    est, evaluate = make(tmp_path / "killed")  # a fresh process: order from fidelity.json, front from the archive
    loop = loop_for(tmp_path / "killed")
    est.attach(loop.archive)
    loop.run(evaluate)

    def summary(path):
        return [(r.key, r.scores, r.fidelity) for r in Archive(path / "archive.jsonl").records]

    whole = summary(tmp_path / "whole")
    assert len(whole) == 24 and whole == summary(tmp_path / "killed")
    assert {max(r[2].values()) for r in whole} > {20}  # some were promoted, some not
    assert min(min(r[2].values()) for r in whole) == 20
