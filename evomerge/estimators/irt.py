"""IRT anchor estimator (as in tinyBenchmarks, Polo et al. 2024, and MERGE3).

Calibration (once per run): the base, the experts and ``n_probes`` seeded random
model-wise merges are scored on every item of the split. Per task, a two-parameter
logistic IRT model ``P(correct) = sigmoid(a_j * theta_m + c_j)`` is fitted to their 0/1
answers (MAP, Gaussian priors: few models, so the priors keep it identified). Items are
clustered by their parameters ``(a_j, c_j)`` (k-means); the item nearest each centroid is
an anchor, weighted by its cluster's share of the split.

Per candidate only the anchors are scored. Its ability ``theta`` is fitted to the
anchor answers, each answer's log-likelihood weighted by its anchor's cluster share
(times the number of anchors, so the answers carry as much information as were given):
an anchor stands for its whole cluster. Unweighted, the many one-item clusters k-means
makes of rare answer patterns outvote the anchor of a large cluster, and a model at the
edge of the calibration range (the only one that solves a task) gets a theta pulled to
the middle: on the test zoo the math expert's 0.75 was estimated at 0.48. The full-split
score is estimated as (gp-IRT)::

    lambda * sum_j w_j y_j  +  (1 - lambda) * (sum_{anchors} y_j + sum_{others} P_j(theta)) / N

with ``lambda`` the inverse-variance weight of the anchor mean against the IRT
prediction, both errors measured by leave-one-model-out over the calibration models
(refit, re-chosen anchors); the blend's cross-validated error is the standard error.
The fit, anchors and calibration scores are saved in ``<run_dir>/irt.json`` and reused
on resume (nothing is re-scored).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit

from evomerge.errors import ConfigError
from evomerge.estimators.saved import read_saved
from evomerge.estimators.base import FitnessContext, Scores
from evomerge.estimators.lm_eval_fitness import LmEvalFitness, require_single_tasks
from evomerge.merge.recipe import reference_recipes  # noqa: F401 (re-exported for callers)

log = logging.getLogger(__name__)
IRT_FILE = "irt.json"

# MAP priors: abilities N(0, 1), log-discrimination N(0, 0.5^2), intercepts N(0, 2^2)
PRIOR_THETA, PRIOR_LOG_A, PRIOR_C = 1.0, 0.5, 2.0


# ---------------------------------------------------------------- the model (pure numpy)


def fit_2pl(Y: np.ndarray, iters: int = 500) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAP fit of ``P(Y[m, j] = 1) = sigmoid(a_j theta_m + c_j)``; returns (theta, a, c)."""
    Y = np.asarray(Y, dtype=float)
    M, N = Y.shape
    p_item = np.clip(Y.mean(0), 0.02, 0.98)
    x0 = np.concatenate([np.zeros(M), np.zeros(N), np.log(p_item / (1 - p_item))])
    # a model's share of right answers is the natural start for its ability
    p_model = np.clip(Y.mean(1), 0.02, 0.98)
    x0[:M] = (np.log(p_model / (1 - p_model)) - np.log(p_model / (1 - p_model)).mean())

    def loss(x):
        th, la, c = x[:M], x[M : M + N], x[M + N :]
        a = np.exp(la)
        z = np.outer(th, a) + c
        p = expit(z)
        nll = -(Y * _log_sigmoid(z) + (1 - Y) * _log_sigmoid(-z)).sum()
        nll += 0.5 * ((th / PRIOR_THETA) ** 2).sum() + 0.5 * ((la / PRIOR_LOG_A) ** 2).sum() + 0.5 * ((c / PRIOR_C) ** 2).sum()
        r = p - Y  # d nll / d z
        g_th = r @ a + th / PRIOR_THETA**2
        g_la = (r * th[:, None]).sum(0) * a + la / PRIOR_LOG_A**2
        g_c = r.sum(0) + c / PRIOR_C**2
        return nll, np.concatenate([g_th, g_la, g_c])

    res = minimize(loss, x0, jac=True, method="L-BFGS-B", options={"maxiter": iters})
    x = res.x
    return x[:M], np.exp(x[M : M + N]), x[M + N :]


def fit_theta(
    y: np.ndarray, a: np.ndarray, c: np.ndarray, prior_mean: float = 0.0, prior_sd: float = 1.0, weights: np.ndarray | None = None
) -> float:
    """MAP ability from answers ``y`` to items with parameters ``(a, c)`` (Newton steps);
    ``weights`` scale each answer's log-likelihood (default 1)."""
    w = np.ones(len(y)) if weights is None else np.asarray(weights, dtype=float)
    theta = prior_mean
    for _ in range(50):
        p = expit(a * theta + c)
        grad = (w * a * (y - p)).sum() - (theta - prior_mean) / prior_sd**2
        hess = -(w * a * a * p * (1 - p)).sum() - 1.0 / prior_sd**2
        step = grad / hess
        theta -= float(np.clip(step, -2.0, 2.0))
        if abs(step) < 1e-8:
            break
    return float(theta)


def kmeans(X: np.ndarray, k: int, seed: int = 0, iters: int = 100) -> np.ndarray:
    """Cluster labels of the rows of ``X`` (k-means++ start, Lloyd iterations)."""
    rng = np.random.default_rng(seed)
    n = len(X)
    centers = [X[rng.integers(n)]]
    for _ in range(1, k):
        d = np.min(((X[:, None, :] - np.array(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(X[rng.choice(n, p=d / d.sum())] if d.sum() > 0 else X[rng.integers(n)])
    C = np.array(centers)
    labels = np.zeros(n, dtype=int)
    for _ in range(iters):
        new = np.argmin(((X[:, None, :] - C[None]) ** 2).sum(-1), axis=1)
        if np.array_equal(new, labels) and _ > 0:
            break
        labels = new
        for j in range(k):
            if np.any(labels == j):
                C[j] = X[labels == j].mean(0)
    return labels


def choose_anchors(a: np.ndarray, c: np.ndarray, n_anchors: int, seed: int = 0) -> tuple[list[int], list[float]]:
    """Anchor items (nearest each cluster's centre in standardised (a, c)) and weights."""
    N = len(a)
    if n_anchors >= N:
        return list(range(N)), [1.0 / N] * N
    X = np.stack([a, c], 1)
    X = (X - X.mean(0)) / np.where(X.std(0) > 0, X.std(0), 1.0)
    labels = kmeans(X, n_anchors, seed)
    # members of each cluster, nearest its centre first
    clusters = []
    for j in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == j)
        centre = X[members].mean(0)
        clusters.append(members[np.argsort(((X[members] - centre) ** 2).sum(1), kind="stable")])
    # one anchor per cluster; when clusters collapsed (few distinct parameter values),
    # the clusters with the most items per anchor give further anchors
    counts = [1] * len(clusters)
    while sum(counts) < n_anchors:
        open_ = [i for i, m in enumerate(clusters) if counts[i] < len(m)]
        i = max(open_, key=lambda i: len(clusters[i]) / counts[i])
        counts[i] += 1
    anchors, weights = [], []
    for members, k in zip(clusters, counts):
        for item in members[:k]:
            anchors.append(int(item))
            weights.append(len(members) / N / k)
    order = np.argsort(anchors)
    return [anchors[i] for i in order], [weights[i] for i in order]


@dataclass
class TaskModel:
    """The fitted IRT model of one objective (task + metric) and its anchors."""

    name: str
    task: str
    metric: str
    n_items: int
    a: list[float]
    c: list[float]
    anchors: list[int]
    weights: list[float]
    theta_mean: float
    theta_sd: float
    var_pirt: float  # leave-one-model-out mean squared error of the IRT prediction
    calibration: dict[str, float] = field(default_factory=dict)  # full-split scores of the calibration models
    var_anchor: float = 0.0  # leave-one-model-out mean squared error of the weighted anchor mean
    blend_lambda: float = 0.5  # weight of the anchor mean (inverse-variance from the two above)
    cv_mse: float = 0.0  # leave-one-model-out mean squared error of the blended estimate

    def estimate(self, y_anchor: np.ndarray, blend: float | None = None) -> tuple[float, float]:
        """(estimated full-split score, its standard error) from the answers on the anchors."""
        a, c = np.asarray(self.a), np.asarray(self.c)
        idx = np.asarray(self.anchors)
        w = np.asarray(self.weights)
        y = np.asarray(y_anchor, dtype=float)
        # each anchor speaks for its cluster (see the module docstring)
        theta = fit_theta(y, a[idx], c[idx], self.theta_mean, self.theta_sd, weights=w * len(idx))
        p = expit(a * theta + c)
        rest = np.ones(self.n_items, dtype=bool)
        rest[idx] = False
        pirt = float((y.sum() + p[rest].sum()) / self.n_items)
        anchor_mean = float((w * y).sum())
        lam = self.blend_lambda if blend is None else float(blend)
        estimate = lam * anchor_mean + (1 - lam) * pirt
        # standard error: the blend's cross-validated error (the anchors' binomial error
        # would overstate it: they are chosen to stand for their clusters), at least one item
        se = max(math.sqrt(self.cv_mse), 1.0 / self.n_items)
        return float(np.clip(estimate, 0.0, 1.0)), se


def fit_task_model(
    name: str, task: str, metric: str, Y: np.ndarray, n_anchors: int, seed: int = 0, labels: Sequence[str] = ()
) -> TaskModel:
    """Fit the 2PL model on calibration answers ``Y [models, items]``, choose anchors and
    measure the IRT prediction's error leaving each calibration model out."""
    Y = np.asarray(Y, dtype=float)
    theta, a, c = fit_2pl(Y)
    anchors, weights = choose_anchors(a, c, n_anchors, seed)
    model = TaskModel(
        name, task, metric, Y.shape[1], a.tolist(), c.tolist(), anchors, weights,
        float(theta.mean()), float(max(theta.std(), 0.5)), 0.0,
        {str(lbl): float(Y[i].mean()) for i, lbl in enumerate(labels)},
    )
    # leave one calibration model out: refit, re-choose anchors, estimate the held-out model
    err_anchor, err_pirt = [], []
    for m in range(len(Y)):
        rest = np.delete(Y, m, axis=0)
        th_m, a_m, c_m = fit_2pl(rest, iters=200)
        anc_m, w_m = choose_anchors(a_m, c_m, n_anchors, seed)
        held = TaskModel(name, task, metric, Y.shape[1], a_m.tolist(), c_m.tolist(), anc_m, w_m,
                         float(th_m.mean()), float(max(th_m.std(), 0.5)), 0.0)
        truth = Y[m].mean()
        err_pirt.append(held.estimate(Y[m, anc_m], blend=0.0)[0] - truth)
        err_anchor.append(float(np.dot(w_m, Y[m, anc_m])) - truth)
    ea, ep = np.array(err_anchor), np.array(err_pirt)
    model.var_anchor, model.var_pirt = float(np.mean(ea**2)), float(np.mean(ep**2))
    total = model.var_anchor + model.var_pirt
    model.blend_lambda = model.var_pirt / total if total > 0 else 0.5
    model.cv_mse = float(np.mean((model.blend_lambda * ea + (1 - model.blend_lambda) * ep) ** 2))
    return model


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


# ---------------------------------------------------------------- the estimator


def probe_recipes(n_experts: int, n_layers: int, n_probes: int, seed: int) -> dict[str, Any]:
    """Seeded random model-wise merges (task arithmetic and TIES) spread over the
    experts' weight simplex and beyond, for calibration."""
    from evomerge.merge.recipe import Recipe

    rng = np.random.default_rng(seed + 104729)
    out = {}
    for i in range(n_probes):
        weights = [float(w) for w in rng.uniform(0.0, 1.2, n_experts)]
        if i % 2 == 0:
            out[f"probe:{i}"] = Recipe.uniform("task_arithmetic", {"weight": weights}, n_layers)
        else:
            density = [float(d) for d in rng.uniform(0.2, 1.0, n_experts)]
            out[f"probe:{i}"] = Recipe.uniform("ties", {"weight": weights, "density": density}, n_layers)
    return out




class IrtEstimator:
    def __init__(
        self,
        ctx: FitnessContext,
        n_anchors: int = 20,
        n_probes: int = 12,
        blend: float | str | None = "auto",
        fitness: LmEvalFitness | None = None,
        calibration: dict[str, Any] | None = None,
    ):
        """``calibration`` (label -> recipe) replaces the base/experts/probes (tests)."""
        if n_anchors < 1:
            raise ConfigError(f"fitness.estimator.n_anchors must be positive, got {n_anchors}")
        self.blend = None if blend in (None, "auto") else float(blend)  # type: ignore[arg-type]
        self.fitness = fitness or ctx.full_split_fitness()
        require_single_tasks(self.fitness, "IRT")
        path = ctx.run_dir / IRT_FILE if ctx.run_dir is not None else None
        self.calibration_s = 0.0
        if path is not None and path.exists():
            saved = read_saved(path, "models")
            self.models = {name: TaskModel(**m) for name, m in saved["models"].items()}
        else:
            self.models = self._calibrate(ctx, int(n_anchors), int(n_probes), calibration)
            if path is not None:
                path.write_text(json.dumps({"n_anchors": n_anchors, "n_probes": n_probes, "seed": ctx.seed,
                                            "calibration_s": self.calibration_s,
                                            "models": {k: asdict(m) for k, m in self.models.items()},
                                            "answers": {k: v.astype(int).tolist() for k, v in self.answers.items()}}))
        self.anchor_ids: dict[str, list[int]] = {}
        for m in self.models.values():
            self.anchor_ids[m.task] = sorted(set(self.anchor_ids.get(m.task, [])) | set(m.anchors))

    @property
    def objective_names(self) -> list[str]:
        return self.fitness.objective_names

    @property
    def items_per_candidate(self) -> int:
        return sum(len(v) for v in self.anchor_ids.values())

    def _calibrate(self, ctx: FitnessContext, n_anchors: int, n_probes: int, calibration: dict[str, Any] | None) -> dict[str, TaskModel]:
        merger = ctx.merger
        if calibration is None:
            if merger is None:
                raise ConfigError("the irt estimator needs the merger to score its calibration merges")
            calibration = reference_recipes(merger.n_experts, merger.pool.expert_names, merger.n_layers)
            calibration.update(probe_recipes(merger.n_experts, merger.n_layers, n_probes, ctx.seed))
        started = time.perf_counter()
        full = {t: list(range(n)) for t, n in self.fitness.scorer.n_docs.items()}
        answers: dict[str, list[np.ndarray]] = {t.name: [] for t in self.fitness.tasks}
        for label, recipe in calibration.items():
            merger.apply(recipe)
            items = self.fitness.score_items(full)
            for t in self.fitness.tasks:
                values = items.values[t.task].get(t.metric)
                if values is None:
                    raise ConfigError(f"fitness task '{t.task}' has no metric '{t.metric}'")
                if not np.all((values == 0) | (values == 1)):
                    raise ConfigError(f"the irt estimator needs 0/1 item scores; {t.name} ({t.metric}) has others")
                answers[t.name].append(values)
        models = {}
        self.answers = {t.name: np.stack(answers[t.name]) for t in self.fitness.tasks}
        for i, t in enumerate(self.fitness.tasks):
            Y = self.answers[t.name]
            models[t.name] = fit_task_model(t.name, t.task, t.metric, Y, n_anchors, seed=ctx.seed + i, labels=list(calibration))
        self.calibration_s = time.perf_counter() - started
        log.info("irt: calibrated on %d models in %.1fs", len(calibration), self.calibration_s)
        return models

    def __call__(self) -> Scores:
        items = self.fitness.score_items(self.anchor_ids)
        scores, stderr, fidelity = {}, {}, {}
        for name, m in self.models.items():
            pos = {d: i for i, d in enumerate(items.ids[m.task])}
            y = items.values[m.task][m.metric][[pos[d] for d in m.anchors]]
            scores[name], stderr[name] = m.estimate(y, self.blend)
            fidelity[name] = len(m.anchors)
        return Scores(scores, stderr, fidelity)
