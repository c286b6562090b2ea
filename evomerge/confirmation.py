"""Scoring the final front's candidates on fresh validation items (evomerge.search.confirm).

The confirmation scores are kept in ``confirmation.jsonl`` in the run directory, one line
per candidate, so a run killed while confirming continues where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from evomerge.dfs.path import candidate_from_dict
from evomerge.errors import ConfigError
from evomerge.progress import say
from evomerge.search.archive import Archive
from evomerge.search.confirm import (
    CONFIRMATION,
    POOLED,
    SEARCH_SCORES,
    ConfirmSettings,
    FinalFront,
    confirmation_candidates,
    final_front,
    pooled_scores,
)

CONFIRM_FILE = "confirmation.jsonl"
MODES = (CONFIRMATION, POOLED, "search_scores")


def confirm_settings(cfg: DictConfig) -> ConfirmSettings:
    """``fitness.final_front`` (pooled | confirmation | search_scores), ``fitness.confirm_z``,
    ``fitness.confirm_max_points``, checked before any model loads."""
    mode = OmegaConf.select(cfg, "fitness.final_front", default=POOLED)
    if mode not in MODES:
        raise ConfigError(f"fitness.final_front must be {', '.join(MODES[:-1])} or {MODES[-1]}, got {mode!r}")
    z = OmegaConf.select(cfg, "fitness.confirm_z", default=1.0)
    if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
        raise ConfigError(f"fitness.confirm_z must be a number >= 0, got {z!r}")
    points = OmegaConf.select(cfg, "fitness.confirm_max_points", default=16)
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ConfigError(f"fitness.confirm_max_points must be a positive integer, got {points!r}")
    return ConfirmSettings(mode=SEARCH_SCORES if mode == "search_scores" else mode, z=float(z), max_points=points)


def _fresh_items(fitness: Any, tasks: list[str]) -> dict[str, list[int]] | None:
    """Per task, the validation items outside the search's subset; None when the search's
    estimator has no fixed subset (multi-fidelity, IRT) or a task has no item left."""
    subset = getattr(fitness, "subset", None)
    task_objects = getattr(fitness, "task_objects", None)
    if not isinstance(subset, dict) or not isinstance(task_objects, dict) or type(fitness).__name__ != "LmEvalFitness":
        return None
    fresh = {}
    for task in tasks:
        if task not in task_objects or task not in subset:
            return None
        used = set(subset[task])
        rest = [i for i in range(len(task_objects[task].eval_docs)) if i not in used]
        if not rest:
            return None
        fresh[task] = rest
    return fresh


def _read_cache(path: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            out[int(row["id"])] = row
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line of a killed run: scored again
    return out


def _drop_torn_tail(path: Path) -> None:
    """A kill mid-write leaves a last line without its newline: cut it, so the next line starts clean."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def confirm_front(cfg: DictConfig, session: Any, archive: Archive, run_dir: Path | None) -> FinalFront:
    """The run's final front: confirmed on fresh validation items, or (``search_scores``, or
    nothing left to confirm on) the raw front of the search scores."""
    from evomerge.search.report import front

    settings = confirm_settings(cfg)
    search = archive.search_records()
    raw = sorted(front(search), key=lambda r: r.losses)
    by_scores = FinalFront([r.id for r in raw], SEARCH_SCORES, scores={r.id: dict(r.scores) for r in raw}, stderr={r.id: dict(r.stderr) for r in raw})
    if settings.mode == SEARCH_SCORES:
        by_scores.note = "fitness.final_front=search_scores"
        return by_scores
    objectives = list(session.objectives)
    task_of = {t.name: t.task for t in session.fitness.tasks} if hasattr(session.fitness, "tasks") else {}
    fresh = _fresh_items(session.fitness, [task_of.get(o, o) for o in objectives])
    if fresh is None or not raw:
        by_scores.note = "no validation items outside the search's subset (or no fixed subset): chosen on the search scores"
        return by_scores
    candidates = confirmation_candidates(search, objectives, settings)
    scorer = _confirmation_scorer(cfg, session, fresh, objectives)
    cache_path = run_dir / CONFIRM_FILE if run_dir is not None else None
    cache = _read_cache(cache_path) if cache_path is not None else {}
    if cache_path is not None:
        _drop_torn_tail(cache_path)
    confirmed: dict[int, dict[str, float]] = {}
    stderr: dict[int, dict[str, float]] = {}
    started = time.time()
    for i, rec in enumerate(candidates, start=1):
        row = cache.get(rec.id)
        if row is None or row.get("key") != rec.key:
            say(f"final front: confirming {i}/{len(candidates)} on {sum(len(v) for v in fresh.values())} fresh validation items ({time.time() - started:.0f}s)")
            session.merger.apply(candidate_from_dict(rec.recipe))
            scores = scorer()
            row = {"id": rec.id, "key": rec.key, "scores": dict(scores), "stderr": dict(scores.stderr), "fidelity": dict(scores.fidelity)}
            if cache_path is not None:
                with cache_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
        confirmed[rec.id] = {o: float(row["scores"][o]) for o in objectives}
        stderr[rec.id] = {o: float(row.get("stderr", {}).get(o, 0.0)) for o in objectives}
    items = {o: len(fresh[task_of.get(o, o)]) for o in objectives}
    note = (f"{len(candidates)} candidates within {settings.z:g} s.e. of the search front, "
            f"confirmed on {', '.join(f'{n} {o}' for o, n in items.items())} fresh validation items")
    if settings.mode == POOLED:  # chosen on the search's and the fresh items together
        by_id = {r.id: r for r in candidates}
        confirmed = {i: pooled_scores(by_id[i], confirmed[i], objectives, items) for i in confirmed}
        stderr = {i: {o: float(np.hypot(by_id[i].stderr.get(o, 0.0), stderr[i][o])) / 2 for o in objectives} for i in stderr}
        note += ", front chosen on the search's and the fresh items pooled"
    ids = final_front(candidates, confirmed, objectives)
    return FinalFront(ids, settings.mode, note=note, scores={i: confirmed[i] for i in ids}, stderr={i: stderr[i] for i in ids}, items=items,
                      candidates=[r.id for r in candidates])


def _confirmation_scorer(cfg: DictConfig, session: Any, fresh: dict[str, list[int]], objectives: list[str]) -> Any:
    from evomerge.estimators.lm_eval_fitness import LmEvalFitness
    from evomerge.session import config_value

    tasks = [t for t in session.fitness.tasks if t.name in objectives]
    return LmEvalFitness(
        session.merger.model,
        session.merger.tokenizer,
        tasks,
        split=OmegaConf.select(cfg, "fitness.split") or "validation",
        subset=fresh,
        batch_size=config_value(cfg, "fitness.batch_size", int, positive=True),
        max_length=OmegaConf.select(cfg, "fitness.max_length"),
        include_paths=list(OmegaConf.select(cfg, "fitness.include_paths") or []),
    )
