"""Finish finished benchmark runs again with another final-front mode, in copies.

The final front is a step after the search (evomerge/confirmation.py): the same search can be
finished with ``fitness.final_front`` = ``search_scores``, ``confirmation`` or ``pooled``. This
copies each finished run of ``--root`` to ``<root>-<mode>`` (without its end-of-run outputs),
resumes the copy with the mode (nothing of the search is evaluated again; the confirmation
scores are reused from ``confirmation.jsonl``; new front points are test-scored), and leaves
``run_benchmark.py --report-only --root <root>-<mode>`` to tabulate them.

    python experiments/benchmark/refinish.py --root runs/benchmark --mode pooled --settings toy toy_k3
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch import run_evomerge  # noqa: E402

END_OF_RUN = ("summary.json", "pareto_front.csv", "pareto_front.json", "recipes", "report.html", "front.png", "progress.png", "run.lock", "tracker.json")


def refinish(root: Path, mode: str, settings: list[str], searches: list[str] | None, budgets: list[str] | None) -> list[Path]:
    out_root = root.with_name(f"{root.name}-{mode}")
    done = []
    for summary in sorted(root.glob("*/*/*/seed-*/summary.json")):
        run = summary.parent
        setting, search, budget = run.parts[-4], run.parts[-3], run.parts[-2]
        if setting not in settings or (searches and search not in searches) or (budgets and budget not in budgets):
            continue
        target = out_root / setting / search / budget / run.name
        if (target / "summary.json").is_file():
            done.append(target)
            continue
        if not target.exists():
            shutil.copytree(run, target, ignore=shutil.ignore_patterns(*END_OF_RUN))
        run_evomerge([f"resume={target}", f"fitness.final_front={mode}"], target, f"refinish {mode}")
        done.append(target)
    return done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, required=True)
    ap.add_argument("--mode", required=True, choices=["search_scores", "confirmation", "pooled"])
    ap.add_argument("--settings", nargs="+", default=["toy", "toy_k3"])
    ap.add_argument("--searches", nargs="+", default=None)
    ap.add_argument("--budgets", nargs="+", default=None)
    args = ap.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    # test scores of points both finishes share are scored once
    os.environ.setdefault("EVOMERGE_SCORE_CACHE", str((args.root / "score_cache").resolve()))
    runs = refinish(args.root, args.mode, args.settings, args.searches, args.budgets)
    print(f"refinish: {len(runs)} runs finished with fitness.final_front={args.mode} under {args.root.with_name(args.root.name + '-' + args.mode)}")


if __name__ == "__main__":
    main()
