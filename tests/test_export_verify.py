"""``evomerge export ... verify=true``: exit 1 on any difference from mergekit, and nothing
merged or written when mergekit is missing or cannot express the recipe."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
pytest.importorskip("mergekit")


def tiny_run(run: Path, *overrides: str) -> None:
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search

    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=["modelpool.size=tiny", "device=cpu", "search.max_evals=2", "algorithm=random", "algorithm.pop_size=2",
                                            "fitness.subset_size=4", "fitness.extra=[]", "fitness.test_rescore=false", "report.html=false",
                                            "report.plots=false", "search.progress=false", *overrides])
    run_search(cfg, run, overrides=[])


def export(run: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge", "export", f"run={run}", "point=knee", f"out={out}", "verify=true"],
                          capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})})


def test_verify_exits_1_when_the_weights_differ_from_mergekits(tmp_path):
    run = tmp_path / "run"
    # DARE-TIES below density 1: the drop masks of the two tools differ by design
    tiny_run(run, "genome=modelwise_dare_ties", "genome.ranges.density=[0.3,0.6]")
    proc = export(run, tmp_path / "out")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "DIFFERS from mergekit 0.1.5 (random method: drop masks differ by design)" in proc.stdout
    header = (tmp_path / "out" / "mergekit.yaml").read_text().splitlines()[0]
    assert header.startswith("# exported by evomerge; verified here: verify:") and "DIFFERS" in header
    assert "not verified here" not in (tmp_path / "out" / "mergekit.yaml").read_text()


def test_verify_says_same_weights_in_one_header_and_exits_0(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, "genome=modelwise_ta")
    proc = export(run, tmp_path / "out")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "out" / "mergekit.yaml").read_text()
    assert text.splitlines()[0].endswith("same weights as mergekit 0.1.5") and text.count("\n#") == 0 and "not verified here" not in text


def test_without_mergekit_nothing_is_merged_or_written(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, "genome=modelwise_ta")
    fake = tmp_path / "no_mergekit" / "mergekit"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('mergekit is not installed (test)')\n")
    proc = export(run, tmp_path / "out", env={"PYTHONPATH": str(fake.parent)})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "verify=true needs mergekit" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_recipe_mergekit_cannot_express_is_refused_before_anything_is_written(tmp_path):
    run = tmp_path / "run"
    tiny_run(run, "genome=modelwise_ta", "genome.methods=[iso_c]", "genome.ranges={}")
    proc = export(run, tmp_path / "out")
    assert proc.returncode == 2 and "cannot verify: mergekit cannot express method 'iso_c'" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
