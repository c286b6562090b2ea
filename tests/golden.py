"""The golden main job: ``python3 -m evomerge`` on the shipped zoo at a small budget, whose
archive must equal ``tests/data/golden_main_job.json`` on every machine the lock supports.

    python tests/golden.py --write      # after a change that is meant to change the main job
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

GOLDEN = Path(__file__).resolve().parent / "data" / "golden_main_job.json"
# the main job (python3 -m evomerge) at 16 evaluations, CPU float32; no test re-score and no
# report (not part of the archive)
OVERRIDES = ["search.max_evals=16", "device=cpu", "search.progress=false", "fitness.test_rescore=false", "report.html=false", "report.plots=false"]
# genomes that the model-based search proposes go through L-BFGS on float64: compared to
# this tolerance (a last-bit difference of the optimiser must not fail the test, a score must)
GENOME_TOLERANCE = 1e-6


def run_main_job(run_dir: Path) -> list[dict[str, Any]]:
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.run import run_search
    from evomerge.search.archive import Archive

    with initialize_config_module("evomerge.configs", version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES)
    run_search(cfg, run_dir, overrides=[])
    return [{"id": r.id, "kind": r.kind, "label": r.label, "genome": r.genome, "scores": r.scores} for r in Archive(run_dir / "archive.jsonl").records]


def environment() -> dict[str, Any]:
    import torch

    from evomerge.provenance import cpu_capability, library_versions

    return {"versions": library_versions(), "cpu_capability": cpu_capability(), "torch_threads": torch.get_num_threads()}


def first_difference(expected: list[dict[str, Any]], got: list[dict[str, Any]]) -> str | None:
    """The first record that differs, and why; None when the archives agree."""
    if len(expected) != len(got):
        return f"{len(got)} records, expected {len(expected)}"
    for e, g in zip(expected, got):
        where = f"record {e['id']} ({e['label'] or e['kind']})"
        if (e["kind"], e["label"]) != (g["kind"], g["label"]):
            return f"{where}: is {g['kind']}/{g['label']}"
        if (e["genome"] is None) != (g["genome"] is None) or (
            e["genome"] is not None and (len(e["genome"]) != len(g["genome"]) or max(abs(a - b) for a, b in zip(e["genome"], g["genome"])) > GENOME_TOLERANCE)
        ):
            return f"{where}: the search proposed another genome ({g['genome']} vs {e['genome']}): the proposal arithmetic differs"
        if e["scores"] != g["scores"]:
            return f"{where}: same genome, other scores ({g['scores']} vs {e['scores']}): the forward pass (CPU kernels) gives other answers"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    records = run_main_job(Path(tempfile.mkdtemp(prefix="golden-")) / "run")
    if args.write:
        GOLDEN.write_text(json.dumps({"overrides": OVERRIDES, "recorded_on": environment(), "records": records}, indent=1) + "\n")
        print(f"wrote {GOLDEN} ({len(records)} records)")
    else:
        print(first_difference(json.loads(GOLDEN.read_text())["records"], records) or "identical")


if __name__ == "__main__":
    main()
