"""Estimators selected on the command line, end to end on the test zoo."""

from __future__ import annotations

import json

import pytest

from evomerge.search.archive import Archive

from test_cli import cli, pool_args

pytestmark = pytest.mark.slow


def test_multifidelity_search_records_fidelity_and_stderr(test_zoo, tmp_path):
    run = tmp_path / "run"
    proc = cli(*pool_args(test_zoo), "fitness/estimator=multifidelity", "fitness.subset_size=20", "fitness.estimator.max_items=80",
               "fitness.test_rescore=false", "search.max_evals=16", "algorithm.pop_size=8", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "done: 16 candidates" in proc.stdout
    records = Archive(run / "archive.jsonl").records
    assert (run / "fidelity.json").is_file()
    levels = {max(r.fidelity.values()) for r in records if not r.error}
    assert levels <= {20, 40, 80} and 80 in levels  # the references and the first candidates go all the way
    assert all(set(r.stderr) == {"math", "lang"} for r in records if not r.error)
    front = json.loads((run / "pareto_front.json").read_text())["front_uncertainty"]
    assert front and all(p["fidelity"]["math"] == 80 for p in front)  # the front holds promoted scores only


def test_irt_search_saves_and_reuses_its_anchors(test_zoo, tmp_path):
    run = tmp_path / "run"
    args = [*pool_args(test_zoo), "fitness/estimator=irt", "fitness.estimator.n_anchors=10", "fitness.estimator.n_probes=2",
            "fitness.test_rescore=false", "search.max_evals=8", "algorithm.pop_size=8", f"hydra.run.dir={run}"]
    cli(*args, cwd=tmp_path)
    saved = json.loads((run / "irt.json").read_text())
    assert len(saved["models"]["math"]["anchors"]) == 10 and len(saved["answers"]["math"]) == 5  # base, 2 experts, 2 probes
    assert all(max(r.fidelity.values()) == 10 for r in Archive(run / "archive.jsonl").records)
    before = (run / "irt.json").read_text()
    cli(f"resume={run}", cwd=tmp_path)  # finished run: loads irt.json, nothing re-fitted
    assert (run / "irt.json").read_text() == before
