"""The search loop with a synthetic evaluator: failures, duplicates, archive, checkpoints."""

import math

import numpy as np
import pytest

from evomerge.search.algorithms import GridStrategy, nsga2
from evomerge.search.archive import Archive, Record, genome_key
from evomerge.search.genome import GenomeSpace
from evomerge.search.loop import SearchLoop
from evomerge.search.pareto import hypervolume, nondominated


def space():
    return GenomeSpace(n_experts=2, n_layers=2, methods=("task_arithmetic",), separate_embed_head=False)


def synthetic(recipe):
    """Two conflicting objectives of the TA weights; fails or NaNs in two corners."""
    w0, w1 = recipe.groups[1].params["weight"]
    if w0 > 0.9 and w1 > 0.9:
        raise RuntimeError("CUDA out of memory (simulated)")
    if w0 < 0.05 and w1 < 0.05:
        return {"a": float("nan"), "b": 0.5}, 0.0, 0.0
    return {"a": w0 * (1 - 0.5 * w1), "b": w1 * (1 - 0.5 * w0)}, 0.001, 0.002


def test_failures_are_archived_scored_worst_and_search_goes_on(tmp_path):
    loop = SearchLoop(space(), GridStrategy(pop_size=5), ["a", "b"], tmp_path, max_evals=25, seed=0, progress=False)
    loop.run(synthetic)
    records = Archive(tmp_path / "archive.jsonl").search_records()
    assert len(records) == 25
    failed = [r for r in records if r.error]
    assert any("out of memory" in r.error for r in failed)
    assert any("not finite" in r.error for r in failed)
    assert all(r.losses == [1.0, 1.0] for r in failed)
    assert loop.state.history[-1]["n_failed"] == len(failed)


def test_duplicate_genomes_are_served_from_the_archive(tmp_path):
    calls = []

    def counting(recipe):
        calls.append(recipe)
        return synthetic(recipe)

    loop = SearchLoop(space(), GridStrategy(pop_size=4), ["a", "b"], tmp_path, max_evals=4, seed=0, progress=False)
    x = np.array([0.3, 0.6])
    first = loop.evaluate_genome(x, counting)
    again = loop.evaluate_genome(x + 1e-12, counting)
    assert first is again and len(calls) == 1 and loop.reused == 1


def test_torn_last_line_is_ignored(tmp_path):
    archive = Archive(tmp_path / "archive.jsonl")
    archive.append(Record(0, "search", genome_key([0.1]), [0.1], {}, {"a": 0.5}, [0.5]))
    with (tmp_path / "archive.jsonl").open("a") as f:
        f.write('{"id": 1, "kind": "sea')  # a write cut short by SIGKILL
    assert [r.id for r in Archive(tmp_path / "archive.jsonl").records] == [0]


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    full = SearchLoop(space(), nsga2(pop_size=6), ["a", "b"], tmp_path / "full", max_evals=30, seed=3, progress=False)
    (tmp_path / "full").mkdir(exist_ok=True)
    full.run(synthetic)

    # stop after two generations, then resume in a "new process" from the checkpoint
    part_dir = tmp_path / "part"
    part_dir.mkdir()
    part = SearchLoop(space(), nsga2(pop_size=6), ["a", "b"], part_dir, max_evals=30, seed=3, progress=False)

    class Stop(Exception):
        pass

    def stop_after_two(loop):
        if loop.state.generation == 2:
            raise Stop

    with pytest.raises(Stop):
        part.run(synthetic, on_generation=stop_after_two)
    resumed = SearchLoop(space(), nsga2(pop_size=6), ["a", "b"], part_dir, max_evals=30, seed=3, progress=False)
    assert resumed.state.generation == 2
    resumed.run(synthetic)
    key = lambda d: [(r.key, r.losses) for r in Archive(d / "archive.jsonl").search_records()]  # noqa: E731
    assert key(part_dir) == key(tmp_path / "full")


def test_pareto_helpers():
    F = np.array([[0.2, 0.8], [0.5, 0.5], [0.8, 0.2], [0.6, 0.6], [0.5, 0.5]])
    assert list(nondominated(F)) == [0, 1, 2]
    # staircase area by hand: 0.3*0.2 + 0.3*0.5 + 0.2*0.8
    assert math.isclose(hypervolume(F, np.array([1.0, 1.0])), 0.37)
    assert hypervolume(np.array([[1.5, 0.1]]), np.array([1.0, 1.0])) == 0.0
