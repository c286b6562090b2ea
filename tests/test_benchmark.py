"""The benchmark protocol (experiments/benchmark/run_benchmark.py) end to end, CPU-sized:
tiny budgets, one seed, every search; results.json has the shape the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark" / "run_benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("run_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_run_overrides(test_zoo) -> list[str]:
    return [
        "modelpool=paths",
        "fitness=toy",
        f"modelpool.base={test_zoo.base}",
        *(f"+modelpool.experts.{k}={v}" for k, v in test_zoo.experts.items()),
        "device=cpu",
        "fitness.subset_size=8",
        "algorithm.pop_size=4",
    ]


def test_benchmark_protocol_cpu_sized(test_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = load_script()
    overrides = tiny_run_overrides(test_zoo)
    # the protocol's table (2026-12-07); three of its searches run here (the rest cost CI time, not coverage)
    assert bench.DEFAULT_SEARCHES["toy"] == ["default", "grid_ta", "sakana_cmaes", "mergenetic_nsga2", "map", "sobol_ta"]
    args = ["--settings", "toy", "--seeds", "0", "--budgets", "4", "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
            "--searches", "default", "grid_ta", "sakana_cmaes"]
    bench.main(args + [a for o in overrides for a in ("--override", o)])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"toy"}
    assert set(results["toy"]) == {"default", "grid_ta", "sakana_cmaes"}
    for search, by_budget in results["toy"].items():
        (row,) = by_budget["4"]
        assert row["seed"] == 0
        assert 0.0 <= row["test_hv"] <= 1.0 and 0.0 <= row["val_hv"] <= 1.0
        assert 0.0 <= row["search_test_hv"] <= 1.0 and row["chosen_by"] in ("pooled", "confirmation", "search scores")
        assert row["evals"] == 4, search
        assert "best_test_target" in row and row["pool_digest"] and row["config"]
    # every search-score front includes the experts, so its validation HV is at least theirs
    summary = json.loads((tmp_path / "runs" / "toy" / "default" / "4" / "seed-0" / "summary.json").read_text())
    refs = np.array([[s[o] for o in summary["objectives"]] for s in summary["references"].values()])
    assert results["toy"]["default"]["4"][0]["search_val_hv"] >= bench.hv(refs) - 1e-12
    report = (tmp_path / "out" / "results.md").read_text()
    assert "| default | bo (pop 4) over task_arithmetic" in report  # each search by its full configuration
    for section in ("Paired difference to `grid_ta`", "Paired difference `default` minus each other search", "Winner's curse", "Decision rule"):
        assert section in report, section
    assert (tmp_path / "out" / "results.png").is_file()
    # a second call skips finished runs (nothing re-run) and reports the same numbers
    bench.main(args + ["--report-only"])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results


def test_larger_budget_extends_the_smaller_run_exactly(test_zoo, tmp_path, monkeypatch):
    """The anytime searches' budget-8 run continues the budget-4 run; its archive equals a
    fresh budget-8 run's (same genomes, same scores, same order)."""
    monkeypatch.chdir(tmp_path)
    bench = load_script()
    overrides = tiny_run_overrides(test_zoo) + ["fitness.extra_in_search=false"]
    common = ["--settings", "toy", "--seeds", "0", "--searches", "random", "--budgets", "4", "8"]
    common += [a for o in overrides for a in ("--override", o)]

    def archive(root: Path) -> list[tuple]:
        path = root / "toy" / "random" / "8" / "seed-0" / "archive.jsonl"
        return [(r["genome"], r["scores"]) for r in map(json.loads, path.read_text().splitlines())]

    bench.main(common + ["--root", str(tmp_path / "ext"), "--out", str(tmp_path / "o1")])
    bench.main(common + ["--root", str(tmp_path / "fresh"), "--out", str(tmp_path / "o2"), "--no-extend"])
    extended, fresh = archive(tmp_path / "ext"), archive(tmp_path / "fresh")
    assert len(fresh) == 3 + 8 and extended == fresh
    # extra_in_search=false: the search never scored the target task, the test re-score did
    summary = json.loads((tmp_path / "ext" / "toy" / "random" / "8" / "seed-0" / "summary.json").read_text())
    assert all(set(s) == {"math", "lang"} for _genome, s in extended)
    assert all("target" in t["scores"] for t in summary["test"].values())


def test_an_interrupted_extension_resumes_at_its_own_budget(tmp_path, monkeypatch):
    """A budget-48 extension killed before it rewrote its config (copied from the budget-24
    run) must resume with the budget 48 again, or it would finish as a 24-evaluation run."""
    bench = load_script()
    calls = []
    monkeypatch.setattr(bench, "run_evomerge", lambda args, target, tag: calls.append(args) or target)
    smaller = bench.run_dir(tmp_path, "toy", "bo", 24, 0)
    smaller.mkdir(parents=True)
    (smaller / "config.yaml").write_text("search: {max_evals: 24}\n")
    (smaller / "summary.json").write_text("{}")
    target = bench.run_one(tmp_path, "toy", "bo", 48, 0, [], smaller)  # first attempt: copied, extended
    assert calls[-1] == [f"resume={target}", "search.max_evals=48"]
    bench.run_one(tmp_path, "toy", "bo", 48, 0, [], smaller)  # the attempt was killed: resumed
    assert calls[-1] == [f"resume={target}", "search.max_evals=48"]


def test_report_drops_rows_of_a_search_rerun_under_its_name_and_keeps_others(tmp_path):
    """A search renamed and rerun (``default`` after the default changed): its directory holds
    only unfinished runs, so an earlier report's rows for it are stale and dropped; rows of a
    search with no directory here (run elsewhere) are kept."""
    bench = load_script()
    (tmp_path / "smollm2" / "default" / "48" / "seed-0").mkdir(parents=True)  # started, not finished
    earlier = {"smollm2": {"default": {"24": [{"seed": 0}], "48": [{"seed": 0}]}, "random": {"48": [{"seed": 1}]}}}
    got = bench.collect(tmp_path, ["smollm2"], ["default", "random"], {"smollm2": [24, 48]}, [0, 1], earlier)
    assert got["smollm2"]["default"] == {"24": [{"seed": 0}]}  # 24: no directory here, kept; 48: dropped
    assert got["smollm2"]["random"] == {"48": [{"seed": 1}]}


def test_extension_continues_the_largest_finished_smaller_budget(tmp_path):
    """``--budgets 480`` alone must still continue a finished 144 run (it used to start from
    scratch: the same archive, 144 evaluations more); unfinished runs are not continued."""
    bench = load_script()

    def finished(budget: int) -> None:
        folder = bench.run_dir(tmp_path, "toy", "default", budget, 0)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "summary.json").write_text("{}")

    assert bench.extension_base(tmp_path, "toy", "default", 480, 0, {48, 144, 480}) is None
    finished(48)
    assert bench.extension_base(tmp_path, "toy", "default", 480, 0, {48, 144, 480}) == bench.run_dir(tmp_path, "toy", "default", 48, 0)
    bench.run_dir(tmp_path, "toy", "default", 144, 0).mkdir(parents=True)  # started, not finished
    assert bench.extension_base(tmp_path, "toy", "default", 480, 0, {48, 144, 480}) == bench.run_dir(tmp_path, "toy", "default", 48, 0)
    finished(144)
    assert bench.extension_base(tmp_path, "toy", "default", 480, 0, {48, 144, 480}) == bench.run_dir(tmp_path, "toy", "default", 144, 0)
    assert bench.extension_base(tmp_path, "toy", "default", 144, 0, {48, 144, 480}) == bench.run_dir(tmp_path, "toy", "default", 48, 0)
    assert bench.extension_base(tmp_path, "toy", "default", 48, 0, {48, 144, 480}) is None
