"""A run directory read back for reporting: archive, config, summary (no models, no torch).

The archive is read as raw JSON so that fields added to ``Record`` later (``stderr``,
``fidelity``, a wall-clock ``time``) are picked up when present and ignored when absent.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from evomerge.errors import ConfigError
from evomerge.search.archive import Damaged, describe_damage, read_lines
from evomerge.search.pareto import hypervolume, knee_point, nondominated

MAX_HISTORY_POINTS = 200  # hypervolume is recomputed at most this many times per report
SEPARATION_Z = 2.0  # two front points are "not separable" when every score differs by <= 2 s.e.


@dataclass
class Point:
    """One archived candidate (search or reference), as the report needs it."""

    id: int
    kind: str
    scores: dict[str, float]
    losses: list[float]
    recipe: dict[str, Any]
    error: str | None = None
    label: str | None = None
    generation: int | None = None
    merge_s: float = 0.0
    eval_s: float = 0.0
    stderr: dict[str, float] | None = None
    fidelity: Any = None
    time: float | None = None  # wall-clock timestamp, when the archive records one

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def name(self) -> str:
        return self.label or f"#{self.id}"

    def se(self, objective: str) -> float | None:
        if not self.stderr:
            return None
        v = self.stderr.get(objective)
        return float(v) if v is not None and math.isfinite(float(v)) else None

    def methods(self) -> list[tuple[str, str]]:
        """(group name, method) per recipe group."""
        return [(str(g.get("name", g.get("part"))), str(g.get("method"))) for g in self.recipe.get("groups", [])]


def _point(raw: dict[str, Any]) -> Point:
    stderr = raw.get("stderr")
    t = raw.get("time", raw.get("timestamp"))
    return Point(
        id=int(raw["id"]),
        kind=str(raw.get("kind", "search")),
        scores={k: float(v) for k, v in (raw.get("scores") or {}).items() if v is not None},
        losses=[float(v) for v in raw.get("losses") or []],
        recipe=raw.get("recipe") or {},
        error=raw.get("error"),
        label=raw.get("label"),
        generation=raw.get("generation"),
        merge_s=float(raw.get("merge_s") or 0.0),
        eval_s=float(raw.get("eval_s") or 0.0),
        stderr={k: float(v) for k, v in stderr.items() if v is not None} if isinstance(stderr, dict) else None,
        fidelity=raw.get("fidelity"),
        time=float(t) if isinstance(t, (int, float)) else None,
    )


def read_archive(path: Path) -> tuple[list[Point], str]:
    """Every intact record of archive.jsonl, read with the search's own tolerant reader
    (evomerge.search.archive.read_lines), and one line naming what was skipped: damaged
    lines (bad bytes, bad JSON, checksum mismatch) and a torn last line. Nothing is
    rewritten: only the search, which holds the run lock, moves damaged lines aside."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    lines = read_lines(data)
    points: list[Point] = []
    damaged = list(lines.damaged)
    for number, item in lines.items:
        try:
            points.append(_point(item))
        except (KeyError, TypeError, ValueError, AttributeError):
            damaged.append(Damaged(number, "not an archive record", lines.raw[number]))
    damaged.sort(key=lambda d: d.line)
    return points, describe_damage(path, damaged, lines.torn_bytes if lines.torn_at is not None else None)


@dataclass
class RunData:
    run_dir: Path
    objectives: list[str]
    extras: list[str]
    expert_names: list[str]
    ref_point: np.ndarray
    config: dict[str, Any]
    points: list[Point]
    summary: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None
    damage: str = ""  # what the reader skipped (damaged lines, a torn tail); '' when nothing
    _front_cache: dict[int | None, list[Point]] = field(default_factory=dict, repr=False)

    # ---- selections
    @property
    def references(self) -> list[Point]:
        return [p for p in self.points if p.kind == "reference" and p.ok]

    @property
    def search(self) -> list[Point]:
        """Search candidates in evaluation order, cut at ``budget`` when one is set."""
        s = [p for p in self.points if p.kind == "search"]
        return s[: self.budget] if self.budget is not None else s

    @property
    def evaluated(self) -> list[Point]:
        return [p for p in self.search if p.ok]

    @property
    def failed(self) -> list[Point]:
        return [p for p in self.search if not p.ok]

    @property
    def finished(self) -> bool:
        return (self.run_dir / "summary.json").is_file()

    def losses(self, points: Sequence[Point]) -> np.ndarray:
        return np.array([p.losses for p in points], dtype=float) if points else np.zeros((0, len(self.objectives)))

    def front(self) -> list[Point]:
        """The run's final front (a finished run's summary.json: chosen on fresh validation items,
        with those scores), else the non-dominated search candidates; sorted along the losses."""
        cached = self._front_cache.get(self.budget)
        if cached is None:
            final = self.final_front() if self.budget is None else None
            if final is not None:
                cached = self._front_cache[self.budget] = final
            else:
                ok = self.evaluated
                idx = nondominated(self.losses(ok)) if ok else []
                cached = self._front_cache[self.budget] = sorted((ok[i] for i in idx), key=lambda p: p.losses)
        return list(cached)

    def final_front(self) -> list[Point] | None:
        """summary.json's front with the scores each point was chosen on; None before the run
        ends or for runs whose summary names no final-front estimate."""
        if not (self.summary.get("final_front") or {}).get("estimate"):
            return None
        by_id = {p.id: p for p in self.evaluated}
        out = []
        for entry in self.summary.get("front") or []:
            point = by_id.get(entry.get("id")) if isinstance(entry, dict) else None
            if point is None or not isinstance(entry.get("scores"), dict):
                return None  # a summary that does not match the archive: fall back to the archive's front
            scores = {**point.scores, **{k: float(v) for k, v in entry["scores"].items() if isinstance(v, (int, float))}}
            out.append(replace(point, scores=scores, losses=[1.0 - scores.get(o, 0.0) for o in self.objectives]))
        return sorted(out, key=lambda p: p.losses)

    def chosen_by(self) -> str:
        """Which estimate chose the front: 'confirmation' or 'search scores'."""
        return str((self.summary.get("final_front") or {}).get("estimate") or "search scores")

    def hypervolume(self) -> float:
        return hypervolume(self.losses([p for p in self.front()]), self.ref_point)

    def knee(self) -> Point | None:
        f = self.front()
        if not f:
            return None
        chosen = (self.summary.get("chosen") or {}).get("knee")
        by_id = {p.id: p for p in f}
        if chosen in by_id and self.budget is None:
            return by_id[chosen]
        return f[knee_point(self.losses(f))]

    def chosen(self) -> dict[int, list[str]]:
        """Archive id -> the names it was chosen under (knee, best_<objective>)."""
        out: dict[int, list[str]] = {}
        for name, rid in (self.summary.get("chosen") or {}).items():
            out.setdefault(int(rid), []).append(name)
        return out

    def hv_history(self) -> list[tuple[int, float]]:
        """(evaluations, hypervolume of the front so far) at each generation's end (or evenly
        spaced, at most MAX_HISTORY_POINTS), computed from the archive itself."""
        search = self.search
        if not search:
            return []
        ends = [i + 1 for i in range(len(search)) if i + 1 == len(search) or search[i + 1].generation != search[i].generation]
        if len(ends) > MAX_HISTORY_POINTS:
            step = math.ceil(len(search) / MAX_HISTORY_POINTS)
            ends = sorted(set(range(step, len(search) + 1, step)) | {len(search)})
        out = []
        front = np.zeros((0, len(self.objectives)))
        start = 0
        for n in ends:
            new = self.losses([p for p in search[start:n] if p.ok])
            merged = np.vstack([front, new]) if len(new) else front
            front = merged[nondominated(merged)] if len(merged) else merged
            out.append((n, hypervolume(front, self.ref_point)))
            start = n
        return out

    def best_so_far(self) -> dict[str, list[float | None]]:
        """Per objective, the best score among the first n search candidates, n = 1..N."""
        out: dict[str, list[float | None]] = {}
        for o in self.objectives:
            best: float | None = None
            seq = []
            for p in self.search:
                if p.ok and o in p.scores:
                    best = p.scores[o] if best is None else max(best, p.scores[o])
                seq.append(best)
            out[o] = seq
        return out

    def elapsed_s(self) -> tuple[list[float], bool]:
        """Seconds since the run's first record, per search candidate, and whether they are
        wall clock (records carry ``time``) or cumulative merge + evaluation time."""
        if self.points and all(p.time is not None for p in self.points):
            t0 = min(p.time for p in self.points)  # type: ignore[type-var]
            return [p.time - t0 for p in self.search], True  # type: ignore[operator]
        total, by_id = 0.0, {}
        for p in self.points:
            total += p.merge_s + p.eval_s
            by_id[p.id] = total
        return [by_id[p.id] for p in self.search], False

    def not_separable(self) -> dict[int, list[int]]:
        """Front point id -> ids of other front points within SEPARATION_Z standard errors on
        every objective (empty when the archive has no standard errors)."""
        f = [p for p in self.front() if p.stderr]
        out: dict[int, list[int]] = {}
        for p in f:
            for q in f:
                if q is p:
                    continue
                close = True
                for o in self.objectives:
                    sp, sq = p.se(o), q.se(o)
                    if sp is None or sq is None:
                        close = False
                        break
                    if abs(p.scores[o] - q.scores[o]) > SEPARATION_Z * math.hypot(sp, sq):
                        close = False
                        break
                if close:
                    out.setdefault(p.id, []).append(q.id)
        return out

    def test_scores(self) -> dict[str, dict[str, Any]]:
        """summary.json -> test: {name: {id, scores}} for the references and chosen points."""
        return dict(self.summary.get("test") or {})


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def load_run(run_dir: str | Path, budget: int | None = None) -> RunData:
    """Read a run directory (finished, running or killed) for reporting."""
    run = Path(run_dir)
    archive = run / "archive.jsonl"
    if not archive.is_file():
        raise ConfigError(f"{run} is not an evomerge run directory (no archive.jsonl)")
    config = read_config(run)
    summary: dict[str, Any] = {}
    if (run / "summary.json").is_file():
        try:
            loaded_summary = json.loads((run / "summary.json").read_bytes().decode("utf-8"))
            summary = loaded_summary if isinstance(loaded_summary, dict) else {}
        except (OSError, ValueError):  # damaged: the report does without it (JSONDecodeError, UnicodeDecodeError)
            summary = {}
    points, damage = read_archive(archive)
    fitness = config.get("fitness") if isinstance(config.get("fitness"), dict) else {}
    objectives = [str(o["name"]) for o in fitness.get("objectives") or [] if isinstance(o, dict) and "name" in o]
    objectives = objectives or list(summary.get("objectives") or [])
    if not objectives:
        first = next((p for p in points if p.ok and p.scores), None)
        objectives = list(first.scores) if first else []
    if not objectives:
        raise ConfigError(f"{run}: cannot tell the objectives (config.yaml names no fitness.objectives and no candidate is scored)")
    extras = sorted({k for p in points for k in p.scores} - set(objectives))
    ref = (config.get("search") or {}).get("ref_point") if isinstance(config.get("search"), dict) else None
    try:
        ref_point = np.asarray(ref if ref is not None else [1.0] * len(objectives), dtype=float)
    except (TypeError, ValueError):
        ref_point = np.zeros(0)
    if ref_point.shape != (len(objectives),):
        raise ConfigError(f"{run / 'config.yaml'}: search.ref_point {ref!r} does not have one value per objective ({', '.join(objectives)})")
    # a record with another number of losses than objectives cannot be placed (e.g. config.yaml edited)
    misfits = [p for p in points if p.ok and len(p.losses) != len(objectives)]
    if misfits:
        points = [p for p in points if not (p.ok and len(p.losses) != len(objectives))]
        note = f"{len(misfits)} record(s) with another number of losses than the {len(objectives)} objectives left out"
        damage = f"{damage}; {note}" if damage else f"{archive}: {note}"
    experts = config["modelpool"].get("experts") if isinstance(config.get("modelpool"), dict) else None
    names = list(experts) if isinstance(experts, dict) else []
    if not names:
        names = next((list(p.recipe.get("experts") or []) for p in points if p.recipe.get("experts")), [])
    if not names:
        names = [lbl.split(":", 1)[1] for p in points if (lbl := p.label or "").startswith("expert:")]
    return RunData(run, objectives, extras, [str(n) for n in names], ref_point, config, points, summary, budget, damage=damage)


def read_config(run: Path) -> dict[str, Any]:
    """The run's config.yaml as a mapping; missing or unreadable is a one-line ConfigError."""
    path = run / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the report needs the run's config (objectives, reference point) -- restore it from the run's command line")
    try:
        loaded = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        reason = where + str(getattr(exc, "problem", None) or getattr(exc, "strerror", None) or exc).splitlines()[0][:100]
        raise ConfigError(f"{path} is damaged ({reason}); restore it from the run's command line") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} is damaged (not a mapping of options); restore it from the run's command line")
    return loaded


def recipe_table(recipe: dict[str, Any], experts: Sequence[str]) -> dict[str, Any]:
    """Per recipe group: method, weight and density per expert (None where the method has
    none), and the other parameters -- the rows of a recipe heatmap."""
    groups = recipe.get("groups") or []
    n = max([len(experts)] + [len(g.get("params", {}).get("weight") or []) for g in groups])
    names = list(experts) + [f"expert{i}" for i in range(len(experts), n)]
    rows = []
    for g in groups:
        params = dict(g.get("params") or {})

        def per_expert(key: str) -> list[float | None]:
            v = params.pop(key, None)
            if isinstance(v, (list, tuple)):
                return [float(x) for x in v] + [None] * (n - len(v))
            return [float(v)] * n if isinstance(v, (int, float)) else [None] * n

        weight, density = per_expert("weight"), per_expert("density")
        params.pop("seed", None)
        rows.append({"group": str(g.get("name", g.get("part"))), "method": str(g.get("method")), "weight": weight, "density": density, "other": params})
    return {"experts": names, "groups": rows}


def config_without_seed(config: dict[str, Any]) -> dict[str, Any]:
    """A run's flattened config minus what varies between repeats of one setting."""
    flat = _flatten(config)
    drop_prefixes = ("hydra.", "report.")
    drop = {"seed", "resume", "search.progress"}
    return {k: v for k, v in flat.items() if k not in drop and not k.startswith(drop_prefixes)}
