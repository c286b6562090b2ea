"""Wiring a composed config into a search run: session (evomerge.session) -> stages
(evomerge.driver) -> front, recipes, test re-score, report; and exporting a run's point."""

from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evomerge import provenance, rundir
from evomerge.checks import check_config
from evomerge.dfs import wiring as dfs
from evomerge.dfs.path import LayerPath, candidate_from_dict, pool_paths
from evomerge.driver import build_executor, check_async, run_stages
from evomerge.progress import say
from evomerge.errors import ConfigError, EvomergeError, raise_user_errors  # noqa: F401 -- re-exported for callers
from evomerge.estimators.lm_eval_fitness import LmEvalFitness, quiet_libraries
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.report import refresh_report
from evomerge.score_cache import ScoreCache
from evomerge.search.archive import Archive
from evomerge.search.loop import SearchLoop
from evomerge.search.report import plot_run, write_front, write_recipes
from evomerge.search.stages import plan_stages
from evomerge.session import Session, build_pool, config_value, fitness_tasks, open_session

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
    session = open_session(cfg, run_dir)
    provenance.record_session(run_dir, session)  # environment.json: versions, device, weight digests
    ref_point = OmegaConf.select(cfg, "search.ref_point")
    genome_cfg = OmegaConf.to_container(cfg.genome, resolve=True)
    stages_cfg = OmegaConf.select(cfg, "search.stages")
    stages = plan_stages(genome_cfg, OmegaConf.to_container(stages_cfg) if stages_cfg is not None else None, max_evals)
    check_async(cfg, session, stages)
    executor = build_executor(cfg, session, run_dir)
    try:
        loop = run_stages(cfg, run_dir, session, executor, stages, seed, ref_point, on_ready=on_ready)
    finally:  # also on Ctrl-C: workers stopped, a Ray started here shut down
        executor.close()
    return finish_run(cfg, run_dir, session, loop)


def finish_run(cfg: DictConfig, run_dir: Path, session: Session, loop: SearchLoop) -> dict[str, Any]:
    summary = write_front(run_dir, session.objectives, loop.archive, loop.ref_point)
    chosen = write_recipes(run_dir, session.objectives, loop.archive, session.base, session.experts)
    summary["chosen"] = chosen
    summary["budget"] = {"max_evals": loop.max_evals, "evaluated": loop.n_counted, "served_from_archive": loop.state.served, "ended_early": loop.exhausted}
    search = loop.archive.search_records()
    if search:
        summary["mean_merge_s"] = float(np.mean([r.merge_s for r in search]))
        summary["mean_eval_s"] = float(np.mean([r.eval_s for r in search]))
    summary["hypervolume_history"] = [{"n_evals": h["n_evals"], "hypervolume": h["hypervolume"]} for h in loop.state.history]
    rescore = OmegaConf.select(cfg, "fitness.test_rescore")
    if rescore:
        # true: the chosen points (best per objective, knee); "front": every front point
        targets = dict(chosen)
        if rescore == "front":
            targets.update({f"front:{p['id']}": p["id"] for p in summary["front"]})
        summary["test"] = rescore_on_test(cfg, session, loop.archive, targets, run_dir)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if OmegaConf.select(cfg, "report.plots") is not False:
        plot_run(run_dir, session.objectives, loop.archive, loop.state.history)
    if OmegaConf.select(cfg, "report.html") is not False:
        refresh_report(run_dir)
    _print_summary(summary, run_dir)
    return summary


def rescore_on_test(cfg: DictConfig, session: Session, archive: Archive, chosen: dict[str, int], run_dir: Path | None = None) -> dict[str, Any]:
    """Score the chosen points and the references on the held-out test split (full)."""
    tasks = fitness_tasks(OmegaConf.select(cfg, "fitness.objectives"), "") + fitness_tasks(OmegaConf.select(cfg, "fitness.extra"), "")
    test = LmEvalFitness(
        session.merger.model,
        session.merger.tokenizer,
        tasks,
        split="test",
        batch_size=config_value(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
    )
    by_id = {r.id: r for r in archive.records}
    targets = {r.label: r for r in archive.records if r.kind == "reference"}
    targets.update({name: by_id[i] for name, i in chosen.items()})
    settings = {"split": "test", "tasks": [vars(t) for t in tasks], "batch_size": OmegaConf.select(cfg, "fitness.batch_size"), "max_length": OmegaConf.select(cfg, "fitness.max_length")}
    settings["thresholds"] = "exact"  # scores of exact merges (earlier caches held sampled-table merges)
    cache = ScoreCache.from_env(run_dir, settings) if run_dir is not None else None  # shared by runs when $EVOMERGE_SCORE_CACHE is set
    score_searched = OmegaConf.select(cfg, "fitness.test_rescore_searched")
    return exact_rescore(session.merger, targets, test, cache, score_searched=score_searched is not False)


def exact_rescore(merger: Any, targets: dict[str, Any], test: Any, cache: ScoreCache | None = None, score_searched: bool = True) -> dict[str, Any]:
    """Test scores of the exact merges (``Merger.exact_thresholds``: the weights the export
    writes and mergekit computes). Where a point's exact merge differs from the one the
    search scored (sampled magnitude table), the point is marked ``exact_differs`` and, with
    ``score_searched``, that merge is scored too: ``searched_scores`` (one more test score per
    such point, not cached)."""
    exact = getattr(merger, "exact_thresholds", None)
    searched: dict[str, tuple] = {}
    if exact is not None:
        for name, rec in targets.items():
            merger.apply(candidate_from_dict(rec.recipe))
            searched[name] = merger.fingerprint()
    out: dict[str, Any] = {}
    differs: list[str] = []
    started = time.time()
    scoring_s: list[float] = []  # time of each point scored here (not served by the cache)
    with exact() if exact is not None else nullcontext():
        for i, (name, rec) in enumerate(targets.items(), start=1):
            scores = cache.get(rec.recipe) if cache else None
            note = "score cache" if scores is not None else f"{time.time() - started:.0f}s elapsed{time_left(scoring_s, len(targets) - i + 1)}"
            say(f"test re-score {i}/{len(targets)}: {name} ({note})")
            point_started = time.time()
            merged = False
            if scores is None or name in searched:
                merger.apply(candidate_from_dict(rec.recipe))
                merged = True
            if scores is None:
                scores = dict(test())
                scoring_s.append(time.time() - point_started)
                if cache:
                    cache.put(rec.recipe, scores)
            out[name] = {"id": rec.id, "scores": scores}
            if merged and name in searched and merger.fingerprint() != searched[name]:
                differs.append(name)
    for name in differs:
        out[name]["exact_differs"] = True
    if differs and score_searched:
        say(f"test re-score: the exact merge of {len(differs)} point(s) differs from the merge the search scored; scoring those searched merges too")
        started, scoring_s = time.time(), []
        for i, name in enumerate(differs, start=1):  # the searched (sampled-table) merge of the same recipe
            say(f"test re-score of the searched merge {i}/{len(differs)}: {name} ({time.time() - started:.0f}s elapsed{time_left(scoring_s, len(differs) - i + 1)})")
            point_started = time.time()
            merger.apply(candidate_from_dict(targets[name].recipe))
            out[name]["searched_scores"] = dict(test())
            scoring_s.append(time.time() - point_started)
        log.warning("test re-score: the exact merge of %s differs from the merge the search scored; both scores are in summary.json", ", ".join(differs))
    elif differs:
        log.warning(
            "test re-score: the exact merge of %s differs from the merge the search scored; only the exact merge was scored (fitness.test_rescore_searched=false)",
            ", ".join(differs),
        )
    return out


def time_left(point_s: list[float], remaining: int) -> str:
    """``, at most ~1h 05m left``: the remaining points at the mean time of those scored so far
    (an upper bound: some may come from the score cache); empty before the first is scored."""
    if not point_s or remaining <= 0:
        return ""
    left = round(remaining * sum(point_s) / len(point_s))
    hours, rest = divmod(left, 3600)
    text = f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"
    return f", at most ~{text} left"


def _print_summary(summary: dict[str, Any], run_dir: Path) -> None:
    served = (summary.get("budget") or {}).get("served_from_archive") or 0
    lines = [
        f"done: {summary['n_evaluated']} candidates, {len(summary['front'])} on the Pareto front, hypervolume {summary['hypervolume']:.4f}"
        + (f" ({served} repeats served from the archive, not counted)" if served else "")
    ]
    for name, scores in summary["references"].items():
        lines.append(f"  {name:>16}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()))
    for p in summary["front"][:12]:
        lines.append(f"  front #{p['id']:<9}: " + ", ".join(f"{k}={v:.3f}" for k, v in p["scores"].items()))
    lines.append(f"outputs in {run_dir} (report.html, pareto_front.csv, front.png, progress.png, recipes/)")
    print("\n".join(lines))


# ---------------------------------------------------------------- export


def export_point(run_dir: str | Path, point: str, out: str | Path | None = None, force: bool = False, verify: bool = False) -> Path:
    """Write archive point ``point`` (an id, ``knee`` or ``best_<objective>``) of a run as an HF folder.
    Refuses a non-empty target (unless ``force``), a pool model's folder, and changed models.
    The merge is exact (mergekit's choice among tied magnitudes, no sampled table). With
    ``verify``: mergekit runs on the recipe's YAML (written as ``mergekit.yaml``, its header
    saying what was verified) and one line compares it with the folder (evomerge/verify.py)."""
    run = Path(run_dir)
    if not (run / CONFIG_FILE).is_file() or not (run / "archive.jsonl").is_file():
        raise ConfigError(f"{run} is not an evomerge run directory (no {CONFIG_FILE} / archive.jsonl)")
    archive = Archive(run / "archive.jsonl")
    by_id = {str(r.id): r for r in archive.records}
    by_label = {r.label: r for r in archive.records if r.label}
    if point in by_id:
        record = by_id[point]
    elif point in by_label:
        record = by_label[point]
    elif point in _chosen_points(run) and str(_chosen_points(run)[point]) in by_id:  # knee / best_*: any recipe kind
        record = by_id[str(_chosen_points(run)[point])]
    elif (run / "recipes" / f"{point}.yaml").is_file():
        rid = Recipe.load(run / "recipes" / f"{point}.yaml").metadata.get("archive_id")
        if str(rid) not in by_id:
            raise ConfigError(f"recipes/{point}.yaml names archive id {rid}, which {run / 'archive.jsonl'} does not hold")
        record = by_id[str(rid)]
    else:
        raise ConfigError(f"no point {point!r} in {run}: use an archive id, knee, best_<objective> or a reference label")
    if record.error:
        raise ConfigError(f"point {point} failed during the search ({record.error}); nothing to export")
    cfg = OmegaConf.load(run / CONFIG_FILE)
    assert isinstance(cfg, DictConfig)
    quiet_libraries()
    pool, experts, base = build_pool(cfg)
    target = Path(out) if out else run / "exports" / f"point-{record.id}"
    rundir.check_export_target(target, [base, *experts.values()], force)
    models = {"base": base, **{f"expert:{k}": v for k, v in experts.items()}}
    rundir.check_fingerprints(run, rundir.fingerprints(models), force, "export")
    # exact "top d" masks (mergekit's choice among ties), whatever table the search used
    merger = Merger(pool, device=OmegaConf.select(cfg, "device") or "auto", offload=bool(OmegaConf.select(cfg, "offload")), table_size=None)
    recipe = candidate_from_dict(record.recipe)
    if isinstance(recipe, LayerPath):  # a data-flow point: its layers materialised (evomerge/dfs/export.py)
        if verify:
            raise ConfigError("verify=true checks recipe exports; this point is a data-flow (layer path) merge")
        recipe.base, recipe.experts = base, list(experts)
        return dfs.export_path(recipe, merger, list(experts), target, pool_paths(base, experts))
    merger.apply(recipe)
    recipe.base, recipe.experts = base, list(experts)
    merger.save(target, recipe)
    if verify:
        from evomerge.verify import mergekit_yaml_text, verify_export

        result = verify_export(target, recipe, base, list(experts.values()))
        text = mergekit_yaml_text(recipe, base, list(experts.values()))
        (target / "mergekit.yaml").write_text(f"# {result.line()}\n" + text)
        print(result.line())
    return target


def _chosen_points(run: Path) -> dict[str, int]:
    """``knee`` / ``best_<objective>`` -> archive id, from the run's summary.json (if any)."""
    try:
        chosen = json.loads((run / "summary.json").read_text()).get("chosen") or {}
        return {str(k): int(v) for k, v in chosen.items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}
