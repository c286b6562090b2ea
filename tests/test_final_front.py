"""The final front (confirmation on fresh validation items) and the automatic block count."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.blocks import auto_block_count, segmentation_costs
from evomerge.search.confirm import ConfirmSettings, confirmation_candidates, final_front, noise_margin
from evomerge.session import check_n_blocks, genome_layer_ranges


@dataclass
class Rec:  # an archive record as the final front reads it
    id: int
    scores: dict
    stderr: dict = field(default_factory=dict)
    error: str | None = None
    fidelity: dict = field(default_factory=dict)


# ---------------------------------------------------------------- confirmation


def test_noise_margin_is_how_clearly_another_candidate_beats_one_on_every_objective():
    scores = np.array([[0.9, 0.5], [0.5, 0.9], [0.4, 0.4], [0.88, 0.49]])
    stderr = np.full_like(scores, 0.05)
    margin = noise_margin(scores, stderr)
    assert margin[0] < 0 and margin[1] < 0  # the front: nothing beats them on both
    # #2 is beaten by #0 by (0.5, 0.1) -> 0.1 / (0.05 * sqrt 2) on its weaker objective
    assert margin[2] == pytest.approx(0.1 / (0.05 * np.sqrt(2)))
    assert margin[3] == pytest.approx(0.01 / (0.05 * np.sqrt(2)))  # within noise of #0


def test_candidates_are_the_front_and_those_within_z_standard_errors_least_dominated_first():
    recs = [Rec(0, {"a": 0.9, "b": 0.5}), Rec(1, {"a": 0.5, "b": 0.9}), Rec(2, {"a": 0.4, "b": 0.4}),
            Rec(3, {"a": 0.88, "b": 0.49}), Rec(4, {"a": 0.87, "b": 0.45}), Rec(5, {"a": 0.99, "b": 0.99}, error="failed")]
    for r in recs:
        r.stderr = {"a": 0.05, "b": 0.05}
    chosen = [r.id for r in confirmation_candidates(recs, ["a", "b"], ConfirmSettings(z=1.0, max_points=16))]
    assert set(chosen[:2]) == {0, 1} and chosen[2:] == [3, 4]  # the front first; #2 clearly dominated, the failed one never
    assert [r.id for r in confirmation_candidates(recs, ["a", "b"], ConfirmSettings(z=1.0, max_points=3))][2:] == [3]
    assert {r.id for r in confirmation_candidates(recs, ["a", "b"], ConfirmSettings(z=0.0, max_points=16))} == {0, 1}


def test_without_standard_errors_only_the_front_is_confirmed():
    recs = [Rec(0, {"a": 0.9, "b": 0.5}), Rec(1, {"a": 0.5, "b": 0.9}), Rec(2, {"a": 0.89, "b": 0.49})]
    assert [r.id for r in confirmation_candidates(recs, ["a", "b"], ConfirmSettings())] == [0, 1]


def test_the_final_front_is_chosen_on_the_fresh_scores_only():
    recs = [Rec(0, {"a": 0.9, "b": 0.5}), Rec(1, {"a": 0.5, "b": 0.9}), Rec(3, {"a": 0.88, "b": 0.49})]
    # fresh items: #0 was lucky on its subset, #3 is better on both
    fresh = {0: {"a": 0.80, "b": 0.45}, 1: {"a": 0.5, "b": 0.88}, 3: {"a": 0.86, "b": 0.50}}
    assert final_front(recs, fresh, ["a", "b"]) == [1, 3]


# ---------------------------------------------------------------- automatic blocks


def two_regimes(n_layers: int = 8) -> np.ndarray:
    half = n_layers // 2
    return np.array([[1.0, 0.05]] * half + [[0.05, 1.0]] * (n_layers - half))


def test_a_flat_profile_is_one_block():
    count, why = auto_block_count(np.ones((8, 2)), budget=480)
    assert count == 1 and why["explained"][0] == 1.0


def test_two_regimes_are_two_blocks_and_three_are_three():
    assert auto_block_count(two_regimes(8), budget=480)[0] == 2
    three = np.array([[1.0, 0.05, 0.05]] * 4 + [[0.05, 1.0, 0.05]] * 4 + [[0.05, 0.05, 1.0]] * 4)
    count, why = auto_block_count(three, budget=480)
    assert count == 3 and why["explained"][2] >= 0.9 > why["explained"][1]


def test_the_budget_caps_the_genes_and_the_layers_cap_the_blocks():
    three = np.array([[1.0, 0.05]] * 3 + [[0.05, 1.0]] * 3 + [[1.0, 1.0]] * 3 + [[0.3, 0.1]] * 3)
    capped, why = auto_block_count(three, budget=12)  # 12 / 6 = 2 genes: one block of 2 experts
    assert capped == 1 and why["limited_by"] == "budget" and why["max_blocks"] == 1
    small = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    count, why = auto_block_count(small, budget=10_000)
    assert count <= 3 and why["max_blocks"] == 3 and why["limited_by"] == "layers"
    costs = segmentation_costs(small, 3)
    assert costs[-1] == pytest.approx(0.0) and all(a >= b - 1e-12 for a, b in zip(costs, costs[1:]))


class FakeMerger:
    def __init__(self, norms):
        self.norms, self.n_layers = np.asarray(norms), len(norms)

    def layer_task_vector_norms(self):
        return self.norms


def test_auto_blocks_are_recorded_and_a_resume_keeps_the_recorded_ones(capsys):
    merger = FakeMerger(two_regimes(8))
    ranges = genome_layer_ranges({"blocks": "adaptive", "n_blocks": "auto"}, merger, budget=48)
    assert ranges == [(0, 3), (4, 7)]
    assert merger.resolved_blocks["n_blocks"] == 2 and merger.resolved_blocks["setting"] == "auto"
    assert merger.resolved_blocks["auto"]["rule"].startswith("fewest blocks explaining")
    # a resume uses what config.yaml recorded (even if this version would cut elsewhere), and says so
    recorded = {"setting": "auto", "n_blocks": 2, "blocks": [[0, 2], [3, 7]]}
    other = FakeMerger(two_regimes(8))
    assert genome_layer_ranges({"blocks": "adaptive", "n_blocks": "auto"}, other, budget=48, recorded=recorded) == [(0, 2), (3, 7)]
    assert "the run keeps its recorded blocks" in capsys.readouterr().err
    # a recorded set for another setting is not used
    assert genome_layer_ranges({"blocks": "adaptive", "n_blocks": 4}, FakeMerger(two_regimes(8)), budget=48, recorded=recorded) != [(0, 2), (3, 7)]


def test_n_blocks_above_the_layer_count_is_refused_not_capped():
    with pytest.raises(ConfigError, match="genome.n_blocks must be between 1 and the model's 8 layers, got 9"):
        genome_layer_ranges({"blocks": "adaptive", "n_blocks": 9}, FakeMerger(two_regimes(8)), budget=48)
    assert check_n_blocks("auto") == "auto" and check_n_blocks(3, 8) == 3


@pytest.mark.slow
def test_a_run_stopped_while_confirming_resumes_to_the_same_final_front(tmp_path):
    """The state a kill inside the final-front confirmation leaves (the search done, some
    candidates confirmed, the last line torn, no summary): the resume keeps what was confirmed,
    scores the rest, and ends with the uninterrupted run's front (three objectives)."""
    import json
    import shutil
    import subprocess
    import sys

    args = [sys.executable, "-m", "evomerge", "+experiment=toy_k3", "modelpool.size=tiny", "device=cpu", "algorithm=random",
            "genome=blocks_ta", "algorithm.pop_size=4", "search.max_evals=12", "fitness.subset_size=6", "fitness.batch_size=8",
            "fitness.test_rescore=false", "report.html=false", "report.plots=false", "search.progress=false"]
    reference = tmp_path / "uninterrupted"
    subprocess.run([*args, f"hydra.run.dir={reference}"], check=True, capture_output=True, timeout=900)
    confirmed = (reference / "confirmation.jsonl").read_text().splitlines()
    assert len(confirmed) >= 2, "the run should confirm more than one candidate"

    run = tmp_path / "stopped"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("run.lock", "summary.json", "pareto_front.*", "recipes"))
    (run / "confirmation.jsonl").write_text(confirmed[0] + "\n" + confirmed[1][: len(confirmed[1]) // 2])  # one done, one torn
    proc = subprocess.run([sys.executable, "-m", "evomerge", f"resume={run}"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("final front: confirming") == len(confirmed) - 1  # the first one was kept
    a, b = json.loads((reference / "summary.json").read_text()), json.loads((run / "summary.json").read_text())
    assert a["front"] == b["front"] and a["final_front"] == b["final_front"] and a["chosen"] == b["chosen"]
    assert (run / "confirmation.jsonl").read_text().splitlines() == confirmed  # the torn line cut, nothing twice


@pytest.mark.slow
def test_a_finished_run_can_be_finished_again_with_another_final_front(tmp_path):
    """experiments/benchmark/refinish.py: the same search, finished with fitness.final_front=pooled
    in a copy: nothing of the search or the confirmation is evaluated again."""
    import importlib.util
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = tmp_path / "runs"
    run = root / "toy" / "default" / "8" / "seed-0"
    subprocess.run([sys.executable, "-m", "evomerge", "modelpool.size=tiny", "device=cpu", "algorithm=random", "algorithm.pop_size=4",
                    "genome=modelwise_ta", "search.max_evals=8", "fitness.subset_size=6", "fitness.extra=[]", "fitness.test_rescore=front",
                    "report.html=false", "report.plots=false", "search.progress=false", f"hydra.run.dir={run}"], check=True, capture_output=True, timeout=900)
    script = Path(__file__).resolve().parents[1] / "experiments" / "benchmark" / "refinish.py"
    spec = importlib.util.spec_from_file_location("refinish", script)
    refinish = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refinish)
    (copy,) = refinish.refinish(root, "pooled", ["toy"], None, None)
    assert copy == tmp_path / "runs-pooled" / "toy" / "default" / "8" / "seed-0"
    assert (copy / "archive.jsonl").read_text() == (run / "archive.jsonl").read_text()
    assert (copy / "confirmation.jsonl").read_text() == (run / "confirmation.jsonl").read_text()
    summary = json.loads((copy / "summary.json").read_text())
    assert summary["final_front"]["estimate"] == "pooled" and all(p["chosen_by"] == "pooled" for p in summary["front"])
    assert all(f"front:{p['id']}" in summary["test"] for p in summary["front"])
    original = json.loads((run / "summary.json").read_text())
    assert original["final_front"]["search_front"] == summary["final_front"]["search_front"]
    assert refinish.refinish(root, "pooled", ["toy"], None, None) == [copy]  # finished copies are skipped


def test_pooled_scores_weigh_the_search_and_fresh_items_by_their_counts():
    from evomerge.search.confirm import pooled_scores

    rec = Rec(1, {"a": 0.9, "b": 0.5})
    rec.fidelity = {"a": 100, "b": 40}
    fresh = {"a": 0.8, "b": 0.8}
    pooled = pooled_scores(rec, fresh, ["a", "b"], {"a": 100, "b": 60})
    assert pooled["a"] == pytest.approx(0.85) and pooled["b"] == pytest.approx((40 * 0.5 + 60 * 0.8) / 100)
    rec.fidelity = {}
    assert pooled_scores(rec, fresh, ["a", "b"], {"a": 100, "b": 60}) == {"a": 0.8, "b": 0.8}  # no count: the fresh score


def test_the_seed_4_collapse_is_what_pooling_avoids():
    """Candidates whose first objective differs by noise only: on 100 fresh items one candidate
    dominates all but one; on the 200 pooled items the trade-off front stays (the shape of the
    benchmark's seed 4, PROTOCOL.md amendment of 2026-12-07)."""
    from evomerge.search.confirm import pooled_scores

    search = {15: (0.91, 1.0), 46: (0.96, 0.80), 41: (0.95, 0.85), 21: (1.0, 0.25)}
    fresh = {15: (0.94, 0.98), 46: (0.94, 0.76), 41: (0.93, 0.83), 21: (0.97, 0.30)}
    recs = []
    for i, (a, b) in search.items():
        r = Rec(i, {"math": a, "lang": b})
        r.fidelity = {"math": 100, "lang": 100}
        recs.append(r)
    by_fresh = {i: {"math": a, "lang": b} for i, (a, b) in fresh.items()}
    assert sorted(final_front(recs, by_fresh, ["math", "lang"])) == [15, 21]
    pooled = {r.id: pooled_scores(r, by_fresh[r.id], ["math", "lang"], {"math": 100, "lang": 100}) for r in recs}
    assert sorted(final_front(recs, pooled, ["math", "lang"])) == [15, 21, 41, 46]
