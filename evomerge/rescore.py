"""The test re-score: chosen front points and the references scored on the held-out test
split, each point's *exact* merge (the weights exports write and mergekit computes)."""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from evomerge.dfs.path import candidate_from_dict
from evomerge.estimators.lm_eval_fitness import LmEvalFitness
from evomerge.progress import say
from evomerge.score_cache import ScoreCache
from evomerge.search.archive import Archive
from evomerge.session import Session, config_value, fitness_tasks

log = logging.getLogger(__name__)


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
    """``_rescore_points`` with each archived point scored once, however many names it has (a
    knee that is also best_<objective> and a front point): every name gets the same entry."""
    names_of: dict[int, list[str]] = {}
    for name, rec in targets.items():
        names_of.setdefault(rec.id, []).append(name)
    unique = {", ".join(names): targets[names[0]] for names in names_of.values()}
    scored = _rescore_points(merger, unique, test, cache, score_searched)
    out: dict[str, Any] = {}
    for joined, entry in scored.items():
        for name in joined.split(", "):
            out[name] = dict(entry)
    return {name: out[name] for name in targets}


def _rescore_points(merger: Any, targets: dict[str, Any], test: Any, cache: ScoreCache | None = None, score_searched: bool = True) -> dict[str, Any]:
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
            stderr = None
            if scores is None:
                result = test()
                scores, stderr = dict(result), dict(getattr(result, "stderr", {}) or {})
                scoring_s.append(time.time() - point_started)
                if cache:
                    cache.put(rec.recipe, scores)
            out[name] = {"id": rec.id, "scores": scores, **({"stderr": stderr} if stderr else {})}
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
