"""Per-item scoring with lm-eval requests built once per run.

``evaluator.evaluate`` rebuilds every task's requests (prompts, fewshot contexts,
``Instance`` objects) on each call and scans the split once per doc to pick the subset.
``ItemScorer`` builds each doc's instances once (lazily, the first time the doc is
asked for) and, per candidate, only resets their responses, runs the model, applies the
task's own filter ensembles and ``process_results``. Sending the same docs therefore
sends lm-eval's model the same requests in the same order as ``evaluate`` would, and the
metrics come from the same filters and metric functions, so scores are identical; the
per-item values are kept (standard errors, IRT).
"""

from __future__ import annotations

import contextlib
import io
import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np


@dataclass
class ItemScores:
    """Per-item metric values of one candidate: ``values[task][metric_key]`` is aligned
    with ``ids[task]`` (``metric_key`` as lm-eval reports it, e.g. ``acc,none``)."""

    ids: dict[str, list[int]]
    values: dict[str, dict[str, np.ndarray]]

    def merged(self, other: "ItemScores") -> "ItemScores":
        """This candidate's items plus ``other``'s (disjoint ids, same metrics)."""
        ids = {t: list(self.ids.get(t, [])) + list(other.ids.get(t, [])) for t in {*self.ids, *other.ids}}
        values: dict[str, dict[str, np.ndarray]] = {}
        for t in ids:
            a, b = self.values.get(t, {}), other.values.get(t, {})
            values[t] = {k: np.concatenate([a.get(k, np.zeros(0)), b.get(k, np.zeros(0))]) for k in {*a, *b}}
        return ItemScores(ids, values)


def standard_error(values: Sequence[float], aggregate: Callable[[list], float] | None = None, iters: int = 200, seed: int = 0) -> float:
    """Standard error of an aggregated per-item score: binomial for 0/1 items averaged,
    otherwise a seeded bootstrap over items."""
    v = np.asarray(values, dtype=float)
    n = len(v)
    if n == 0:
        return float("nan")
    if n == 1:
        return 0.0
    if (aggregate is None or _is_mean(aggregate)) and np.all((v == 0.0) | (v == 1.0)):
        p = float(v.mean())
        return math.sqrt(p * (1.0 - p) / n)
    agg = aggregate or (lambda xs: float(np.mean(xs)))
    rng = np.random.default_rng(seed)
    stats = [float(agg(list(v[rng.integers(0, n, n)]))) for _ in range(iters)]
    return float(np.std(stats, ddof=1))


def _is_mean(fn: Callable) -> bool:
    return getattr(fn, "__name__", "") == "mean"


class ItemScorer:
    """Scores chosen docs of lm-eval tasks on the live weights behind ``lm``.

    ``tasks`` maps lm-eval task names to loaded ``Task`` objects (from
    ``TaskManager.load``). Instances are owned here, not by the task, so a later
    ``evaluator.evaluate`` on the same task objects does not disturb them.
    """

    def __init__(self, lm: Any, tasks: Mapping[str, Any], quiet: bool = True):
        self.lm = lm
        self.tasks = dict(tasks)
        self.quiet = quiet
        self._instances: dict[str, dict[int, list[Any]]] = {t: {} for t in self.tasks}
        self._docs: dict[str, dict[int, Any]] = {t: {} for t in self.tasks}
        self.n_docs = {t: len(task.eval_docs) for t, task in self.tasks.items()}

    def _build(self, task_name: str, ids: Sequence[int]) -> None:
        """Build (once) the instances of the docs in ``ids`` not built yet."""
        have = self._instances[task_name]
        missing = sorted({int(i) for i in ids} - set(have))
        if not missing:
            return
        bad = [i for i in missing if not 0 <= i < self.n_docs[task_name]]
        if bad:
            raise IndexError(f"task {task_name} has {self.n_docs[task_name]} docs; no doc {bad[0]}")
        task = self.tasks[task_name]
        saved = getattr(task, "_instances", None)
        with _silent(self.quiet):
            task.build_all_requests(samples=missing, rank=0, world_size=1)
        built = task._instances
        task._instances = saved
        # lm-eval numbers the docs of a ``samples`` run by their position in the (sorted) list
        by_pos: dict[int, list[Any]] = defaultdict(list)
        for inst in built:
            by_pos[inst.doc_id].append(inst)
        for pos, doc_id in enumerate(missing):
            group = sorted(by_pos[pos], key=lambda x: x.idx)
            have[doc_id] = group
            self._docs[task_name][doc_id] = group[0].doc

    def score(self, ids: Mapping[str, Sequence[int]]) -> ItemScores:
        """Run the model on the docs ``ids[task]`` (in that order) and return per-item metrics."""
        selected: dict[str, list[int]] = {}
        for t in self.tasks:  # the task dict's order, as evaluate() iterates it
            if t in ids:
                self._build(t, ids[t])
                selected[t] = [int(i) for i in sorted(ids[t])]
        requests: dict[str, list[Any]] = defaultdict(list)
        for t, doc_ids in selected.items():
            for d in doc_ids:
                for inst in self._instances[t][d]:
                    inst.resps = []
                    inst.filtered_resps = {}
                    requests[inst.request_type].append(inst)
        with _silent(self.quiet):
            for reqtype, reqs in requests.items():
                cloned = [r for r in reqs for _ in range(r.repeats)]
                for resp, req in zip(getattr(self.lm, reqtype)(cloned), cloned, strict=True):
                    req.resps.append(resp)
        values: dict[str, dict[str, np.ndarray]] = {}
        for t, doc_ids in selected.items():
            task = self.tasks[t]
            flat = [inst for d in doc_ids for inst in self._instances[t][d]]
            for ensemble in getattr(task, "_filters", []):
                ensemble.apply(flat)
            raw: dict[str, list[float]] = defaultdict(list)
            for filter_key in flat[0].filtered_resps if flat else []:
                for d in doc_ids:
                    group = self._instances[t][d]
                    metrics = task.process_results(self._docs[t][d], [r.filtered_resps[filter_key] for r in group])
                    for metric, value in metrics.items():
                        raw[f"{metric},{filter_key}"].append(value)
            values[t] = {k: np.asarray(v, dtype=float) for k, v in raw.items()}
            # order back to the caller's order (we scored in sorted order, as lm-eval does)
            order = _reorder(doc_ids, ids[t])
            values[t] = {k: v[order] for k, v in values[t].items()}
            selected[t] = [int(i) for i in ids[t]]
        return ItemScores(selected, values)

    def aggregate(self, task_name: str, metric_key: str, values: Sequence[float]) -> float:
        """The task's own aggregation of per-item values (lm-eval falls back to the mean)."""
        return float(self.aggregation_fn(task_name, metric_key)(list(values)))

    def aggregation_fn(self, task_name: str, metric_key: str) -> Callable[[list], float]:
        metric = metric_key.split(",")[0]
        try:
            return self.tasks[task_name].aggregation()[metric]
        except KeyError:
            from lm_eval.api.metrics import mean

            return mean


def _reorder(sorted_ids: list[int], wanted: Sequence[int]) -> np.ndarray:
    pos = {d: i for i, d in enumerate(sorted_ids)}
    return np.array([pos[int(d)] for d in wanted], dtype=int)


@contextlib.contextmanager
def _silent(enabled: bool):
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
