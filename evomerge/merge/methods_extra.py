"""mergekit 0.1.5 methods that evomerge lacked, written against ``DeltaGroup``.

Semantics follow mergekit (``merge_methods/*.py``, ``sparsify.py``) per tensor (=
per segment of the group), with these documented differences, all in favour of a
search that must not crash on a sampled point:

- ``della_linear``: keep probabilities are clipped to [0, 1] (mergekit raises when
  ``density +- epsilon`` leaves (0, 1)); random draws use the group's seeded generator.
- ``multislerp``: where the weighted mean direction vanishes it falls back to the
  weighted sum for any K (mergekit does so for K = 2 and raises otherwise).
- ``karcher``, ``multislerp``, ``nuslerp``: all-zero weights mean equal weights.

Row-wise statistics (DELLA's per-row magnitude ranks, nuslerp's non-flattened mode) need
each segment's 2-D shape: ``group.shapes`` (set by the merger, see ``segments.attach_shapes``);
without it every segment counts as one row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from evomerge.merge.groups import DeltaGroup
from evomerge.merge.methods import MergeMethod, Params, ParamSpec, register, sign_consensus
from evomerge.merge.segments import cache_of, segment_layout

_EPS = 1e-8


def _finish(g: DeltaGroup, merged_delta: Tensor, lam: float, out: Tensor | None) -> Tensor:
    if out is None:
        return torch.add(g.base, merged_delta, alpha=lam)
    return torch.add(g.base, merged_delta, alpha=lam, out=out)


def _mix_weights(w: Tensor) -> Tensor:
    """Non-negative mixing weights normalised to sum 1 (equal when they sum to ~0)."""
    w = w.float()
    total = float(w.sum())
    if abs(total) < 1e-6:
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


# ---------------------------------------------------------------- task arithmetic + trimming


def task_arithmetic_trim(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Task arithmetic on each task vector's top ``density`` entries by magnitude (no sign election)."""
    kept = g.deltas * g.compare(g.deltas.abs(), g.thresholds(p["density"]))
    return _finish(g, p["weight"].to(kept.dtype) @ kept, float(p["lambda"]), out)


def breadcrumbs_ties(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Breadcrumbs mask (drop the top ``gamma``, keep the next ``density``), then TIES sign
    election. As in mergekit the outlier cut shrinks to ``1 - density`` when both do not fit."""
    density = p["density"]
    gamma = torch.minimum(torch.full_like(density, float(p["gamma"])), 1 - density).clamp(min=0)
    mags = g.deltas.abs()
    keep = g.compare(mags, g.thresholds(gamma), torch.lt) & g.compare(mags, g.thresholds((gamma + density).clamp(max=1)))
    w = p["weight"]
    weighted = (g.deltas * keep).mul_(w.to(g.deltas.dtype)[:, None])
    return _finish(g, sign_consensus(weighted, w, bool(p["normalize"])), float(p["lambda"]), out)


# ---------------------------------------------------------------- DELLA (linear)


def row_rank_fraction(g: DeltaGroup) -> Tensor:
    """Magnitude rank of every element within its row (2-D segments) or tensor, in [0, 1]
    (0 = smallest), as mergekit's ``della_magprune``. Genome-independent: cached (fp16)."""
    cache = cache_of(g)
    if "row_rank" not in cache:
        ranks = torch.empty(g.deltas.shape, dtype=torch.float16, device=g.deltas.device)
        for start, n, shape in segment_layout(g):
            cols = shape[1] if shape is not None else n
            for i in range(g.n_models):
                rows = g.deltas[i, start : start + n].reshape(-1, cols).abs().float()
                r = rows.argsort(dim=1).argsort(dim=1).float()
                ranks[i, start : start + n] = (r / max(cols - 1, 1)).reshape(-1).to(torch.float16)
        cache["row_rank"] = ranks
    return cache["row_rank"]


def della_linear(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """DELLA without sign election: keep probability ``density - eps + 2 eps * rank`` (rank
    within the row), survivors rescaled so each tensor keeps its L1 norm, weighted sum."""
    eps = float(p["epsilon"])
    density, w = p["density"].float(), p["weight"].float()
    ranks = row_rank_fraction(g)
    gen = g.generator(int(p["seed"]))
    merged = torch.empty_like(g.base)
    for start, n, _ in segment_layout(g):
        d = g.deltas[:, start : start + n]
        prob = (density[:, None] - eps + 2 * eps * ranks[:, start : start + n].float()).clamp_(0, 1)
        prob = torch.where(density[:, None] >= 1, torch.ones_like(prob), prob)  # mergekit: density 1 keeps all
        noise = torch.rand(d.shape, generator=gen, device=d.device, dtype=torch.float32)
        kept = d * (noise < prob).to(d.dtype)
        if int(p["rescale"]):
            before, after = d.abs().sum(1, dtype=torch.float32), kept.abs().sum(1, dtype=torch.float32)
            ok = (before >= 1e-7) & (after >= 1e-7) & (density < 1)
            scale = torch.where(ok, before / after.clamp(min=1e-7), torch.ones_like(before))
            kept = kept * scale.to(kept.dtype)[:, None]
        merged[start : start + n] = w.to(kept.dtype) @ kept
    if int(p["normalize"]):
        total = float(w.sum())
        if abs(total) >= _EPS:
            merged /= total
    return _finish(g, merged, float(p["lambda"]), out)


# ---------------------------------------------------------------- SCE


def sce(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """SCE: keep the ``select_topk`` fraction of elements with the highest variance across
    experts, weight each task vector by its mean square, TIES sign election, weighted mean."""
    topk = float(p["select_topk"])
    merged = torch.empty_like(g.base)
    for start, n, _ in segment_layout(g):
        tv = g.deltas[:, start : start + n]
        if topk < 1:
            var = tv.float().var(0, unbiased=False)
            k = int(int(torch.count_nonzero(var)) * topk) if topk > 0 else 0
            if k == 0:
                mask = torch.zeros_like(var, dtype=torch.bool)
            else:
                mask = torch.zeros_like(var, dtype=torch.bool)
                mask[torch.topk(var, k).indices] = True
            tv = tv * mask.to(tv.dtype)
        weights = tv.float().square().mean(1)
        total = float(weights.sum())
        weights = torch.full_like(weights, 1.0 / g.n_models) if abs(total) < 1e-6 else weights / total
        majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)
        agree = (tv.sign() == majority).to(tv.dtype) * weights.to(tv.dtype)[:, None]  # erased weights
        merged[start : start + n] = (tv * agree).sum(0) / agree.sum(0).clamp(min=1e-6)
    return _finish(g, merged, 1.0, out)


# ---------------------------------------------------------------- spherical methods


def karcher_mean(points: Tensor, alphas: Tensor, max_iter: int, tol: float) -> Tensor:
    """Weighted Karcher (Fréchet) mean of the rows of ``points`` on the unit sphere, scaled by
    the weighted mean norm (mergekit's ``karcher_merge_tensors``)."""
    x = points.float()
    norms = x.norm(dim=1)
    valid = norms > tol
    if not bool(valid.any()):
        return torch.zeros_like(x[0])
    units = x[valid] / norms[valid, None]
    a = alphas[valid] / alphas[valid].sum().clamp(min=_EPS)
    mean = a @ units
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1, 1)
        theta = torch.arccos(dots)
        active = theta >= tol
        factor = torch.where(active, theta / torch.sin(theta).clamp(min=1e-12), torch.zeros_like(theta))
        tangent = (a * factor) @ (units - dots[:, None] * mean)
        t_norm = tangent.norm()
        if float(t_norm) < tol:
            break
        mean = torch.cos(t_norm) * mean + torch.sin(t_norm) * (tangent / t_norm)
        m_norm = mean.norm()
        if float(m_norm) > tol:
            mean = mean / m_norm
    return (alphas @ norms) * mean


def karcher(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Karcher mean of the experts' full weights per tensor (base not included)."""
    alphas = _mix_weights(p["weight"])
    result = out if out is not None else torch.empty_like(g.base)
    for start, n, _ in segment_layout(g):
        points = g.base[start : start + n] + g.deltas[:, start : start + n]
        if g.n_models == 1:
            result[start : start + n] = points[0]
            continue
        result[start : start + n] = karcher_mean(points, alphas, int(p["max_iter"]), float(p["tol"])).to(result.dtype)
    return result


def multislerp_vectors(vectors: Tensor, weights: Tensor, eps: float = 1e-8) -> Tensor:
    """Barycentric interpolation on the sphere (mergekit ``multislerp``): project the unit
    vectors to the tangent space at their weighted mean direction, average, map back, and
    scale by the weighted mean norm."""
    x = vectors.float()
    norms = x.norm(dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = weights @ units
    if float(mean.norm()) < eps:
        return weights @ x  # antipodal or all-zero inputs: weighted sum
    mean = mean / mean.norm()
    tangent = weights @ (units - (units @ mean)[:, None] * mean)
    t_norm = tangent.norm() + eps
    result = mean * torch.cos(t_norm) + tangent * (torch.sin(t_norm) / t_norm)
    return result * (weights @ norms.squeeze(1))


def multislerp(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """SLERP generalised to K task vectors, per tensor, around the base."""
    w = _mix_weights(p["weight"]) if int(p["normalize_weights"]) else p["weight"].float()
    merged = torch.empty_like(g.base)
    for start, n, _ in segment_layout(g):
        d = g.deltas[:, start : start + n]
        merged[start : start + n] = d[0] if g.n_models == 1 else multislerp_vectors(d, w).to(merged.dtype)
    return _finish(g, merged, 1.0, out)


def nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, eps: float = 1e-8) -> Tensor:
    """SLERP along the last dimension (each row its own great circle), as mergekit's ``nuslerp``."""
    v0, v1 = v0.float(), v1.float()
    u0 = v0 / v0.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / v1.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin
    return torch.where(colinear, (1 - t) * v0 + t * v1, spherical)


def nuslerp(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """SLERP of the two task vectors around the base with ``t = w1 / (w0 + w1)``; whole
    tensors (``flatten``) or row by row (``row_wise`` = column vectors, mergekit's naming)."""
    w = p["weight"].float()
    total = float(w.sum())
    t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
    merged = torch.empty_like(g.base)
    for start, n, shape in segment_layout(g):
        a, b = g.deltas[0, start : start + n], g.deltas[1, start : start + n]
        if int(p["flatten"]) or shape is None:
            res = nuslerp_vectors(t, a, b)
        elif int(p["row_wise"]):
            res = nuslerp_vectors(t, a.view(shape).t(), b.view(shape).t()).t()
        else:
            res = nuslerp_vectors(t, a.view(shape), b.view(shape))
        merged[start : start + n] = res.reshape(-1).to(merged.dtype)
    return _finish(g, merged, 1.0, out)


# ---------------------------------------------------------------- registry

_WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True, help="scale of each task vector")
_MIX = ParamSpec("weight", 0.0, 2.0, 1.0, per_model=True, help="relative weight of each expert (normalised to sum 1)")
_DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, help="fraction of each task vector kept")
_LAMBDA = ParamSpec("lambda", 0.0, 3.0, 1.0, help="global scale of the merged task vector")
_SEED = ParamSpec("seed", 0, 2**31 - 1, 0, integer=True, searchable=False, help="seed of random drops")


def _flag(name: str, default: int, help: str) -> ParamSpec:
    return ParamSpec(name, 0, 1, default, integer=True, searchable=False, help=help)


register(
    MergeMethod(
        "task_arithmetic_trim", task_arithmetic_trim, (_WEIGHT, _DENSITY, _LAMBDA),
        "task arithmetic on the top-density entries of each task vector (magnitude trim, no sign election)",
    )
)
register(
    MergeMethod(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        (_WEIGHT, _DENSITY, ParamSpec("gamma", 0.0, 0.5, 0.01, help="fraction of largest entries dropped"), _LAMBDA,
         _flag("normalize", 0, "divide by the summed agreeing weights")),
        "breadcrumbs mask, then TIES sign election",
    )
)
register(
    MergeMethod(
        "della_linear",
        della_linear,
        (_WEIGHT, _DENSITY, ParamSpec("epsilon", 0.0, 0.5, 0.15, help="spread of keep probabilities"), _LAMBDA,
         _flag("normalize", 0, "divide by the summed weights"), _flag("rescale", 1, "keep each tensor's L1 norm"), _SEED),
        "row-ranked random drop (DELLA), L1 rescale, weighted sum",
        elementwise=False,
    )
)
register(
    MergeMethod(
        "sce",
        sce,
        (ParamSpec("select_topk", 0.0, 1.0, 1.0, help="fraction of highest-variance elements kept"),),
        "select by variance, calculate weights by mean square, erase minority signs",
        elementwise=False,
    )
)
register(
    MergeMethod(
        "karcher",
        karcher,
        (_MIX, ParamSpec("max_iter", 1, 1000, 10, integer=True, searchable=False, help="iterations"),
         ParamSpec("tol", 0.0, 1.0, 1e-5, searchable=False, help="convergence tolerance")),
        "Riemannian (Karcher) mean of the experts' weights on the sphere",
        elementwise=False,
    )
)
register(
    MergeMethod(
        "multislerp",
        multislerp,
        (_MIX, _flag("normalize_weights", 1, "divide the weights by their sum")),
        "barycentric spherical interpolation of K task vectors",
        elementwise=False,
    )
)
register(
    MergeMethod(
        "nuslerp",
        nuslerp,
        (_MIX, _flag("flatten", 1, "slerp whole tensors (else row by row)"), _flag("row_wise", 0, "with flatten 0: slerp columns")),
        "spherical interpolation of two task vectors, t = w1 / (w0 + w1)",
        min_models=2,
        max_models=2,
        elementwise=False,
    )
)
