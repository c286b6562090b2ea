"""Trackers with the real libraries: MLflow (a local file store, read back with its client)
and W&B offline (read back from the run's own .wandb file), kill + resume included: every
candidate logged once, at step = its archive id, in one tracker run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge.search.archive import Archive
from evomerge.trackers import wandb_offline_history

from conftest import kill_when_searched

pytestmark = pytest.mark.slow

BASE = ["modelpool.size=tiny", "device=cpu", "algorithm=random", "algorithm.pop_size=2", "genome=modelwise_ta", "fitness.subset_size=4",
        "fitness.extra=[]", "fitness.test_rescore=false", "report.html=false", "search.progress=false"]


def evomerge(*args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "evomerge", *args], capture_output=True, text=True, timeout=900, cwd=cwd,
                          env={**os.environ, **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_after(args: list[str], run: Path, cwd: Path, after: int, env: dict | None = None) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", *args, f"hydra.run.dir={run}"], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    kill_when_searched(proc, run, after, 600)
    proc.wait()


def search_ids(run: Path) -> list[int]:
    return [r.id for r in Archive(run / "archive.jsonl").search_records() if r.error is None]


def test_mlflow_logs_each_candidate_once_across_a_kill_and_a_resume(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # reading the store back here
    uri = (tmp_path / "mlruns").as_uri()
    run = tmp_path / "run"
    args = [*BASE, "search.max_evals=12", "tracker=mlflow", f"tracker.tracking_uri={uri}"]
    kill_after(args, run, tmp_path, after=5)
    assert 5 <= len(search_ids(run)) < 12
    evomerge(f"resume={run}", cwd=tmp_path)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("evomerge").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == run.name and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    steps = [m.step for m in client.get_metric_history(run_id, "score/math")]
    assert sorted(steps) == search_ids(run) and len(steps) == len(set(steps)) == 12  # none missing, none twice
    records = {r.id: r for r in Archive(run / "archive.jsonl").search_records()}
    assert all(m.value == records[m.step].scores["math"] for m in client.get_metric_history(run_id, "score/math"))
    assert client.get_metric_history(run_id, "round/hypervolume") and client.get_metric_history(run_id, "stderr/lang")
    assert runs[0].data.params["algorithm._target_"] == "evomerge.search.algorithms.random_search"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"summary.json", "pareto_front.csv", "recipes"} <= artifacts


def test_wandb_offline_logs_each_candidate_once_across_a_kill_and_a_resume(tmp_path):
    run = tmp_path / "run"
    env = {"WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    args = [*BASE, "search.max_evals=12", "tracker=wandb", "tracker.mode=offline"]
    kill_after(args, run, tmp_path, after=5, env=env)
    evomerge(f"resume={run}", cwd=tmp_path, env=env)
    state = json.loads((run / "tracker.json").read_text())
    assert state["kind"] == "wandb" and len({p.name.split("-")[-1] for p in (run / "wandb").glob("offline-run-*")}) == 1  # one W&B run id
    rows = [r for r in wandb_offline_history(run) if "archive_id" in r and "candidate/score/math" in r]
    ids = [r["archive_id"] for r in rows]
    assert sorted(ids) == search_ids(run) and len(ids) == len(set(ids)) == 12
    assert any("round/hypervolume" in r for r in wandb_offline_history(run))


def test_a_failing_tracker_warns_once_and_the_search_goes_on(tmp_path):
    """An MLflow store that cannot be written (a file where its folder should be)."""
    blocker = tmp_path / "mlruns"
    blocker.write_text("not a folder")
    run = tmp_path / "run"
    proc = evomerge(*BASE, "search.max_evals=4", "tracker=mlflow", f"tracker.tracking_uri={blocker.as_uri()}", f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.stderr.count("warning: tracker mlflow failed") == 1 and "the search goes on without it" in proc.stderr
    assert len(search_ids(run)) == 4 and (run / "summary.json").is_file()


def test_a_tracker_without_its_library_is_one_line_before_anything_runs(monkeypatch):
    import importlib.util

    from omegaconf import OmegaConf

    from evomerge import trackers
    from evomerge.errors import ConfigError

    original = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else original(name, *a))
    with pytest.raises(ConfigError, match=r"tracker=wandb needs the wandb package: pip install 'evomerge\[wandb\]'"):
        trackers.build_tracker(OmegaConf.create({"tracker": {"_target_": "evomerge.trackers.wandb_tracker", "mode": "offline"}}))
    assert trackers.build_tracker(OmegaConf.create({})).name == "none"
