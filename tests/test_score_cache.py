"""The shared test-score cache (EVOMERGE_SCORE_CACHE): keys, staleness, and two runs sharing it."""

from __future__ import annotations

import json

import pytest

from evomerge.score_cache import ScoreCache

FINGERPRINTS = {"models": {"base": {"path": "/a", "files": {"model.safetensors": {"size": 10, "mtime_ns": 1, "sha1": "aa"}}}}}
RECIPE = {"evomerge_recipe": 1, "groups": [{"name": "layers", "method": "task_arithmetic", "params": {"weight": [0.5, 0.5]}}], "metadata": {}}


def test_key_depends_on_weights_inputs_and_settings_not_labels_or_paths(tmp_path):
    cache = ScoreCache(tmp_path, FINGERPRINTS, {"split": "test"})
    key = cache.key(RECIPE)
    assert cache.key({**RECIPE, "metadata": {"label": "knee"}}) == key
    moved = json.loads(json.dumps(FINGERPRINTS))
    moved["models"]["base"]["path"], moved["models"]["base"]["files"]["model.safetensors"]["mtime_ns"] = "/b", 2
    assert ScoreCache(tmp_path, moved, {"split": "test"}).key(RECIPE) == key
    changed = json.loads(json.dumps(FINGERPRINTS))
    changed["models"]["base"]["files"]["model.safetensors"]["sha1"] = "bb"
    assert ScoreCache(tmp_path, changed, {"split": "test"}).key(RECIPE) != key
    assert ScoreCache(tmp_path, FINGERPRINTS, {"split": "validation"}).key(RECIPE) != key
    other = json.loads(json.dumps(RECIPE))
    other["groups"][0]["params"]["weight"] = [0.5, 0.6]
    assert cache.key(other) != key


def test_put_get_and_torn_entries(tmp_path):
    cache = ScoreCache(tmp_path, FINGERPRINTS, {})
    assert cache.get(RECIPE) is None
    cache.put(RECIPE, {"math": 0.25})
    assert cache.get(RECIPE) == {"math": 0.25}
    (tmp_path / f"{cache.key(RECIPE)}.json").write_text('{"scor')
    assert cache.get(RECIPE) is None  # torn: scored again, never a crash


def test_from_env_is_off_without_the_variable(tmp_path, monkeypatch):
    (tmp_path / "fingerprints.json").write_text(json.dumps(FINGERPRINTS))
    monkeypatch.delenv("EVOMERGE_SCORE_CACHE", raising=False)
    assert ScoreCache.from_env(tmp_path, {}) is None
    monkeypatch.setenv("EVOMERGE_SCORE_CACHE", str(tmp_path / "cache"))
    assert ScoreCache.from_env(tmp_path, {}) is not None
    assert ScoreCache.from_env(tmp_path / "no-run", {}) is None


@pytest.mark.slow
def test_two_runs_share_test_rescores(test_zoo, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config resolvers
    from evomerge.estimators.lm_eval_fitness import LmEvalFitness
    from evomerge.run import run_search

    monkeypatch.setenv("EVOMERGE_SCORE_CACHE", str(tmp_path / "cache"))
    pool = ["modelpool=paths", "fitness=toy", f"modelpool.base={test_zoo.base}", *(f"+modelpool.experts.{k}={v}" for k, v in test_zoo.experts.items())]
    overrides = pool + ["device=cpu", "search.max_evals=4", "algorithm.pop_size=4", "fitness.subset_size=8", "report.html=false", "report.plots=false"]
    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    first = run_search(cfg, tmp_path / "one")["test"]
    n_entries = len(list((tmp_path / "cache").glob("*.json")))
    assert n_entries >= 3  # the base and both experts at least
    calls = []
    original = LmEvalFitness.__call__
    monkeypatch.setattr(LmEvalFitness, "__call__", lambda self: calls.append(self.split) or original(self))
    second = run_search(cfg, tmp_path / "two")["test"]
    assert "test" not in calls  # every test score came from the cache (same seed, same recipes)
    assert {k: v["scores"] for k, v in second.items()} == {k: v["scores"] for k, v in first.items()}


def test_rescore_progress_bounds_the_time_left():
    from evomerge.run import time_left

    assert time_left([], 5) == ""  # nothing scored yet: no estimate
    assert time_left([60.0], 0) == ""
    assert time_left([50.0, 70.0], 3) == ", at most ~3m 00s left"
    assert time_left([400.0], 12) == ", at most ~1h 20m left"


def test_a_point_chosen_under_several_names_is_rescored_once():
    """The knee that is also best_<objective> and a front point: one test score, every name."""
    from types import SimpleNamespace

    from evomerge.rescore import exact_rescore

    class Merger:
        def __init__(self):
            self.current = None

        def apply(self, recipe):
            self.current = recipe

        def fingerprint(self):
            return (repr(self.current),)

    calls = []

    def test():
        calls.append(1)
        return {"math": 0.5}

    rec = SimpleNamespace(id=7, recipe={"kind": "recipe", "groups": []})
    other = SimpleNamespace(id=8, recipe={"kind": "recipe", "groups": [], "x": 1})
    import evomerge.rescore as rescore

    original = rescore.candidate_from_dict
    rescore.candidate_from_dict = lambda d: dict(d)
    try:
        out = exact_rescore(Merger(), {"knee": rec, "best_math": rec, "front:7": rec, "front:8": other}, test)
    finally:
        rescore.candidate_from_dict = original
    assert len(calls) == 2  # points 7 and 8, once each
    assert list(out) == ["knee", "best_math", "front:7", "front:8"]
    assert out["knee"] == out["best_math"] == out["front:7"] == {"id": 7, "scores": {"math": 0.5}}
