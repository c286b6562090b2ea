"""lm-eval fitness on a small trained zoo; fitness data files; task lookup."""

from pathlib import Path

import pytest

from evomerge.errors import ConfigError
from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness, choose_subset
from evomerge.estimators.tasks import find_tasks, packaged_task_dir
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import ModelPool
from evomerge.zoo.tasks import SKILLS, SPLITS, fitness_records, write_fitness_data

TASKS = [
    FitnessTask("math", "toy_math", "exact_match,first-number"),
    FitnessTask("lang", "toy_lang", "acc,none"),
]


@pytest.fixture(scope="module")
def zoo_merger(test_zoo):
    pool = ModelPool(test_zoo.base, {k: v for k, v in test_zoo.experts.items()})
    return Merger(pool, device="cpu")


@pytest.fixture(scope="module")
def fitness(zoo_merger):
    return LmEvalFitness(zoo_merger.model, zoo_merger.tokenizer, TASKS, subset_size=80, batch_size=64, max_length=64)


def score(merger, fitness, weights):
    merger.apply(Recipe.uniform("task_arithmetic", {"weight": weights}, merger.n_layers))
    return fitness()


def test_experts_win_their_own_task(zoo_merger, fitness):
    math_expert = score(zoo_merger, fitness, [1.0, 0.0])
    lang_expert = score(zoo_merger, fitness, [0.0, 1.0])
    base = score(zoo_merger, fitness, [0.0, 0.0])
    assert math_expert["math"] > lang_expert["math"]
    assert math_expert["math"] > base["math"]
    assert lang_expert["lang"] > math_expert["lang"] + 0.3
    assert lang_expert["lang"] > base["lang"]


def test_same_process_rescoring_follows_the_weights(zoo_merger, fitness):
    """No stale cache: scoring expert, other expert, then the first again."""
    first = score(zoo_merger, fitness, [0.0, 1.0])
    other = score(zoo_merger, fitness, [1.0, 0.0])
    again = score(zoo_merger, fitness, [0.0, 1.0])
    assert first != other
    assert first == again


def test_subset_is_fixed_sorted_and_seeded(zoo_merger, fitness):
    assert all(ids == sorted(ids) and len(ids) == 80 for ids in fitness.subset.values())
    assert choose_subset(200, 80, 0) == choose_subset(200, 80, 0)
    assert choose_subset(200, 80, 0) != choose_subset(200, 80, 1)
    assert choose_subset(50, 80, 0) == list(range(50))
    same = LmEvalFitness(zoo_merger.model, zoo_merger.tokenizer, TASKS, subset_size=80, batch_size=64, max_length=64)
    assert same.subset == fitness.subset


def test_test_split_scores_differ_from_validation(zoo_merger, fitness):
    test = LmEvalFitness(zoo_merger.model, zoo_merger.tokenizer, TASKS, split="test", batch_size=64, max_length=64)
    assert all(len(v) == SPLITS["test"] for v in test.subset.values())
    zoo_merger.apply(Recipe.uniform("task_arithmetic", {"weight": [0.0, 1.0]}, zoo_merger.n_layers))
    assert 0.0 <= test()["lang"] <= 1.0


def test_tasks_resolve_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = find_tasks(["toy_math"])["toy_math"].for_split("validation")
    for path in cfg["dataset_kwargs"]["data_files"].values():
        assert Path(path).is_absolute() and Path(path).is_file()
    assert cfg["test_split"] == "validation"


def test_unknown_task_and_metric_are_clear_errors(zoo_merger):
    with pytest.raises(ConfigError, match="fitness task 'toy_nope' not found"):
        find_tasks(["toy_nope"])
    with pytest.raises(ConfigError, match="no split named 'dev'"):
        find_tasks(["toy_math"])["toy_math"].for_split("dev")
    bad = LmEvalFitness(zoo_merger.model, zoo_merger.tokenizer, [FitnessTask("m", "toy_math", "accuracy")], subset_size=4, batch_size=8, max_length=64)
    with pytest.raises(ConfigError, match="has no metric 'accuracy'; available: exact_match,first-number"):
        bad()


def test_committed_fitness_data_matches_generator(tmp_path):
    """The shipped jsonl files are exactly what the seeded generator writes."""
    write_fitness_data(tmp_path)
    shipped = packaged_task_dir() / "data"
    for skill in SKILLS:
        for split in SPLITS:
            name = f"toy_{skill}_{split}.jsonl"
            assert (tmp_path / name).read_text() == (shipped / name).read_text(), name


def test_splits_are_disjoint():
    for skill in SKILLS:
        prompts = [{r["question"] for r in fitness_records(skill, s)} for s in SPLITS]
        assert sum(map(len, prompts)) == len(set().union(*prompts))


# ---------------------------------------------------------------- fast path, standard errors


@pytest.mark.parametrize("weights", [[1.0, 0.0], [0.4, 0.7]])
def test_prebuilt_requests_score_exactly_like_evaluator_evaluate(zoo_merger, fitness, weights):
    """Requests built once and reused give the harness's scores on the same weights,
    also after evaluate() rebuilt the tasks' own instances in between."""
    zoo_merger.apply(Recipe.uniform("task_arithmetic", {"weight": weights}, zoo_merger.n_layers))
    fast = fitness()
    slow = fitness.evaluate_with_harness()
    assert dict(fast) == slow
    assert dict(fitness()) == slow
    assert fast.fidelity == {"math": 80, "lang": 80}


def test_item_scores_follow_the_requested_ids(zoo_merger, fitness):
    zoo_merger.apply(Recipe.uniform("task_arithmetic", {"weight": [0.0, 1.0]}, zoo_merger.n_layers))
    ids = {"toy_math": [5, 1, 9], "toy_lang": [3, 0]}
    items = fitness.score_items(ids)
    assert items.ids == ids
    whole = fitness.score_items({"toy_math": list(range(10)), "toy_lang": list(range(4))})
    assert list(items.values["toy_lang"]["acc,none"]) == list(whole.values["toy_lang"]["acc,none"][[3, 0]])
    assert list(items.values["toy_math"]["exact_match,first-number"]) == list(
        whole.values["toy_math"]["exact_match,first-number"][[5, 1, 9]]
    )


def test_standard_errors_binomial_and_bootstrap():
    from evomerge.estimators.items import standard_error

    # 3 of 4 right: sqrt(0.75 * 0.25 / 4) = 0.21650635
    assert standard_error([1, 1, 0, 1]) == pytest.approx(0.21650635, abs=1e-8)
    assert standard_error([1, 1, 1, 1]) == 0.0
    # non-binary items: bootstrap over items approximates std / sqrt(n)
    values = [0.0, 0.5, 1.0, 0.25] * 25  # std (ddof=0) 0.3750 over 100 items -> 0.0375
    assert standard_error(values, iters=2000) == pytest.approx(0.0375, rel=0.08)
