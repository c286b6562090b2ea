"""mergekit 0.1.5 methods that evomerge lacked, written against ``DeltaGroup``.

Semantics follow mergekit (``merge_methods/*.py``, ``sparsify.py``) per tensor (=
per segment of the group), with these documented differences, all in favour of a
search that must not crash on a sampled point:

- ``della_linear``: keep probabilities are clipped to [0, 1] (mergekit raises when
  ``density +- epsilon`` leaves (0, 1)); random draws are the unit's resident noise
  (``DeltaGroup.noise``, as DARE and DELLA), not mergekit's global RNG.
- ``multislerp``: where the weighted mean direction vanishes it falls back to the
  weighted sum for any K (mergekit does so for K = 2 and raises otherwise).
- ``karcher``, ``multislerp``, ``nuslerp``: all-zero weights mean equal weights.

Row-wise statistics (DELLA's per-row magnitude ranks, nuslerp's non-flattened mode) need
each segment's 2-D shape: ``group.shapes`` (set by the merger, see ``segments.attach_shapes``);
without it every segment counts as one row.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evomerge.merge.groups import DeltaGroup
from evomerge.merge.kernels import LEVEL_SCALE
from evomerge.merge.methods import MergekitSpec, MergeMethod, Params, ParamSpec, banded_merge, della_check, mergekit_arithmetic, register
from evomerge.merge.segments import cache_of, segment_layout

_EPS = 1e-8


def _mix_weights(w: Tensor) -> Tensor:
    """Non-negative mixing weights normalised to sum 1 (equal when they sum to ~0)."""
    w = w.float()
    total = float(w.sum())
    if abs(total) < 1e-6:
        return torch.full_like(w, 1.0 / w.numel())
    return w / total


# ---------------------------------------------------------------- chunking
#
# DELLA-linear and SCE need tensor-wide sums (L1 norms, mean squares) before they can mix
# the experts, so they run in two passes over row-aligned chunks of at most
# ``CHUNK_ELEMENTS`` entries: per-candidate temporaries are ``K x CHUNK_ELEMENTS`` instead
# of ``K x tensor size``. Every tensor-wide sum adds fixed ``SUM_BLOCK`` blocks first and
# then the blocks, and every per-element step is a single rounding (no fused
# multiply-adds), so the result is bit-identical for any chunk size.

CHUNK_ELEMENTS = 1 << 18
SUM_BLOCK = 1024


def chunk_spans(n: int) -> list[tuple[int, int]]:
    """``[a, b)`` pieces of a tensor of ``n`` entries, each a multiple of ``SUM_BLOCK`` long
    (but the last)."""
    step = max(SUM_BLOCK, CHUNK_ELEMENTS // SUM_BLOCK * SUM_BLOCK)
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def block_sums(x: Tensor) -> Tensor:
    """``[K, m]`` -> ``[K, ceil(m / SUM_BLOCK)]`` float32 sums of consecutive ``SUM_BLOCK`` entries."""
    k, m = x.shape
    full = m - m % SUM_BLOCK
    parts = []
    if full:
        parts.append(x[:, :full].reshape(k, full // SUM_BLOCK, SUM_BLOCK).sum(-1, dtype=torch.float32))
    if full < m:
        parts.append(x[:, full:].sum(-1, keepdim=True, dtype=torch.float32))
    return torch.cat(parts, 1)


def _mix(rows: Tensor, coef: list[float]) -> Tensor:
    """``sum_k coef_k * rows_k`` as separate multiplies and adds (no FMA: chunk-independent bits)."""
    acc = rows[0] * coef[0]
    for k in range(1, rows.shape[0]):
        acc += rows[k] * coef[k]
    return acc


def _write(g: DeltaGroup, a: int, b: int, merged: Tensor, lam: float, result: Tensor) -> None:
    """``result[a:b] = base[a:b] + lam * merged`` (two roundings, as in every chunk)."""
    torch.add(g.base[a:b], merged * lam if lam != 1 else merged, out=result[a:b])


# ---------------------------------------------------------------- task arithmetic + trimming


def task_arithmetic_trim(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Task arithmetic on each task vector's top ``density`` entries by magnitude (no sign
    election): mergekit's breadcrumbs with ``gamma = 0``, so ``floor(density * n)`` entries
    per tensor (none when that is 0, unlike TIES's at-least-one)."""
    return banded_merge(g, p, out, consensus=False)


def breadcrumbs_ties(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Breadcrumbs mask (drop the top ``gamma``, keep the next ``density``; counts as mergekit,
    see ``breadcrumbs_band``), then TIES sign election."""
    return banded_merge(g, p, out, consensus=True)


task_arithmetic_trim.streams = True  # type: ignore[attr-defined]  # one fused kernel on the CPU
breadcrumbs_ties.streams = True  # type: ignore[attr-defined]


# ---------------------------------------------------------------- DELLA (linear)


def row_rank_fraction(g: DeltaGroup) -> Tensor:
    """Magnitude rank of every element within its row (2-D segments) or tensor, in [0, 1]
    (0 = smallest), as mergekit's ``della_magprune``. Genome-independent: cached (fp16);
    built a few rows at a time."""
    cache = cache_of(g)
    if "row_rank" not in cache:
        ranks = torch.empty(g.deltas.shape, dtype=torch.float16, device=g.deltas.device)
        for start, n, shape in segment_layout(g):
            cols = shape[1] if shape is not None else n
            step = max(1, CHUNK_ELEMENTS // cols) * cols
            for i in range(g.n_models):
                for a in range(start, start + n, step):
                    b = min(a + step, start + n)
                    rows = g.deltas[i, a:b].reshape(-1, cols).abs().float()
                    r = rows.argsort(dim=1, stable=True).argsort(dim=1).float()
                    ranks[i, a:b] = (r / max(cols - 1, 1)).reshape(-1).to(torch.float16)
        cache["row_rank"] = ranks
    return cache["row_rank"]


def _l1(g: DeltaGroup, start: int, n: int) -> Tensor:
    """``[K]`` L1 norm of each task vector's segment (genome-independent, cached)."""
    cache = cache_of(g)
    key = ("l1", start)
    if key not in cache:
        cache[key] = torch.cat([block_sums(g.deltas[:, start + a : start + b].abs()) for a, b in chunk_spans(n)], 1).sum(1)
    return cache[key]


def della_linear(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """DELLA without sign election: keep probability ``density - eps + 2 eps * rank`` (rank
    within the row, clipped to [0, 1]; density 1 keeps all, 0 none, as mergekit), survivors
    rescaled so each tensor keeps its L1 norm, weighted sum. The draws are the unit's
    resident noise (``DeltaGroup.noise``), so masks do not depend on the chunking."""
    eps = float(p["epsilon"])
    density = p["density"].float()[:, None]
    weights = p["weight"].float()
    ranks = row_rank_fraction(g)
    levels = g.noise(int(p["seed"]))
    total = float(weights.sum())
    divide = bool(int(p["normalize"])) and abs(total) >= _EPS
    result = out if out is not None else torch.empty_like(g.base)

    def kept(a: int, b: int) -> Tensor:
        d = g.deltas[:, a:b]
        prob = (density - eps + 2 * eps * ranks[:, a:b].float()).clamp_(0, 1)
        prob = torch.where(density >= 1, 1.0, torch.where(density <= 0, 0.0, prob))
        u = (levels[:, a:b].float() + 32768.0) * LEVEL_SCALE
        return d * (u < prob).to(d.dtype)

    for start, n, _ in segment_layout(g):
        spans = [(start + a, start + b) for a, b in chunk_spans(n)]
        first = kept(*spans[0]) if len(spans) == 1 else None  # one chunk: keep it for pass 2
        scale = torch.ones_like(weights)
        if int(p["rescale"]):
            pieces = [first] if first is not None else (kept(a, b) for a, b in spans)
            after = torch.cat([block_sums(x.abs()) for x in pieces], 1).sum(1)
            before = _l1(g, start, n)
            ok = (before >= 1e-7) & (after >= 1e-7) & (density[:, 0] < 1)
            scale = torch.where(ok, before / after.clamp(min=1e-7), scale)
        coef = (weights * scale).tolist()
        for a, b in spans:
            merged = _mix(first if first is not None else kept(a, b), coef)
            if divide:
                merged /= total
            _write(g, a, b, merged, float(p["lambda"]), result)
    return result


# ---------------------------------------------------------------- SCE


def _variance_table(g: DeltaGroup, start: int, n: int) -> tuple[Tensor, Tensor, Tensor, int]:
    """Per-element variance across experts (in the task vectors' dtype, as mergekit), its
    descending stable sort (values, indices) and non-zero count (cached)."""
    cache = cache_of(g)
    key = ("sce_var", start)
    if key not in cache:
        var = torch.cat([g.deltas[:, start + a : start + b].var(0, unbiased=False) for a, b in chunk_spans(n)])
        ordered = var.float().sort(descending=True, stable=True)
        cache[key] = (var, ordered.values, ordered.indices, int(torch.count_nonzero(var)))
    return cache[key]


def sce_selection(g: DeltaGroup, start: int, n: int, topk: float) -> "Tensor | tuple[float, int]":
    """The ``select_topk`` fraction of the segment's elements with the highest variance:
    exactly ``k = int(nonzero * topk)`` of them. Exact groups: mergekit's own choice
    (``torch.topk``), as a bool mask; otherwise ``(threshold, cut)``: ``var > threshold``
    or tied with it at a segment index ``< cut`` (ties in index order), an O(1) lookup."""
    var, values, indices, nonzero = _variance_table(g, start, n)
    k = int(nonzero * topk)
    if k <= 0:
        return math.inf, 0
    if g.exact:
        mask = torch.zeros(n, dtype=torch.bool, device=var.device)
        mask[torch.topk(var.abs().view(-1), k=k, largest=True).indices] = True
        return mask
    return float(values[k - 1]), int(indices[k - 1]) + 1


def sce(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """SCE: keep the ``select_topk`` fraction of elements with the highest variance across
    experts (exactly ``int(nonzero * topk)``, see ``sce_selection``), weight each task
    vector by its mean square, TIES sign election, weighted mean. The variance selection
    is per element, so it runs chunk by chunk like the mixing."""
    topk = float(p["select_topk"])
    result = out if out is not None else torch.empty_like(g.base)
    if mergekit_arithmetic(g.deltas):
        for start, n, _ in segment_layout(g):
            _sce_mergekit_order(g, start, n, topk, result)
        return result
    for start, n, _ in segment_layout(g):
        selection = sce_selection(g, start, n, topk) if topk < 1 else None
        var = _variance_table(g, start, n)[0] if isinstance(selection, tuple) else None

        def selected(a: int, b: int) -> Tensor:
            tv = g.deltas[:, a:b]
            if selection is None:
                return tv
            if isinstance(selection, Tensor):
                return tv * selection[a - start : b - start].to(tv.dtype)
            threshold, cut = selection
            v = var[a - start : b - start].float()
            index = torch.arange(a - start, b - start, device=v.device)
            return tv * ((v > threshold) | ((v == threshold) & (index < cut))).to(tv.dtype)

        spans = [(start + a, start + b) for a, b in chunk_spans(n)]
        first = selected(*spans[0]) if len(spans) == 1 else None
        pieces = [first] if first is not None else (selected(a, b) for a, b in spans)
        weights = torch.cat([block_sums(x.float().square()) for x in pieces], 1).sum(1) / n  # mean squares
        total = float(weights.sum())
        weights = torch.full_like(weights, 1.0 / g.n_models) if abs(total) < 1e-6 else weights / total
        coef = weights.tolist()
        for a, b in spans:
            tv = first if first is not None else selected(a, b)
            majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)  # of the unweighted task vectors
            aligned = (tv * majority).clamp_(min=0)  # > 0 where an entry agrees; zeros never agree
            merged = _mix(aligned, coef).mul_(majority) / _mix((aligned > 0).to(tv.dtype), coef).clamp_(min=1e-6)
            _write(g, a, b, merged, 1.0, result)
    return result


def _sce_mergekit_order(g: DeltaGroup, start: int, n: int, topk: float, result: Tensor) -> None:
    """SCE on one tensor, step by step as mergekit computes it (bfloat16 / float16 pools: each
    step rounds, so the same steps give mergekit's bits): selection mask, sign election, mean
    squares over the whole tensor, weighted mean of the agreeing entries."""
    tv = g.deltas[:, start : start + n]
    if topk < 1:
        selection = sce_selection(g, start, n, topk)
        if isinstance(selection, tuple):  # the search's sampled table: threshold, ties by index
            threshold, cut = selection
            v = _variance_table(g, start, n)[0].float()
            selection = (v > threshold) | ((v == threshold) & (torch.arange(n, device=v.device) < cut))
        tv = tv * selection.to(tv.dtype)
    tv = tv.contiguous()  # mergekit's stacked task vectors (a reduction's order follows the layout)
    majority = (tv.sum(dim=0) >= 0).to(tv.dtype) * 2 - 1
    erase = tv.sign() == majority
    weights = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    erased = weights[:, None] * erase
    merged = (tv * erased).sum(dim=0) / torch.sum(erased, dim=0).clamp(min=1e-6)
    torch.add(g.base[start : start + n], merged, out=result[start : start + n])


# ---------------------------------------------------------------- spherical methods
#
# Every spherical mean below is a linear combination of the inputs, so it is computed in
# the K-dimensional span: the inner products of the task vectors (and the base) are
# genome-independent and cached per tensor; a candidate costs one weighted sum, like
# task arithmetic, instead of K-vector arithmetic in every iteration.


def _gram(g: DeltaGroup, start: int, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(deltas deltas^T [K, K], deltas base [K], base base)`` of one segment, float64."""
    cache = cache_of(g)
    key = ("gram", start)
    if key not in cache:
        d = g.deltas[:, start : start + n].double()
        b = g.base[start : start + n].double()
        cache[key] = (d @ d.t(), d @ b, b @ b)
    return cache[key]


def _norm(c: Tensor, gram: Tensor) -> Tensor:
    return (c @ gram @ c).clamp(min=0).sqrt()


def karcher_coefficients(gram: Tensor, alphas: Tensor, max_iter: int, tol: float) -> Tensor:
    """Coefficients ``gamma`` with ``sum_k gamma_k x_k`` = the weighted Karcher mean of the
    points ``x_k`` (Gram matrix ``gram``) on the sphere, scaled by their weighted mean norm
    (mergekit's ``karcher_merge_tensors``, iterated in the span of the points)."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    gamma = torch.zeros_like(norms)
    valid = norms > tol
    if not bool(valid.any()):
        return gamma
    nv = norms[valid]
    gu = gram[valid][:, valid] / (nv[:, None] * nv[None, :])  # Gram matrix of the unit vectors
    a = alphas[valid] / alphas[valid].sum().clamp(min=1e-12)
    c = a.clone()
    m = _norm(c, gu)
    c = torch.nn.functional.one_hot(torch.tensor(0), len(a)).to(c) if float(m) < tol else c / m
    for _ in range(max_iter):
        dots = (gu @ c).clamp(-1, 1)  # cosines between each unit point and the mean
        theta = torch.arccos(dots)
        factor = torch.where(theta >= tol, theta / torch.sin(theta).clamp(min=1e-300), torch.zeros_like(theta))
        tangent = a * factor - (a * factor * dots).sum() * c
        t_norm = _norm(tangent, gu)
        if float(t_norm) < tol:
            break
        c = torch.cos(t_norm) * c + torch.sin(t_norm) * tangent / t_norm
        m = _norm(c, gu)
        if float(m) > tol:
            c = c / m
    gamma[valid] = (alphas @ norms) * c / nv
    return gamma


def karcher(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Karcher mean of the experts' full weights ``base + delta_k`` per tensor (base not included)."""
    alphas = _mix_weights(p["weight"]).double()
    result = out if out is not None else torch.empty_like(g.base)
    for start, n, _ in segment_layout(g):
        dd, db, bb = _gram(g, start, n)
        points = dd + db[:, None] + db[None, :] + bb  # (b + d_i) . (b + d_j)
        gamma = karcher_coefficients(points, alphas, int(p["max_iter"]), float(p["tol"]))
        seg = result[start : start + n]
        torch.mul(g.base[start : start + n], float(gamma.sum()), out=seg)
        seg.addmv_(g.deltas[:, start : start + n].t(), gamma.to(seg.dtype))
    return result


def multislerp_coefficients(gram: Tensor, weights: Tensor, eps: float = 1e-8) -> Tensor:
    """Coefficients over the inputs of mergekit's ``multislerp``: project the unit vectors to
    the tangent space at their weighted mean direction, average, map back with the
    exponential map, scale by the weighted mean norm."""
    norms = gram.diagonal().clamp(min=0).sqrt()
    inv = 1 / (norms + eps)
    gu = gram * inv[:, None] * inv[None, :]
    m = _norm(weights, gu)
    if float(m) < eps:
        return weights.clone()  # antipodal or all-zero inputs: weighted sum
    c = weights / m
    tangent = weights - (weights * (gu @ c)).sum() * c
    t_norm = _norm(tangent, gu) + eps
    unit = c * torch.cos(t_norm) + tangent * (torch.sin(t_norm) / t_norm)
    return unit * (weights @ norms) * inv


def multislerp(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """SLERP generalised to K task vectors, per tensor, around the base."""
    w = (_mix_weights(p["weight"]) if int(p["normalize_weights"]) else p["weight"].float()).double()
    result = out if out is not None else torch.empty_like(g.base)
    for start, n, _ in segment_layout(g):
        seg = result[start : start + n]
        gamma = torch.ones(1, dtype=torch.float64, device=seg.device) if g.n_models == 1 else multislerp_coefficients(_gram(g, start, n)[0], w)
        torch.addmv(g.base[start : start + n], g.deltas[:, start : start + n].t(), gamma.to(seg.dtype), out=seg)
    return result


def nuslerp_coefficients(t: float, aa: Tensor, ab: Tensor, bb: Tensor, eps: float = 1e-8) -> tuple[Tensor, Tensor]:
    """mergekit's ``nuslerp`` of vectors ``v0``, ``v1`` given their inner products (any batch
    shape): ``(s0, s1)`` with result ``s0 v0 + s1 v1``; linear where they are colinear."""
    cos = (ab / (aa.sqrt().clamp(min=1e-7) * bb.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.where(colinear, torch.ones_like(theta), torch.sin(theta))
    s0 = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    s1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return s0, s1


def _row_products(g: DeltaGroup, start: int, n: int, shape: tuple[int, int], columns: bool) -> tuple[Tensor, Tensor, Tensor]:
    cache = cache_of(g)
    key = ("rows", start, columns)
    if key not in cache:
        a, b = (g.deltas[i, start : start + n].view(shape).double() for i in (0, 1))
        dim = 0 if columns else 1
        cache[key] = ((a * a).sum(dim), (a * b).sum(dim), (b * b).sum(dim))
    return cache[key]


def nuslerp(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """SLERP of the two task vectors around the base with ``t = w1 / (w0 + w1)``; whole
    tensors (``flatten``) or row by row (``row_wise`` = column vectors, mergekit's naming)."""
    w = p["weight"].float()
    total = float(w.sum())
    t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
    result = out if out is not None else torch.empty_like(g.base)
    for start, n, shape in segment_layout(g):
        seg = result[start : start + n]
        a, b = g.deltas[0, start : start + n], g.deltas[1, start : start + n]
        if int(p["flatten"]) or shape is None:
            dd = _gram(g, start, n)[0]
            s0, s1 = nuslerp_coefficients(t, dd[0, 0], dd[0, 1], dd[1, 1])
            torch.add(g.base[start : start + n], a, alpha=float(s0), out=seg)
            seg.add_(b, alpha=float(s1))
            continue
        columns = bool(int(p["row_wise"]))
        s0, s1 = nuslerp_coefficients(t, *_row_products(g, start, n, shape, columns))
        s0, s1 = (s.to(seg.dtype)[None, :] if columns else s.to(seg.dtype)[:, None] for s in (s0, s1))
        torch.add(g.base[start : start + n].view(shape), a.view(shape) * s0 + b.view(shape) * s1, out=seg.view(shape))
    return result


# ---------------------------------------------------------------- registry

_WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True, help="scale of each task vector")
_MIX = ParamSpec("weight", 0.0, 2.0, 1.0, per_model=True, help="relative weight of each expert (normalised to sum 1)")
_DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, help="fraction of each task vector kept")
_LAMBDA = ParamSpec("lambda", 0.0, 3.0, 1.0, help="global scale of the merged task vector")
_SEED = ParamSpec("seed", 0, 2**31 - 1, 0, integer=True, searchable=False, help="seed of random drops")


def _flag(name: str, default: int, help: str) -> ParamSpec:
    return ParamSpec(name, 0, 1, default, integer=True, searchable=False, help=help)


# ---- mergekit export checks: a one-line reason where mergekit 0.1.5 would differ or fail


def _karcher_check(p, n_models: int) -> str | None:
    w = list(p["weight"])
    if max(w) - min(w) > 1e-12 and sum(w) >= 1e-6:  # all ~0 means equal weights here
        return f"mergekit's karcher weighs the experts equally, these weights are {', '.join(f'{v:g}' for v in w)}"
    return None


def _multislerp_check(p, n_models: int) -> str | None:
    if n_models > 1 and abs(sum(p["weight"])) < 1e-6 and (p["normalize_weights"] or n_models > 2):
        return "weights summing to 0 make mergekit's multislerp divide by 0 (or raise)"
    return None


register(
    MergeMethod(
        "task_arithmetic_trim", task_arithmetic_trim, (_WEIGHT, _DENSITY, _LAMBDA),
        "task arithmetic on the top-density entries of each task vector (magnitude trim, no sign election)",
        # mergekit has no density for task_arithmetic; breadcrumbs with gamma 0 is the same trim
        mergekit=MergekitSpec("breadcrumbs", fixed={"normalize": False, "rescale": False, "gamma": 0.0}),
    )
)
register(
    MergeMethod(
        "breadcrumbs_ties",
        breadcrumbs_ties,
        (_WEIGHT, _DENSITY, ParamSpec("gamma", 0.0, 0.5, 0.01, help="fraction of largest entries dropped"), _LAMBDA,
         _flag("normalize", 0, "divide by the summed agreeing weights")),
        "breadcrumbs mask, then TIES sign election",
        mergekit=MergekitSpec("breadcrumbs_ties", fixed={"rescale": False}),
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
        mergekit=MergekitSpec("della_linear", check=della_check, random=True),
    )
)
register(
    MergeMethod(
        "sce",
        sce,
        (ParamSpec("select_topk", 0.0, 1.0, 1.0, help="fraction of highest-variance elements kept"),),
        "select by variance, calculate weights by mean square, erase minority signs",
        elementwise=False,
        mergekit=MergekitSpec("sce"),
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
        mergekit=MergekitSpec("karcher", sources="experts", skip=("weight",), check=_karcher_check),
    )
)
register(
    MergeMethod(
        "multislerp",
        multislerp,
        (_MIX, _flag("normalize_weights", 1, "divide the weights by their sum")),
        "barycentric spherical interpolation of K task vectors",
        elementwise=False,
        mergekit=MergekitSpec("multislerp", check=_multislerp_check),
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
        mergekit=MergekitSpec("nuslerp", rename={"flatten": "nuslerp_flatten", "row_wise": "nuslerp_row_wise"}),
    )
)
