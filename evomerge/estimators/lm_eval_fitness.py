"""lm-eval-harness fitness: one objective per task, scored on the live merged model.

The model is wrapped in lm-eval's HFLM once, the task dict is built once and each doc's
requests are built once (``items.ItemScorer``); per candidate only the model runs, then
lm-eval's own filters and metrics -- the same scores as ``evaluator.evaluate`` on the same
docs (tested), few-shot prompts included: each task's few-shot sampler is seeded as
``simple_evaluate`` seeds it (1234) and ``max_length`` is the model's unless set. lm-eval's
result cache is never enabled (it is keyed on the request, not the weights, and would
return the previous genome's answers). Offline mode is the user's choice
(``HF_DATASETS_OFFLINE=1``); evomerge never sets it.
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from evomerge.errors import ConfigError
from evomerge.estimators.base import Scores
from evomerge.estimators.items import ItemScorer, ItemScores, standard_error
from evomerge.estimators.tasks import TaskCatalog

log = logging.getLogger(__name__)

FEWSHOT_SEED = 1234  # lm_eval.defaults.DEFAULT_OTHER_SEED: simple_evaluate's fewshot_random_seed


@dataclass(frozen=True)
class FitnessTask:
    """One objective: an lm-eval task and the metric key to read (higher is better)."""

    name: str
    task: str
    metric: str


def quiet_libraries() -> None:
    """Silence lm-eval, datasets and transformers progress bars and log noise (offline
    mode is left to the user: a Hub dataset must be able to download on first use)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm-eval", "lm_eval", "datasets", "transformers", "evaluate", "httpx", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _quiet_hflm_class():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """HFLM whose request loops never draw progress bars (lm-eval passes
        ``disable_tqdm`` explicitly, so TQDM_DISABLE alone does not help) and which
        tokenizes each prompt once per run: the same requests come back for every
        candidate and tokenization does not depend on the weights."""

        _memo_pairs: dict
        _memo_batches: dict

        def _encode_pair(self, context, continuation):
            memo = self.__dict__.setdefault("_memo_pairs", {})
            key = (context, continuation)
            if key not in memo:
                memo[key] = super()._encode_pair(context, continuation)
            ctx, cont = memo[key]
            return list(ctx), list(cont)

        def tok_batch_encode(self, strings, padding_side="left", left_truncate_len=None, truncation=False):
            memo = self.__dict__.setdefault("_memo_batches", {})
            key = (tuple(strings), padding_side, left_truncate_len, truncation)
            if key not in memo:
                if len(memo) > 4096:  # bounded: batches differ only when the doc sets do
                    memo.clear()
                memo[key] = super().tok_batch_encode(strings, padding_side, left_truncate_len, truncation)
            ids, mask = memo[key]
            return ids.clone(), mask.clone()

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


def require_single_tasks(fitness: Any, estimator: str) -> None:
    """Estimators that model items per objective need one task per objective, not a group."""
    groups = getattr(fitness, "groups", None) or {}
    grouped = [t.task for t in getattr(fitness, "tasks", []) if t.task in groups]
    if grouped:
        raise ConfigError(
            f"the {estimator} estimator needs one task per objective; '{grouped[0]}' is a group: "
            "use fitness/estimator=subset, or one objective per member task"
        )


def choose_subset(n_docs: int, size: int | None, seed: int) -> list[int]:
    """A fixed, sorted subset of doc ids (sorted: lm-eval mislabels unsorted ``samples``)."""
    if size is None or size >= n_docs:
        return list(range(n_docs))
    if size <= 0:
        raise ConfigError(f"fitness subset size must be positive, got {size}")
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n_docs, size=size, replace=False))


class LmEvalFitness:
    """Scores the current weights of ``model`` on ``tasks`` (one objective each).

    ``subset_size`` picks a fixed, seeded subset of each task's split once; every
    candidate is scored on the same docs. ``subset`` (task -> ids) overrides it, e.g.
    when resuming a run with the ids it saved.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        tasks: Sequence[FitnessTask],
        split: str = "validation",
        subset_size: int | None = None,
        subset_seed: int = 0,
        subset: dict[str, list[int]] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        include_paths: Iterable[str] = (),
        quiet: bool = True,
        gc_every: int = 0,
    ):
        if not tasks:
            raise ConfigError("fitness needs at least one task")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"fitness objective names must be unique, got {names}")
        if quiet:
            quiet_libraries()
        self.tasks = list(tasks)
        self.split = split
        catalog = TaskCatalog(include_paths)
        with _maybe_silent(quiet):
            loaded = catalog.load(sorted({t.task for t in tasks}), split)
        self.task_dict = loaded
        self.task_objects = loaded["tasks"]
        self.groups = loaded["groups"]
        self._check_groups(catalog)
        for task in self.task_objects.values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # as simple_evaluate does
        hflm_cls = _quiet_hflm_class()
        with _maybe_silent(quiet):
            # max_length None: HFLM's own choice from the model config / tokenizer, as in lm-eval
            self.lm = hflm_cls(
                pretrained=model, tokenizer=tokenizer, batch_size=int(batch_size), max_length=None if max_length is None else int(max_length)
            )
        if subset is not None:
            self.subset = {k: sorted(int(i) for i in v) for k, v in subset.items()}
        else:
            self.subset = {
                name: choose_subset(len(task.eval_docs), subset_size, subset_seed + i)
                for i, (name, task) in enumerate(sorted(self.task_objects.items()))
            }
        self.quiet = quiet
        self.gc_every = int(gc_every)
        self._calls = 0
        self.scorer = ItemScorer(self.lm, self.task_objects, quiet=quiet, fewshot_seed=FEWSHOT_SEED)

    def _check_groups(self, catalog: TaskCatalog) -> None:
        for t in self.tasks:
            if t.task in self.task_objects:
                continue
            group = self.groups.get(t.task)
            if group is None:  # a tag: a list of tasks without a score of its own
                members = ", ".join(catalog.definition(t.task).members[:5])
                raise ConfigError(f"fitness task '{t.task}' is a tag (a list of tasks, no aggregate score): name one of its tasks ({members}, ...)")
            if not group.has_aggregation:
                members = ", ".join(x.task_name for x in group.get_all_tasks()[:5])
                raise ConfigError(
                    f"fitness task '{t.task}' is a group without aggregate_metric_list, so it has no score: "
                    f"name one of its tasks ({members}, ...) or add aggregate_metric_list to the group's YAML"
                )

    @property
    def objective_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def score_items(self, ids: dict[str, list[int]] | None = None) -> ItemScores:
        """Per-item metrics of the current weights on ``ids`` (task -> doc ids; default the subset)."""
        with torch.no_grad():
            items = self.scorer.score(self.subset if ids is None else ids)
        self._after_candidate()
        return items

    def scores_from_items(self, items: ItemScores) -> Scores:
        """Aggregate per-item values into one score per objective, with standard errors."""
        scores: dict[str, float] = {}
        stderr: dict[str, float] = {}
        fidelity: dict[str, int] = {}
        for t in self.tasks:
            if t.task in self.groups:
                scores[t.name], stderr[t.name], fidelity[t.name] = self._group_score(t, items)
                continue
            per_task = items.values.get(t.task, {})
            if t.metric not in per_task:
                raise ConfigError(
                    f"fitness task '{t.task}' has no metric '{t.metric}'; available: " + ", ".join(sorted(per_task))
                )
            values = per_task[t.metric]
            agg = self.scorer.aggregation_fn(t.task, t.metric)
            scores[t.name] = float(agg(list(values)))
            stderr[t.name] = standard_error(values, agg)
            fidelity[t.name] = len(values)
        return Scores(scores, stderr, fidelity)

    def _group_score(self, t: FitnessTask, items: ItemScores) -> tuple[float, float, int]:
        """A group objective: lm-eval's own aggregate of its leaf tasks' scores."""
        group = self.groups[t.task]
        metric, _, filter_key = t.metric.partition(",")
        stderr_key = f"{metric}_stderr,{filter_key}"
        leaf_metrics: dict[str, dict[str, Any]] = {}
        for leaf in group.get_all_tasks():
            name = leaf.task_name
            per_task = items.values.get(name, {})
            if t.metric in per_task:
                values = per_task[t.metric]
                agg = self.scorer.aggregation_fn(name, t.metric)
                leaf_metrics[name] = {t.metric: float(agg(list(values))), stderr_key: standard_error(values, agg), "sample_len": len(values)}
        result = group.aggregate(leaf_metrics)
        if t.metric not in result:
            available = sorted(k for k in result if "," in k and "_stderr" not in k)
            raise ConfigError(f"fitness group '{t.task}' has no aggregate metric '{t.metric}'; available: " + ", ".join(available))
        se = result.get(stderr_key)
        return float(result[t.metric]), float(se) if isinstance(se, (int, float)) else float("nan"), int(result.get("sample_len", 0))

    def __call__(self) -> Scores:
        return self.scores_from_items(self.score_items())

    def _after_candidate(self) -> None:
        # A full gc per candidate cost a third of the toy zoo's time; collect only every
        # ``gc_every`` candidates (0 = never: the per-candidate objects are freed by refcount).
        self._calls += 1
        if self.gc_every and self._calls % self.gc_every == 0:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    @torch.no_grad()
    def evaluate_with_harness(self, ids: dict[str, list[int]] | None = None, lm: Any = None) -> dict[str, float]:
        """The same scores through ``lm_eval.evaluator.evaluate`` (the slow reference path;
        ``lm`` e.g. a plain ``HFLM`` on the same model, default ours)."""
        from lm_eval import evaluator

        for task in self.task_objects.values():
            task.set_fewshot_seed(seed=FEWSHOT_SEED)  # a fresh build, as simple_evaluate's
        with _maybe_silent(self.quiet):
            results = evaluator.evaluate(
                lm=self.lm if lm is None else lm,
                task_dict=self.task_dict,
                samples=self.subset if ids is None else ids,
                bootstrap_iters=0,
                log_samples=False,
                verbosity="ERROR",
            )
        if results is None:  # only on non-zero ranks, which we never use
            raise RuntimeError("lm-eval returned no results")
        return {t.name: float(results["results"][t.task][t.metric]) for t in self.tasks}


@contextlib.contextmanager
def _maybe_silent(enabled: bool):
    """lm-eval prints with print() and draws request-building bars on stderr; swallow both
    while it runs (exceptions still propagate)."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield
