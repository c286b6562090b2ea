"""experiments/estimators/replay.py: estimators answered from one full-split scoring per merge
must see the same per-item values as live scoring, and the cache must survive a restart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import ModelPool

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "estimators" / "replay.py"
TASKS = [FitnessTask("math", "toy_math", "exact_match,first-number"), FitnessTask("lang", "toy_lang", "acc,none")]


def load_replay():
    spec = importlib.util.spec_from_file_location("replay", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def merger(test_zoo):
    return Merger(ModelPool(test_zoo.base, dict(test_zoo.experts)), device="cpu")


def test_replayed_items_equal_live_scoring_and_the_cache_reloads(merger, tmp_path):
    replay = load_replay()
    live = LmEvalFitness(merger.model, merger.tokenizer, TASKS, subset_size=None, batch_size=64, max_length=64)
    subset = LmEvalFitness(merger.model, merger.tokenizer, TASKS, subset_size=30, subset_seed=3, batch_size=8, max_length=64)
    table = replay.ItemTable(live, tmp_path / "items.jsonl")
    wrapped = replay.ReplayMerger(merger, table)
    view = replay.ReplayFitness(table, subset.subset)
    recipes = [Recipe.uniform("task_arithmetic", {"weight": w}, merger.n_layers) for w in ([0.7, 0.2], [0.1, 0.9])]
    for recipe in recipes:
        wrapped.apply(recipe)
        # live: 30 docs in batches of 8; replayed: the same docs cut out of one 200-doc pass
        assert view() == subset(), "an item's answer must not depend on its batch"
        got, want = view.score_items(), subset.score_items()
        for task in want.ids:
            assert got.ids[task] == want.ids[task]
            for metric, values in want.values[task].items():
                np.testing.assert_array_equal(got.values[task][metric], values)
    assert table.items_served == 2 * 2 * 60
    assert len((tmp_path / "items.jsonl").read_text().splitlines()) == 2

    class NoLiveScoring:  # a reloaded table must answer from its cache alone
        tasks, scorer = live.tasks, live.scorer

        def score_items(self, ids):
            raise AssertionError("scored live although cached")

    reloaded = replay.ItemTable(NoLiveScoring(), tmp_path / "items.jsonl")
    replay.ReplayMerger(merger, reloaded).apply(recipes[0])
    merger.apply(recipes[0])
    np.testing.assert_array_equal(reloaded.items(subset.subset).values["toy_math"]["exact_match,first-number"],
                                  subset.score_items().values["toy_math"]["exact_match,first-number"])


def test_a_torn_cache_line_is_skipped(merger, tmp_path):
    replay = load_replay()
    live = LmEvalFitness(merger.model, merger.tokenizer, TASKS[:1], subset_size=None, batch_size=64, max_length=64)
    table = replay.ItemTable(live, tmp_path / "items.jsonl")
    recipe = Recipe.uniform("task_arithmetic", {"weight": [0.5, 0.5]}, merger.n_layers)
    replay.ReplayMerger(merger, table).apply(recipe)
    with (tmp_path / "items.jsonl").open("a") as f:
        f.write('{"key": "torn", "seco')
    again = replay.ItemTable(live, tmp_path / "items.jsonl")
    assert list(again.entries) == [replay.recipe_key(recipe)]
