"""The main job on the shipped zoo gives the committed archive (tests/golden.py)."""

from __future__ import annotations

import json

import pytest

from golden import GOLDEN, environment, first_difference, run_main_job

pytestmark = pytest.mark.slow


def test_the_main_job_gives_the_golden_archive(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = run_main_job(tmp_path / "run")
    difference = first_difference(golden["records"], got)
    here = environment()
    assert difference is None, (
        f"{difference}; recorded on {golden['recorded_on']['cpu_capability']} with {golden['recorded_on']['torch_threads']} threads "
        f"and torch {golden['recorded_on']['versions'].get('torch')}, here {here['cpu_capability']}, {here['torch_threads']} threads, "
        f"torch {here['versions'].get('torch')}"
    )


def test_first_difference_says_which_record_and_why():
    rec = {"id": 3, "kind": "search", "label": None, "genome": [0.5, 0.25], "scores": {"math": 0.5}}
    assert first_difference([rec], [dict(rec)]) is None
    assert first_difference([rec], [{**rec, "genome": [0.5, 0.25 + 1e-9]}]) is None
    assert "another genome" in first_difference([rec], [{**rec, "genome": [0.5, 0.3]}])
    assert "record 3" in first_difference([rec], [{**rec, "scores": {"math": 0.51}}])
    assert "CPU kernels" in first_difference([rec], [{**rec, "scores": {"math": 0.51}}])
    assert first_difference([rec], []) == "0 records, expected 1"
