"""The benchmark protocol (experiments/benchmark/run_benchmark.py) end to end, CPU-sized:
tiny budgets, one seed, every search; results.json has the shape the issue asks for."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark" / "run_benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("run_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_protocol_cpu_sized(test_zoo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bench = load_script()
    overrides = [
        "modelpool=paths",
        f"modelpool.base={test_zoo.base}",
        *(f"+modelpool.experts.{k}={v}" for k, v in test_zoo.experts.items()),
        "device=cpu",
        "fitness.subset_size=8",
        "algorithm.pop_size=4",
    ]
    args = ["--settings", "toy", "--seeds", "0", "--budgets", "4", "--root", str(tmp_path / "runs"), "--out", str(tmp_path / "out")]
    bench.main(args + [a for o in overrides for a in ("--override", o)])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"toy"}
    assert set(results["toy"]) == {"default", "grid_ta", "ties_default", "random"}
    for search, by_budget in results["toy"].items():
        (row,) = by_budget["4"]
        assert row["seed"] == 0
        assert 0.0 <= row["test_hv"] <= 1.0 and 0.0 <= row["val_hv"] <= 1.0
        assert row["evals"] == (1 if search == "ties_default" else 4), search
        assert "best_test_target" in row
    # every front already includes the experts, so no search can fall below them
    experts_only = bench.measure(tmp_path / "runs" / "toy" / "ties_default" / "4" / "seed-0")
    assert results["toy"]["default"]["4"][0]["val_hv"] >= experts_only["val_hv"] - 0.05
    assert (tmp_path / "out" / "results.md").read_text().count("| default |") == 1
    assert (tmp_path / "out" / "results.png").is_file()
    # a second call skips finished runs (nothing re-run) and reports the same numbers
    bench.main(args + ["--report-only"])
    assert json.loads((tmp_path / "out" / "results.json").read_text()) == results
