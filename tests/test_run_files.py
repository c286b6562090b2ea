"""Every JSON file of a run directory read tolerantly: a wrong type is a named, skipped file
(or one line naming it where the run cannot go on without it), never a traceback."""

from __future__ import annotations

import json

import pytest

from evomerge.estimators.saved import SavedStateError, read_saved
from evomerge.provenance import environment_line, read_environment, read_json_object, record_run_environment
from evomerge.rundir import RunDirError, check_fingerprints


@pytest.mark.parametrize("text, why", [("[1, 2]", "holds a JSON list, not an object"), ('"x"', "holds a JSON str"), ("{oops", "Expecting property name")])
def test_environment_json_of_another_type_is_skipped_with_one_line(tmp_path, capsys, text, why):
    (tmp_path / "environment.json").write_text(text)
    assert read_environment(tmp_path) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "skipped" in err and "environment.json" in err and why in err
    assert environment_line(read_environment(tmp_path)).startswith("not recorded")
    # a resume writes it anew instead of failing
    record = record_run_environment(tmp_path, {"versions": {"torch": "x"}})
    assert json.loads((tmp_path / "environment.json").read_text()) == record


def test_read_json_object_is_quiet_for_a_missing_file(tmp_path, capsys):
    assert read_json_object(tmp_path / "none.json", "x") is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("text", ["5", "[]", "not json"])
def test_fingerprints_of_another_type_are_one_line(tmp_path, text):
    (tmp_path / "fingerprints.json").write_text(text)
    with pytest.raises(RunDirError, match="fingerprints.json is damaged; pass force=true to resume"):
        check_fingerprints(tmp_path, {"models": {}}, force=False, action="resume")


@pytest.mark.parametrize("text", ["[]", "{}", "nope"])
def test_an_estimators_saved_state_of_another_shape_is_one_line(tmp_path, text):
    path = tmp_path / "irt.json"
    path.write_text(text)
    with pytest.raises(SavedStateError, match="irt.json is damaged"):
        read_saved(path, "models")
    path.write_text('{"models": {}}')
    assert read_saved(path, "models") == {"models": {}}


@pytest.mark.slow
def test_report_and_resume_of_a_run_with_odd_json_files(tmp_path):
    """The CLI: report works (one warning), resume refuses damaged fingerprints in one line."""
    import subprocess
    import sys

    run = tmp_path / "run"
    base = [sys.executable, "-m", "evomerge"]
    subprocess.run([*base, "modelpool.size=tiny", "search.max_evals=2", "algorithm=random", "algorithm.pop_size=2", "genome=modelwise_ta",
                    "fitness.subset_size=4", "fitness.extra=[]", "fitness.test_rescore=false", "report.html=false", "report.plots=false",
                    "device=cpu", f"hydra.run.dir={run}"], check=True, capture_output=True, timeout=300)
    (run / "environment.json").write_text("[1, 2]")
    (run / "summary.json").write_text('"a string"')
    report = subprocess.run([*base, "report", f"run={run}"], capture_output=True, text=True, timeout=300)
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert "skipped" in report.stderr and "environment.json" in report.stderr
    (run / "fingerprints.json").write_text("5")
    resume = subprocess.run([*base, f"resume={run}"], capture_output=True, text=True, timeout=300)
    assert resume.returncode == 2 and "Traceback" not in resume.stderr
    assert resume.stderr.strip().splitlines()[-1].startswith("evomerge: error:") and "fingerprints.json is damaged" in resume.stderr


def test_a_registry_task_whose_data_cannot_load_is_reported_before_any_model_loads(monkeypatch):
    """lm-eval's registry task with a hub dataset, offline and not cached: one line from the
    up-front task checks (before the pool is built), not after the models loaded."""
    from omegaconf import OmegaConf

    from evomerge.checks import check_tasks
    from evomerge.errors import ConfigError

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", "/nonexistent/evomerge-test-cache")
    cfg = OmegaConf.create({"fitness": {"objectives": [{"name": "arc", "task": "arc_easy", "metric": "acc,none"}], "test_rescore": False}})
    with pytest.raises(ConfigError) as exc:
        check_tasks(cfg)
    text = str(exc.value)
    assert "arc_easy" in text and "\n" not in text and "HF_DATASETS_OFFLINE" in text
