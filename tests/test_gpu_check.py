"""scripts/gpu_check.sh on the CPU in its quick mode, as CI runs it: the device check a GPU
session runs in one call cannot rot unnoticed."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_gpu_check_quick_on_the_cpu_writes_its_json(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path), "--device", "cpu", "--quick"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["quick"] is True
    methods = {row["method"] for row in report["merge"][0]["methods"]}
    assert methods == {"task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "breadcrumbs", "slerp", "model_stock"}
    assert all(row["ms"] > 0 and row["x_bound"] > 0 for row in report["merge"][0]["methods"])
    # the CPU against itself: identical merges (on a GPU this is the CUDA-vs-CPU difference)
    assert all(row["identical"] for row in report["device_vs_cpu"])
    search = report["search"]
    assert search["returncode"] == 0 and search["evaluated"] == 4 and search["environment"]["device"] == "cpu"
    assert "proposal_wait_s" in search["time_s"]
