"""Score each merge once on the full split, then let every estimator read its items from that.

Why: on SmolLM2 a live measurement scores every held-out candidate once per estimator
(full split, random subset, IRT anchors, two multi-fidelity slacks), five model passes per
candidate, and the IRT calibration again on the full split; that is hours on a 2-core CPU.
Every estimator only ever asks for per-item values of docs of the full split
(``score_items(ids)``), and with greedy decoding an item's value does not depend on the other
items in its batch (up to floating-point differences from padding, which
``tests/test_estimator_replay.py`` checks on the tiny zoo), so the full-split items of a
merge answer every estimator's question exactly as a live pass would.

The estimators' MAE is then measured on the same answers as live. Their *cost* is not
measured by running them: it is derived as merge time + items asked x the candidate's
measured full-split seconds per item. That understates small subsets slightly (a batch of
200 items runs more efficiently per item than one of 20), which the table states.

The full-split items of every merge are appended to a JSON-lines cache as they are scored,
so an interrupted measurement continues where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from evomerge.estimators.items import ItemScores


def recipe_key(recipe: Any) -> str:
    return hashlib.sha256(json.dumps(recipe.to_dict(), sort_keys=True).encode()).hexdigest()[:24]


class ItemTable:
    """Full-split per-item values of merges, scored live once per recipe (cached on disk);
    ``current`` is the entry of the merge last applied through :class:`ReplayMerger`."""

    def __init__(self, live: Any, cache: Path | None = None):
        self.live = live  # an LmEvalFitness on the full split
        self.full_ids = {t: list(range(n)) for t, n in live.scorer.n_docs.items()}
        self.cache = cache
        self.entries: dict[str, dict] = {}
        if cache is not None and cache.exists():
            for line in cache.read_text().splitlines():
                try:
                    e = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from an interrupted run
                    continue
                self.entries[e["key"]] = e
        self.current: dict | None = None
        self.items_served = 0
        self.live_seconds = 0.0  # full-split scoring time of every recipe made current (cached ones included)
        self.scored_seconds = 0.0  # the part of it actually spent scoring in this process

    def make_current(self, recipe: Any) -> dict:
        key = recipe_key(recipe)
        entry = self.entries.get(key)
        if entry is None:
            started = time.perf_counter()
            items = self.live.score_items(self.full_ids)
            seconds = time.perf_counter() - started
            self.scored_seconds += seconds
            entry = {"key": key, "seconds": seconds, "ids": items.ids,
                     "values": {t: {m: v.tolist() for m, v in per.items()} for t, per in items.values.items()}}
            self.entries[key] = entry
            if self.cache is not None:
                self.cache.parent.mkdir(parents=True, exist_ok=True)
                with self.cache.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
        self.current = entry
        self.live_seconds += float(entry["seconds"])
        return entry

    @property
    def seconds_per_item(self) -> float:
        assert self.current is not None
        n = sum(len(v) for v in self.current["ids"].values())
        return float(self.current["seconds"]) / n

    def items(self, ids: Mapping[str, list[int]]) -> ItemScores:
        if self.current is None:
            raise RuntimeError("no merge applied yet")
        out_ids: dict[str, list[int]] = {}
        values: dict[str, dict[str, np.ndarray]] = {}
        for task, want in ids.items():
            pos = {int(d): i for i, d in enumerate(self.current["ids"][task])}
            idx = [pos[int(d)] for d in want]
            out_ids[task] = [int(d) for d in want]
            values[task] = {m: np.asarray(v, dtype=float)[idx] for m, v in self.current["values"][task].items()}
        self.items_served += sum(len(v) for v in ids.values())
        return ItemScores(out_ids, values)


class ReplayFitness:
    """Stands in for an ``LmEvalFitness`` (same ``score_items`` / ``scores_from_items`` /
    call interface) but answers from the :class:`ItemTable`; ``subset`` = its default ids."""

    def __init__(self, table: ItemTable, subset: Mapping[str, list[int]] | None = None):
        self.table = table
        self.live = table.live
        self.tasks = table.live.tasks
        self.scorer = table.live.scorer
        self.subset = {t: list(v) for t, v in (subset or table.full_ids).items()}

    @property
    def objective_names(self) -> list[str]:
        return self.live.objective_names

    def score_items(self, ids: Mapping[str, list[int]] | None = None) -> ItemScores:
        return self.table.items(self.subset if ids is None else ids)

    def scores_from_items(self, items: ItemScores):
        return self.live.scores_from_items(items)

    def __call__(self):
        return self.scores_from_items(self.score_items())


class ReplayMerger:
    """The merger, plus: every ``apply`` makes that recipe's full-split items current
    (scoring them live the first time). Everything else is the wrapped merger's."""

    def __init__(self, merger: Any, table: ItemTable):
        self._merger = merger
        self._table = table

    def apply(self, recipe: Any):
        timing = self._merger.apply(recipe)
        self._table.make_current(recipe)
        return timing

    def __getattr__(self, name: str) -> Any:
        return getattr(self._merger, name)
