"""Wiring a composed config into a search run: session (evomerge.session) -> stages
(evomerge.driver) -> final front (evomerge.confirmation), recipes, test re-score
(evomerge.rescore), report. Exporting a point is evomerge.export."""

from __future__ import annotations

import json
import sys
import logging
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evomerge import provenance, rundir
from evomerge.checks import check_config
from evomerge.confirmation import confirm_front
from evomerge.driver import build_executor, check_async, proposal_core_reserved, run_stages
from evomerge.errors import ConfigError, EvomergeError, raise_user_errors  # noqa: F401 -- re-exported for callers
from evomerge.estimators.lm_eval_fitness import quiet_libraries
from evomerge.progress import say
from evomerge.report import refresh_report
from evomerge.search.loop import SearchLoop
from evomerge.pool import dtype_name
from evomerge.search.report import plot_run, write_front, write_recipes
from evomerge.search.stages import plan_stages
from evomerge.trackers import build_tracker
from evomerge.session import Session, config_value, open_session

log = logging.getLogger(__name__)
CONFIG_FILE = "config.yaml"


def run_search(cfg: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """``overrides``: the command line's (Hydra) overrides; on resume only safe ones may change."""
    quiet_libraries()
    fresh = not OmegaConf.select(cfg, "resume") and not (Path(run_dir) / CONFIG_FILE).exists()
    # locked for the whole run; a fresh run's config is written exclusively (see evomerge.rundir)
    cfg, run_dir, lock = rundir.open_run_dir(cfg, run_dir, overrides)
    try:
        return _search(cfg, run_dir, lambda: rundir.commit_resume_changes(lock))
    except EvomergeError:
        if fresh:  # a config error before anything was evaluated leaves no run directory behind
            lock.release()
            remove_unused_run_dir(run_dir)
        raise
    finally:
        lock.release()


# what a fresh run writes before its first evaluation: a run dir holding only these is unused
SETUP_FILES = {CONFIG_FILE, "overrides.yaml", "run.lock", "fingerprints.json", "environment.json", "run.log", "subset.json", "checkpoint.pkl"}


def remove_unused_run_dir(run_dir: Path) -> None:
    """Delete a fresh run directory that holds no evaluated candidate (only setup files)."""
    import shutil

    run_dir = Path(run_dir)
    archive = run_dir / "archive.jsonl"
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if (archive.exists() and archive.stat().st_size > 0) or not names <= SETUP_FILES | {"archive.jsonl"}:
        return
    shutil.rmtree(run_dir, ignore_errors=True)


def _search(cfg: DictConfig, run_dir: Path, on_ready: Callable[[], None] | None = None) -> dict[str, Any]:
    check_config(cfg)
    seed = config_value(cfg, "seed", int)
    max_evals = config_value(cfg, "search.max_evals", int, positive=True)
    with proposal_core_reserved(cfg):
        session = open_session(cfg, run_dir)
        provenance.record_session(run_dir, session)  # environment.json: versions, device, weight digests
        ref_point = OmegaConf.select(cfg, "search.ref_point")
        genome_cfg = OmegaConf.to_container(cfg.genome, resolve=True)
        stages_cfg = OmegaConf.select(cfg, "search.stages")
        stages = plan_stages(genome_cfg, OmegaConf.to_container(stages_cfg) if stages_cfg is not None else None, max_evals)
        check_async(cfg, session, stages)
        tracker = build_tracker(cfg)  # a missing tracker library is one line, before anything is evaluated
        executor = build_executor(cfg, session, run_dir)
        tracker.start(run_dir, OmegaConf.to_container(cfg, resolve=True))
        try:
            loop = run_stages(cfg, run_dir, session, executor, stages, seed, ref_point, on_ready=on_ready, tracker=tracker)
        finally:  # also on Ctrl-C: workers stopped, a Ray started here shut down
            executor.close()
        summary = finish_run(cfg, run_dir, session, loop)
        tracker.log_candidates(loop.archive.search_records(), session.objectives)
        tracker.finish(run_dir, summary)
        return summary


def finish_run(cfg: DictConfig, run_dir: Path, session: Session, loop: SearchLoop) -> dict[str, Any]:
    final = confirm_front(cfg, session, loop.archive, run_dir)  # the front chosen on fresh items (or the search's scores)
    summary = write_front(run_dir, session.objectives, loop.archive, loop.ref_point, final)
    chosen = write_recipes(run_dir, session.objectives, loop.archive, session.base, session.experts, final, dtype_name(session.pool))
    summary["chosen"] = chosen
    summary["budget"] = {"max_evals": loop.max_evals, "evaluated": loop.n_counted, "served_from_archive": loop.state.served, "ended_early": loop.exhausted}
    search = loop.archive.search_records()
    if search:
        summary["mean_merge_s"] = float(np.mean([r.merge_s for r in search]))
        summary["mean_eval_s"] = float(np.mean([r.eval_s for r in search]))
    # where the search's time went: merging, scoring, and waiting for the algorithm's proposals
    summary["time_s"] = search_times(search, loop.state.history)
    summary["hypervolume_history"] = [{"n_evals": h["n_evals"], "hypervolume": h["hypervolume"]} for h in loop.state.history]
    rescore = OmegaConf.select(cfg, "fitness.test_rescore")
    if rescore:
        # true: the chosen points (best per objective, knee); "front": every front point
        targets = dict(chosen)
        if rescore == "front":
            # both fronts: the final one and the search scores' own (before/after the confirmation)
            targets.update({f"front:{i}": i for i in [p["id"] for p in summary["front"]] + summary["final_front"]["search_front"]})
        summary["test"] = rescore_on_test(cfg, session, loop.archive, targets, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if OmegaConf.select(cfg, "report.plots") is not False:
        plot_run(run_dir, session.objectives, loop.archive, loop.state.history)
    if OmegaConf.select(cfg, "report.html") is not False:
        refresh_report(run_dir)
    _print_summary(summary, run_dir)
    return summary


def search_times(search: list, history: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds spent merging and scoring the search candidates, and waiting for the algorithm
    to propose (``proposal_wait_s``: the loop asks and waits, so every proposal second is waited)."""
    merge, evaluate = float(sum(r.merge_s for r in search)), float(sum(r.eval_s for r in search))
    wait = float(sum(h.get("propose_s") or 0.0 for h in history))
    total = merge + evaluate + wait
    return {"merge_s": round(merge, 3), "eval_s": round(evaluate, 3), "proposal_wait_s": round(wait, 3),
            "proposal_wait_share": round(wait / total, 4) if total > 0 else 0.0}


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    served = (summary.get("budget") or {}).get("served_from_archive") or 0
    final = summary.get("final_front") or {}
    lines = [
        f"done: {summary['n_evaluated']} candidates, {len(summary['front'])} on the Pareto front, hypervolume {summary['hypervolume']:.4f}"
        + (f" ({served} repeats served from the archive, not counted)" if served else ""),
        f"  front chosen by {final.get('estimate', 'search scores')}" + (f": {final['note']}" if final.get("note") else ""),
    ]
    times = summary.get("time_s") or {}
    if times:
        lines.append(f"  time: merging {times['merge_s']:.0f}s, scoring {times['eval_s']:.0f}s, waiting for proposals {times['proposal_wait_s']:.0f}s "
                     f"({100 * times['proposal_wait_share']:.0f}%)")
    for name, scores in summary["references"].items():
        lines.append(f"  {name:>16}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    for p in summary["front"][:12]:
        lines.append(f"  front #{p['id']:<9}: " + ", ".join(f"{k}={v:.3f}" for k, v in p["scores"].items()))
    lines.append(f"outputs in {run_dir} (report.html, pareto_front.csv, front.png, progress.png, recipes/)")
    say("\n".join(lines), stream=sys.stdout)  # on stdout, and in run.log with the progress lines


# the rooms the re-score and the export moved to, under their old names for callers
from evomerge.export import export_point  # noqa: E402,F401
from evomerge.rescore import exact_rescore, rescore_on_test, time_left  # noqa: E402,F401
