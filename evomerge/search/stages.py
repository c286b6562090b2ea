"""Staged search: a cheap, low-dimensional stage whose front seeds a richer one.

A stage is a genome (the run's ``genome`` config with some options overridden) and a share
of the evaluation budget. Every stage writes into the same archive; each later stage starts
from the earlier stages' Pareto front, re-expressed in its own genome (a model-wise recipe
is a layer-wise one with every group equal), plus the hand-made merges. Pure: no models.

    search:
      stages:
        - {name: modelwise, fraction: 0.34, genome: {layer_groups: 1, separate_embed_head: false}}
        - {name: layerwise}          # the rest of the budget, the run's genome as configured

A stage may bring its own ``algorithm`` (a mapping like the files in ``configs/algorithm/``),
e.g. a coarse task-arithmetic grid whose front the layer-wise NSGA-II stage refines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.search.archive import Record
from evomerge.search.genome import GenomeSpace
from evomerge.search.pareto import nondominated


@dataclass(frozen=True)
class Stage:
    name: str
    genome: dict[str, Any]
    evals: int
    checkpoint: str
    algorithm: dict[str, Any] | None = None  # None: the run's algorithm


def plan_stages(genome: dict[str, Any], stages: Sequence[dict[str, Any]] | None, max_evals: int) -> list[Stage]:
    """The stages of a run; without ``search.stages`` one stage with the whole budget."""
    if not stages:
        return [Stage("search", dict(genome), max_evals, "checkpoint.pkl")]
    out: list[Stage] = []
    used = 0
    for i, raw in enumerate(stages):
        if not isinstance(raw, dict):
            raise ConfigError(f"search.stages[{i}] must be a mapping with name, fraction and genome, got {raw!r}")
        unknown = set(raw) - {"name", "fraction", "genome", "algorithm"}
        if unknown:
            raise ConfigError(f"search.stages[{i}] has unknown key {sorted(unknown)[0]!r}; known: name, fraction, genome, algorithm")
        algorithm = raw.get("algorithm")
        if algorithm is not None and not (isinstance(algorithm, dict) and "_target_" in algorithm):
            raise ConfigError(f"search.stages[{i}].algorithm must be an algorithm config with _target_ (as in configs/algorithm/), got {algorithm!r}")
        name = str(raw.get("name", f"stage{i}"))
        last = i == len(stages) - 1
        if last:
            evals = max_evals - used
        else:
            fraction = raw.get("fraction")
            if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
                raise ConfigError(f"search.stages[{i}].fraction must be a number in (0, 1), got {fraction!r}")
            evals = int(round(fraction * max_evals))
        if evals < 1:
            raise ConfigError(f"search.stages: stage {name!r} gets no evaluations of search.max_evals={max_evals}")
        used += evals
        overrides = raw.get("genome") or {}
        if not isinstance(overrides, dict):
            raise ConfigError(f"search.stages[{i}].genome must be a mapping of genome options")
        checkpoint = "checkpoint.pkl" if i == 0 else f"checkpoint.{name}.pkl"
        out.append(Stage(name, {**genome, **overrides}, evals, checkpoint, dict(algorithm) if algorithm else None))
    if len({s.name for s in out}) != len(out):
        raise ConfigError("search.stages: stage names must be unique")
    return out


def uniform_recipe(recipe: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """(method, params) when every group of an archived recipe is merged the same way."""
    groups = recipe.get("groups") or []
    if not groups:
        return None
    first = groups[0]
    if any(g["method"] != first["method"] or g["params"] != first["params"] for g in groups):
        return None
    return first["method"], dict(first["params"])


def carry_front(records: Sequence[Record], space: GenomeSpace, limit: int | None = None) -> np.ndarray:
    """The non-dominated search records, re-expressed in ``space`` where it can."""
    ok = [r for r in records if r.kind == "search" and r.error is None]
    if not ok:
        return np.zeros((0, space.n_var))
    front = [ok[i] for i in nondominated(np.array([r.losses for r in ok]))]
    front.sort(key=lambda r: tuple(r.losses))
    rows = []
    for r in front:
        uniform = uniform_recipe(r.recipe)
        x = space.encode_uniform(*uniform) if uniform else None
        if x is not None and not any(np.array_equal(x, y) for y in rows):
            rows.append(x)
    rows = rows[:limit] if limit else rows
    return np.array(rows) if rows else np.zeros((0, space.n_var))
