"""experiments/benchmark/plot_fronts.py: the weakest-skill share (hand-computed) and the figure
from two fake finished runs; a missing run is one line, not a traceback."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "benchmark" / "plot_fronts.py"
REFS = {
    "base": {"scores": {"math": 0.0, "roman": 0.0, "sort": 0.02}},
    "expert:math": {"scores": {"math": 0.5, "roman": 0.0, "sort": 0.0}},
    "expert:roman": {"scores": {"math": 0.0, "roman": 0.8, "sort": 0.0}},
    "expert:sort": {"scores": {"math": 0.0, "roman": 0.0, "sort": 0.4}},
}


def load_script():
    spec = importlib.util.spec_from_file_location("plot_fronts", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(root: Path, search: str, front: list[dict[str, float]]) -> None:
    run = root / "k3" / search / "48" / "seed-0"
    run.mkdir(parents=True)
    test = dict(REFS) | {f"front:{i}": {"id": i, "scores": s} for i, s in enumerate(front)}
    (run / "summary.json").write_text(json.dumps({"objectives": ["math", "roman", "sort"], "test": test}))


def test_weakest_share_is_the_smallest_fraction_of_an_experts_score():
    plot = load_script()
    refs = {k: v["scores"] for k, v in REFS.items()}
    # math 0.25/0.5 = 0.5, roman 0.2/0.8 = 0.25, sort 0.3/0.4 = 0.75 -> 0.25
    assert plot.weakest_share({"math": 0.25, "roman": 0.2, "sort": 0.3}, refs, ["math", "roman", "sort"]) == pytest.approx(0.25)
    assert plot.weakest_share({"math": 0.5, "roman": 0.0, "sort": 0.4}, refs, ["math", "roman", "sort"]) == 0.0


def test_figure_from_two_runs_and_a_missing_run(tmp_path, capsys):
    plot = load_script()
    write_run(tmp_path, "default", [{"math": 0.25, "roman": 0.2, "sort": 0.3}, {"math": 0.5, "roman": 0.0, "sort": 0.0}])
    write_run(tmp_path, "grid_ta", [{"math": 0.1, "roman": 0.6, "sort": 0.1}])
    out = tmp_path / "fig" / "fronts.png"
    plot.main(["--root", str(tmp_path), "--setting", "k3", "--budget", "48", "--seed", "0", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit, match=r"seed-1/summary.json does not exist \(run the benchmark first\)"):
        plot.main(["--root", str(tmp_path), "--setting", "k3", "--budget", "48", "--seed", "1", "--out", str(out)])
