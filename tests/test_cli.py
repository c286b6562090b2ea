"""The CLI end to end, in subprocesses: search, outputs, export, kill + resume, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.search.archive import Archive

from conftest import kill_when_searched

pytestmark = pytest.mark.slow


def cli(*args: str, cwd: Path, check: bool = True, wait: bool = True, timeout: int = 300):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-m", "evomerge", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"evomerge {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def pool_args(zoo) -> list[str]:
    return [
        "modelpool=paths",
        "fitness=toy",  # the zoo as plain folders: still scored on the toy tasks
        f"modelpool.base={zoo.base}",
        *(f"+modelpool.experts.{k}={v}" for k, v in zoo.experts.items()),
        "device=cpu",
        "fitness.subset_size=24",
        "fitness.extra=[]",
    ]


def kill_mid_run(args: list[str], run: Path, cwd: Path, after: int, timeout: float = 240) -> None:
    """Start a search and SIGKILL it once ``after`` search candidates are archived (or it ended)."""
    proc = cli(*args, f"hydra.run.dir={run}", cwd=cwd, wait=False)
    kill_when_searched(proc, run, after, timeout)
    proc.wait()


def test_search_end_to_end_and_export(test_zoo, tmp_path):
    run = tmp_path / "run"
    # the default search (BO over adaptive blocks); a layer_groups it does not use is named, not silently dropped
    proc = cli(*pool_args(test_zoo), "search.max_evals=24", "algorithm.pop_size=8", "genome.layer_groups=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "done: 24 candidates" in proc.stdout  # the budget counts evaluations: exactly 24 new ones
    assert "adaptive blocks (" in proc.stderr and "(genome.layer_groups=2 is not used: genome.blocks=uniform for equal blocks)" in proc.stderr
    assert "| evals   24/24" in proc.stderr  # progress display
    assert "warm start: base, expert:math, expert:lang" in proc.stderr and "served from the references" in proc.stderr
    assert "test re-score 1/" in proc.stderr and "references: scoring base" in proc.stderr
    log = (run / "run.log").read_text()  # the progress lines are in the run's log too
    assert "| evals   24/24" in log and "warm start:" in log and "test re-score 1/" in log
    assert "done: 24 candidates" in log and "front chosen by pooled" in log  # the final summary too
    for name in ("config.yaml", "archive.jsonl", "checkpoint.pkl", "subset.json", "pareto_front.csv", "pareto_front.json", "summary.json", "front.png", "progress.png",
                 "environment.json"):
        assert (run / name).is_file(), name
    environment = json.loads((run / "environment.json").read_text())
    assert environment["versions"]["torch"] and environment["dtype"] == "float32" and environment["device"] == "cpu"
    assert environment["models"]["pool_digest"] == json.loads((test_zoo.root / "zoo.json").read_text())["digest"]
    for name in ("best_math.yaml", "best_lang.yaml", "knee.yaml"):
        assert (run / "recipes" / name).is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["references"]) == {"base", "expert:math", "expert:lang"}
    assert summary["references"]["expert:lang"]["lang"] > summary["references"]["expert:math"]["lang"]
    assert set(summary["test"]) >= {"base", "knee", "best_math"}
    assert summary["budget"]["evaluated"] == 24 and summary["budget"]["ended_early"] is None
    assert summary["budget"]["served_from_archive"] >= 3  # at least the warm start's base and experts
    # where the time went, the proposals' wait included
    times = summary["time_s"]
    assert times["eval_s"] > 0 and times["proposal_wait_s"] > 0 and 0 < times["proposal_wait_share"] < 1
    # the final front: chosen on fresh validation items, each point saying so
    assert summary["final_front"]["estimate"] == "pooled" and summary["final_front"]["search_front"]
    assert all(p["chosen_by"] == "pooled" and "search_scores" in p for p in summary["front"])
    assert len(summary["hypervolume_history"]) >= 3
    hv = [h["hypervolume"] for h in summary["hypervolume_history"]]
    assert hv == sorted(hv)  # the archive front never loses volume

    out = tmp_path / "exported"
    cli("export", f"run={run}", "point=knee", f"out={out}", cwd=tmp_path)
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out)) is not None
    assert (out / "evomerge_recipe.yaml").is_file()


def _search_keys(run: Path) -> list[tuple[str, tuple]]:
    return [(r.key, tuple(r.losses)) for r in Archive(run / "archive.jsonl").search_records()]


def test_killed_run_resumes_without_reevaluating(test_zoo, tmp_path):
    args = [*pool_args(test_zoo), "search.max_evals=40", "algorithm.pop_size=8", "fitness.test_rescore=false", "report.plots=false"]
    reference = tmp_path / "uninterrupted"
    cli(*args, f"hydra.run.dir={reference}", cwd=tmp_path)

    run = tmp_path / "killed"
    kill_mid_run(args, run, tmp_path, after=13)
    before = _search_keys(run)
    assert 13 <= len(before) < 40, "the kill should land mid-run"

    resumed = cli(f"resume={run}", cwd=tmp_path)
    expected = len(_search_keys(reference))  # 40 unless the search ran out of new candidates (then it says so)
    assert f"done: {expected} candidates" in resumed.stdout
    assert "resumes" not in json.loads((run / "environment.json").read_text())  # same machine and versions: the first record only
    after = _search_keys(run)
    assert after[: len(before)] == before  # nothing lost
    keys = [k for k, _ in after]
    assert len(keys) == len(set(keys)) == expected  # nothing evaluated twice
    assert after == _search_keys(reference)  # same result as the uninterrupted run
    assert json.loads((run / "pareto_front.json").read_text())["front"] == json.loads((reference / "pareto_front.json").read_text())["front"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm=simulated_annealing"], "Could not find 'algorithm/simulated_annealing'"),
        (["search.max_evals=lots"], "search.max_evals must be an integer, got 'lots'"),
        (["modelpool=paths", "modelpool.base=/no/such/model", "+modelpool.experts.a=/no/such/expert"], "model 'base': path does not exist: /no/such/model"),
        (["modelpool=paths"], "modelpool.base must be set"),
        (["resume=/no/such/run"], "cannot resume: /no/such/run/config.yaml not found"),
    ],
)
def test_bad_overrides_give_one_line_errors(overrides, message, tmp_path):
    proc = cli(*overrides, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=False, timeout=120)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()  # a config error leaves no run directory behind


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["genome.blocks=uniform", "genome.layer_groups=99"], "genome.layer_groups must be between 1 and the model's 4 layers, got 99"),
        (["genome.blocks=wavy"], "genome.blocks must be uniform or adaptive, got 'wavy'"),
        (["genome=layerwise_mixed", "genome.layer_groups=0"], "genome.layer_groups must be between 1 and the model's 4 layers, got 0"),
    ],
)
def test_bad_genome_on_real_pool_is_a_clear_error(overrides, message, test_zoo, tmp_path):
    proc = cli(*pool_args(test_zoo), *overrides, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert f"evomerge: error: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_export_bad_point(tmp_path):
    proc = cli("export", f"run={tmp_path}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "is not an evomerge run directory" in proc.stderr


def test_export_of_a_searched_ties_front_point_reproduces_in_mergekit(test_zoo, tmp_path):
    """Issue 22: a real search's front point (layer-wise TIES, sampled table while searching)
    exports with exact thresholds, and mergekit computes the same weights from the YAML."""
    pytest.importorskip("mergekit")
    run = tmp_path / "run"
    cli(*pool_args(test_zoo), "genome=layerwise_ties", "search.max_evals=8", "algorithm.pop_size=8", "fitness.test_rescore=false",
        "report.plots=false", "report.html=false", f"hydra.run.dir={run}", cwd=tmp_path)
    out = tmp_path / "exported"
    proc = cli("export", f"run={run}", "point=knee", f"out={out}", "verify=true", cwd=tmp_path)
    from safetensors.torch import load_file

    tensors = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert max(t.numel() for t in tensors.values()) > 4096  # past the sampled table's exact range
    assert "same weights as mergekit" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
