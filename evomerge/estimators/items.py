"""Per-item scoring with lm-eval requests built once per run.

``evaluator.evaluate`` rebuilds every task's requests (prompts, fewshot contexts,
``Instance`` objects) on each call and scans the split once per doc to pick the subset.
``ItemScorer`` builds each doc's instances once (lazily, the first time the doc is
asked for) and, per candidate, only resets their responses, runs the model, applies the
task's own filter ensembles and ``process_results``. Sending the same docs therefore
sends lm-eval's model the same requests in the same order as ``evaluate`` would, and the
metrics come from the same filters and metric functions, so scores are identical; the
per-item values are kept (standard errors, IRT).

Few-shot prompts: lm-eval's sampler draws each doc's examples from one seeded generator in
doc order, so a doc's prompt depends on which docs are built with it. For a task that
draws examples at random, the instances are therefore built per set of docs (the
generator re-seeded first), exactly as ``simple_evaluate(samples=...)`` builds that set;
zero-shot tasks are built once per doc.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)


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

    SETS_KEPT = 8  # few-shot tasks: doc sets kept per task (estimators score a few: subset, fidelity levels, anchors)

    def __init__(self, lm: Any, tasks: Mapping[str, Any], quiet: bool = True, fewshot_seed: int | None = 1234):
        self.lm = lm
        self.tasks = dict(tasks)
        self.quiet = quiet
        self.fewshot_seed = fewshot_seed
        self._instances: dict[str, dict[int, list[Any]]] = {t: {} for t in self.tasks}  # order-free tasks, per doc
        self._sets: dict[str, OrderedDict[tuple[int, ...], dict[int, list[Any]]]] = {t: OrderedDict() for t in self.tasks}
        self._docs: dict[str, dict[int, Any]] = {t: {} for t in self.tasks}
        self._warned: set[str] = set()
        self.n_docs = {t: len(task.eval_docs) for t, task in self.tasks.items()}
        self.draws_fewshot = {t: _draws_fewshot(task) for t, task in self.tasks.items()}

    def _check_ids(self, task_name: str, ids: Sequence[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.n_docs[task_name]]
        if bad:
            raise IndexError(f"task {task_name} has {self.n_docs[task_name]} docs; no doc {bad[0]}")

    def _build_docs(self, task_name: str, doc_ids: list[int]) -> dict[int, list[Any]]:
        """Build the instances of ``doc_ids`` (sorted) in one lm-eval pass."""
        task = self.tasks[task_name]
        saved = getattr(task, "_instances", None)
        with _silent(self.quiet):
            task.build_all_requests(samples=doc_ids, rank=0, world_size=1)
        built = task._instances
        task._instances = saved
        # lm-eval numbers the docs of a ``samples`` run by their position in the (sorted) list
        by_pos: dict[int, list[Any]] = defaultdict(list)
        for inst in built:
            by_pos[inst.doc_id].append(inst)
        out = {}
        for pos, doc_id in enumerate(doc_ids):
            group = sorted(by_pos[pos], key=lambda x: x.idx)
            out[doc_id] = group
            self._docs[task_name][doc_id] = group[0].doc
        self._warn_if_truncated(task_name, [inst for g in out.values() for inst in g])
        return out

    def _instances_for(self, task_name: str, ids: Sequence[int]) -> dict[int, list[Any]]:
        """The instances of ``ids``: built once per doc, or per doc set for few-shot tasks."""
        wanted = sorted({int(i) for i in ids})
        self._check_ids(task_name, wanted)
        if not self.draws_fewshot[task_name]:
            have = self._instances[task_name]
            missing = [i for i in wanted if i not in have]
            if missing:
                have.update(self._build_docs(task_name, missing))
            return have
        sets = self._sets[task_name]
        key = tuple(wanted)
        if key not in sets:
            if self.fewshot_seed is not None:
                self.tasks[task_name].set_fewshot_seed(seed=self.fewshot_seed)
            sets[key] = self._build_docs(task_name, wanted)
            while len(sets) > self.SETS_KEPT:
                sets.popitem(last=False)
        sets.move_to_end(key)
        return sets[key]

    def _warn_if_truncated(self, task_name: str, instances: list[Any]) -> None:
        """Prompts longer than the model's window are cut on the left by lm-eval: say so once."""
        if task_name in self._warned:
            return
        cut, total = count_truncated(self.lm, instances)
        if cut:
            self._warned.add(task_name)
            log.warning(
                "task %s: %d of %d requests are longer than max_length=%d tokens and are cut on the left "
                "(as lm-eval does; scores differ from an untruncated run): raise fitness.max_length if the model "
                "allows more (null = the model's own), or use fewer few-shot examples",
                task_name, cut, total, int(self.lm.max_length),
            )

    def score(self, ids: Mapping[str, Sequence[int]]) -> ItemScores:
        """Run the model on the docs ``ids[task]`` (in that order) and return per-item metrics."""
        selected: dict[str, list[int]] = {}
        built: dict[str, dict[int, list[Any]]] = {}
        for t in self.tasks:  # the task dict's order, as evaluate() iterates it
            if t in ids:
                built[t] = self._instances_for(t, ids[t])
                selected[t] = [int(i) for i in sorted(ids[t])]
        requests: dict[str, list[Any]] = defaultdict(list)
        for t, doc_ids in selected.items():
            for d in doc_ids:
                for inst in built[t][d]:
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
            flat = [inst for d in doc_ids for inst in built[t][d]]
            for ensemble in getattr(task, "_filters", []):
                ensemble.apply(flat)
            raw: dict[str, list[float]] = defaultdict(list)
            for filter_key in flat[0].filtered_resps if flat else []:
                for d in doc_ids:
                    group = built[t][d]
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


def _draws_fewshot(task: Any) -> bool:
    """Whether the task's prompts depend on a random few-shot draw (shared across docs)."""
    from lm_eval.api.samplers import FirstNSampler

    shots = task.get_config("num_fewshot") if hasattr(task, "get_config") else None
    return bool(shots) and not isinstance(getattr(task, "sampler", None), FirstNSampler)


def count_truncated(lm: Any, instances: Sequence[Any]) -> tuple[int, int]:
    """How many of ``instances`` lm-eval's HF model truncates (left) to fit ``lm.max_length``:
    loglikelihood when context + continuation exceed ``max_length + 1`` tokens,
    generation when the context exceeds ``max_length - max_gen_toks``."""
    try:
        max_length = int(lm.max_length)
    except (AttributeError, TypeError, ValueError):
        return 0, 0
    cut = total = 0
    for inst in instances:
        try:
            if inst.request_type == "loglikelihood":
                ctx, cont = lm._encode_pair(inst.args[0], inst.args[1])
                over = len(ctx) + len(cont) > max_length + 1
            elif inst.request_type == "generate_until":
                kwargs = inst.args[1] if len(inst.args) > 1 and isinstance(inst.args[1], dict) else {}
                budget = max_length - int(kwargs.get("max_gen_toks", getattr(lm, "max_gen_toks", 256)))
                over = len(lm.tok_encode(inst.args[0])) > budget
            else:
                continue
        except (AttributeError, TypeError):
            return 0, 0  # not an HF-style model: nothing to check
        total += 1
        cut += int(over)
    return cut, total


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
