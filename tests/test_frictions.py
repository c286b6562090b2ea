"""Frictions a new user met (issue 37), each checked where it happened."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bo_on_a_constant_objective_says_nothing_on_the_console():
    """Every candidate scoring 0 on one objective so far: BoTorch's InputDataWarning stays inside."""
    from evomerge.search.bayes import BayesStrategy

    s = BayesStrategy(None, pop_size=2, n_init=0, raw_samples=16, num_restarts=1, mc_samples=8, maxiter=5)
    s.setup(2, 2, 20, 0, None)
    rng = np.random.default_rng(0)
    X = rng.random((6, 2))
    F = np.c_[1.0 - 0.5 * X[:, 0], np.ones(6)]  # objective 2: score 0 everywhere
    s.tell(X, F, np.full_like(F, 0.05))
    s.design = np.zeros((0, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert s.ask().shape == (2, 2)
    assert not [w for w in caught if "InputDataWarning" in type(w.message).__name__ or "standardize" in str(w.message).lower()], [str(w.message) for w in caught]


def test_the_front_plot_places_its_legend_itself(tmp_path, monkeypatch):
    """matplotlib warns that loc="best" is slow once a panel holds many points (a timing-dependent
    warning on the console): the front plot names its legend's place."""
    import matplotlib.axes

    from evomerge.search.archive import Archive, Record
    from evomerge.search.report import plot_run

    places = []
    original = matplotlib.axes.Axes.legend

    def legend(self, *args, **kwargs):
        places.append(kwargs.get("loc", "best"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    archive = Archive(tmp_path / "archive.jsonl")
    rng = np.random.default_rng(0)
    for i in range(50):
        a, b = rng.random(2)
        archive.append(Record(i, "search", f"k{i}", [a, b], {"kind": "recipe", "groups": []}, {"math": a, "lang": b}, [1 - a, 1 - b]))
    history = [{"n_evals": 25, "hypervolume": 0.5, "best": {"math": 0.9, "lang": 0.9}}, {"n_evals": 50, "hypervolume": 0.6, "best": {"math": 0.95, "lang": 0.9}}]
    plot_run(tmp_path, ["math", "lang"], archive, history)
    assert len(places) == 2 and "best" not in places


@pytest.mark.slow
def test_hand_made_prints_no_empty_warm_start_line(tmp_path, capsys):
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search

    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=["modelpool.size=tiny", "device=cpu", "algorithm=hand_made", "genome=modelwise_ties",
                                            "genome.layer_groups=1", "search.max_evals=4", "fitness.subset_size=4", "fitness.extra=[]",
                                            "fitness.test_rescore=false", "report.html=false", "report.plots=false", "search.progress=false"])
    run_search(cfg, tmp_path / "run", overrides=[])
    err = capsys.readouterr().err
    assert "warm start:" not in err and "search: hand_made" in err


def test_the_own_models_examples_name_the_objectives():
    """Copying the --help or docs/running.md own-models line must not stop at 'fitness.objectives must list...'."""
    import yaml

    help_text = yaml.safe_load((ROOT / "configs" / "config.yaml").read_text())["hydra"]["help"]["template"]
    example = help_text[help_text.index("evomerge modelpool=paths"):].split("\n\n")[0]
    assert "fitness.objectives=" in example and "fitness.include_paths=" in example
    running = (ROOT / "docs" / "running.md").read_text()
    block = running[running.index("python3 -m evomerge modelpool=paths"):].split("# your own models")[0]
    assert "fitness.objectives=" in block
    extending = (ROOT / "docs" / "extending.md").read_text()
    section = extending[extending.index("## A fitness task"):].split("\n## ")[0]
    assert "plain YAML" not in section and "own-models.md" in section
