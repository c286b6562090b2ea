"""Staged search: budget split, the front carried into the next genome, end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.search.archive import Record
from evomerge.search.genome import GenomeSpace
from evomerge.search.stages import carry_front, plan_stages, uniform_recipe

GENOME = {"methods": ["task_arithmetic", "ties"], "layer_groups": 2, "separate_embed_head": True}


def test_plan_splits_the_budget_and_the_last_stage_takes_the_rest():
    stages = plan_stages(GENOME, [{"name": "coarse", "fraction": 0.34, "genome": {"layer_groups": 1}}, {"name": "fine"}], 50)
    assert [(s.name, s.evals) for s in stages] == [("coarse", 17), ("fine", 33)]
    assert stages[0].genome["layer_groups"] == 1 and stages[1].genome == GENOME
    assert stages[0].checkpoint == "checkpoint.pkl" and stages[1].checkpoint == "checkpoint.fine.pkl"
    (single,) = plan_stages(GENOME, None, 50)
    assert single.evals == 50 and single.checkpoint == "checkpoint.pkl"


@pytest.mark.parametrize(
    "stages, message",
    [
        ([{"fraction": 1.5}, {}], "fraction must be a number in"),
        ([{"fraction": 0.5, "oops": 1}, {}], "unknown key 'oops'"),
        ([{"name": "a", "fraction": 0.5}, {"name": "a"}], "unique"),
        ([{"fraction": 0.001}, {}], "gets no evaluations"),
    ],
)
def test_bad_stage_configs_are_one_line_errors(stages, message):
    with pytest.raises(ConfigError, match=message):
        plan_stages(GENOME, stages, 50)


def record(i: int, losses: list[float], recipe: dict) -> Record:
    return Record(id=i, kind="search", key=str(i), genome=None, recipe=recipe, scores={}, losses=losses)


def test_front_of_a_modelwise_stage_is_re_expressed_layerwise():
    coarse = GenomeSpace(n_experts=2, n_layers=4, methods=("task_arithmetic", "ties"), layer_groups=1, separate_embed_head=False)
    fine = GenomeSpace(n_experts=2, n_layers=4, methods=("task_arithmetic", "ties"), layer_groups=2, split_attn_mlp=True)
    x_good = coarse.encode_uniform("task_arithmetic", {"weight": [0.8, 0.4]})
    x_bad = coarse.encode_uniform("task_arithmetic", {"weight": [0.1, 0.1]})
    records = [
        record(0, [0.2, 0.5], coarse.decode(x_good).to_dict()),
        record(1, [0.6, 0.6], coarse.decode(x_bad).to_dict()),  # dominated: not carried
    ]
    carried = carry_front(records, fine)
    assert carried.shape == (1, fine.n_var)
    groups = fine.decode(carried[0]).groups
    assert len(groups) == 6 and all(g.method == "task_arithmetic" and g.params["weight"] == [0.8, 0.4] for g in groups)
    # a layer-wise recipe is not uniform and cannot be re-expressed model-wise
    mixed = fine.decode(np.linspace(0, 1, fine.n_var)).to_dict()
    assert uniform_recipe(mixed) is None


@pytest.mark.slow
def test_staged_search_end_to_end(test_zoo, tmp_path):
    run = tmp_path / "run"
    args = [
        "modelpool=paths", "fitness=toy", f"modelpool.base={test_zoo.base}", *(f"+modelpool.experts.{k}={v}" for k, v in test_zoo.experts.items()),
        "device=cpu", "fitness.subset_size=8", "fitness.extra=[]", "fitness.test_rescore=false", "algorithm.pop_size=4",
        "search.max_evals=12", "genome=layerwise_ties",
        "search.stages=[{name: modelwise, fraction: 0.34, genome: {layer_groups: 1, split_attn_mlp: false, separate_embed_head: false}}, {name: layerwise}]",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "stage layerwise: starting from" in proc.stderr
    assert (run / "checkpoint.pkl").is_file() and (run / "checkpoint.layerwise.pkl").is_file()
    lines = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines()]
    search = [r for r in lines if r["kind"] == "search"]
    lengths = {len(r["genome"]) for r in search}
    assert len(lengths) == 2  # genomes of both stages
    assert len(search) <= 12
    # resuming a finished staged run evaluates nothing more
    again = subprocess.run([sys.executable, "-m", "evomerge", f"resume={run}"], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert len((run / "archive.jsonl").read_text().splitlines()) == len(lines)


def test_a_stage_can_bring_its_own_algorithm():
    grid = {"_target_": "evomerge.search.algorithms.grid", "_partial_": True, "pop_size": 16}
    stages = plan_stages(GENOME, [{"name": "grid", "fraction": 0.34, "algorithm": grid}, {"name": "fine"}], 48)
    assert stages[0].algorithm == grid and stages[1].algorithm is None
    with pytest.raises(ConfigError, match="algorithm must be an algorithm config"):
        plan_stages(GENOME, [{"fraction": 0.5, "algorithm": "grid"}, {}], 48)
