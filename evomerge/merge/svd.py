"""SVD-family merges of 2-D weight matrices: TSV-M, Iso-C and Iso-CTS.

- **TSV-M** (Gargiulo et al., CVPR 2025, "Task Singular Vectors"): each task matrix is
  cut to its top ``rank * r / K`` singular triplets (``r = min(m, n)``); the K stacked
  left (and right) singular bases are orthogonalised by their polar factor
  (``U = P Q^T`` from ``svd(U) = P S Q^T``), and ``U_perp diag(w_k * s_k) V_perp^T``
  is the merged task matrix.
- **Iso-C** (Marczak et al., ICML 2025, "No Task Left Behind"): the summed task matrix
  ``U S V^T`` with its spectrum flattened to the mean singular value, ``mean(S) U V^T``.
- **Iso-CTS**: the top ``common * r`` directions of the summed matrix (common subspace)
  plus, per task, the top directions of its task matrix projected off the common
  subspace; the union is orthogonalised and given an isotropic spectrum.

Every method returns ``base + lambda * merged``. Segments that are not 2-D (norms,
biases; or any segment when the group carries no ``shapes``) fall back to task
arithmetic with the *mean* ``sum_k w_k delta_k / K``, as the reference implementations do.

Genome-independent SVDs are computed once per group and kept on the group object
(``_svd_cache``): per-task SVDs (TSV-M), the merged direction ``mean(S) U V^T`` for given
weights (Iso-C, Iso-CTS). What depends on a searched rank is kept for the last
``CACHE_ENTRIES`` rank values per group; ``rank`` and ``common`` are snapped to multiples
of ``RANK_STEP`` so a search revisits the same few values.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

from evomerge.merge.groups import DeltaGroup
from evomerge.merge.methods import MergeMethod, Params, ParamSpec, register
from evomerge.merge.segments import attach_shapes, cache_of, segment_layout  # noqa: F401  (attach_shapes re-exported)

RANK_STEP = 0.05
CACHE_ENTRIES = 2  # rank-dependent entries kept per group (each about one task vector in size)


def _lru(group: DeltaGroup, name: str) -> OrderedDict:
    return cache_of(group).setdefault(name, OrderedDict())


def _lru_get(store: OrderedDict, key, build):
    if key in store:
        store.move_to_end(key)
        return store[key]
    value = build()
    store[key] = value
    while len(store) > CACHE_ENTRIES:
        store.popitem(last=False)
    return value


def snap(value: float) -> float:
    return round(round(float(value) / RANK_STEP) * RANK_STEP, 6)


# ---------------------------------------------------------------- linear algebra


def _svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.linalg.svd(matrix.float(), full_matrices=False)


def polar(basis: Tensor) -> Tensor:
    """Nearest matrix with orthonormal columns (``P Q^T`` of ``svd = P S Q^T``)."""
    p, _, qh = _svd(basis)
    return p @ qh


def _weights_key(w: Tensor) -> tuple[float, ...]:
    return tuple(round(float(v), 9) for v in w.tolist())


def _mean_fallback(g: DeltaGroup, start: int, n: int, w: Tensor) -> Tensor:
    """1-D fallback: task arithmetic with the mean of the weighted task vectors."""
    d = g.deltas[:, start : start + n]
    return (w.to(d.dtype) @ d) / g.n_models


def _write(g: DeltaGroup, merged: Tensor, lam: float, out: Tensor | None) -> Tensor:
    if out is None:
        return torch.add(g.base, merged, alpha=lam)
    return torch.add(g.base, merged, alpha=lam, out=out)


# ---------------------------------------------------------------- TSV-M


def _tsv_svds(g: DeltaGroup, start: int, n: int, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-task thin SVDs of one matrix, truncated to the most any rank can use (r / K)."""
    key = ("tsv_svd", start)
    cache = cache_of(g)
    if key not in cache:
        k_max = max(1, min(shape) // g.n_models)
        us, ss, vhs = [], [], []
        for i in range(g.n_models):
            u, s, vh = _svd(g.deltas[i, start : start + n].view(shape))
            us.append(u[:, :k_max])
            ss.append(s[:k_max])
            vhs.append(vh[:k_max])
        cache[key] = (torch.stack(us), torch.stack(ss), torch.stack(vhs))  # [K, m, k], [K, k], [K, k, n]
    return cache[key]


def tsv_rank(shape: tuple[int, int], n_models: int, rank: float) -> int:
    """Singular directions kept per task: ``floor(rank * min(m, n) / K)``, at least 1."""
    return max(1, math.floor(snap(rank) * min(shape) / n_models + 1e-9))


def _tsv_basis(g: DeltaGroup, start: int, n: int, shape: tuple[int, int], k: int) -> tuple[Tensor, Tensor, Tensor]:
    def build():
        u, s, vh = _tsv_svds(g, start, n, shape)
        kk = min(k, s.shape[1])
        u_cat = u[:, :, :kk].permute(1, 0, 2).reshape(shape[0], -1)  # [m, K*k], task-major
        v_cat = vh[:, :kk, :].reshape(-1, shape[1]).t()  # [n, K*k]
        return polar(u_cat), s[:, :kk].contiguous(), polar(v_cat).t().contiguous()

    return _lru_get(_lru(g, ("tsv_basis", start)), k, build)


def tsv_m(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    w = p["weight"].float()
    merged = torch.empty_like(g.base)
    for start, n, shape in segment_layout(g):
        if shape is None:
            merged[start : start + n] = _mean_fallback(g, start, n, w)
            continue
        u, s, vh = _tsv_basis(g, start, n, shape, tsv_rank(shape, g.n_models, float(p["rank"])))
        sigma = (s * w[:, None]).reshape(-1)  # task-major, matching u's columns
        merged[start : start + n] = ((u * sigma) @ vh).reshape(-1).to(merged.dtype)
    return _write(g, merged, float(p["lambda"]), out)


# ---------------------------------------------------------------- Iso-C / Iso-CTS


def _iso_c_direction(g: DeltaGroup, w: Tensor) -> Tensor:
    """Flattened merged task vector of Iso-C (lambda = 1) for weights ``w``."""

    def build():
        merged = torch.empty_like(g.base)
        for start, n, shape in segment_layout(g):
            if shape is None:
                merged[start : start + n] = _mean_fallback(g, start, n, w)
                continue
            total = (w.to(g.deltas.dtype) @ g.deltas[:, start : start + n]).view(shape)
            u, s, vh = _svd(total)
            merged[start : start + n] = (s.mean() * (u @ vh)).reshape(-1).to(merged.dtype)
        return merged

    return _lru_get(_lru(g, "iso_c"), _weights_key(w), build)


def iso_c(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    return _write(g, _iso_c_direction(g, p["weight"].float()), float(p["lambda"]), out)


def cts_split(r: int, n_models: int, common: float) -> tuple[int, int]:
    """(common directions, directions per task), as in the reference implementation:
    the task-specific total is rounded to a multiple of K and the common part takes the rest."""
    k = int(r * snap(common))
    per_task = round((r - k) / n_models)
    while per_task * n_models > r:
        per_task -= 1
    return r - per_task * n_models, per_task


def _iso_cts_matrix(g: DeltaGroup, start: int, n: int, shape: tuple[int, int], w: Tensor, common: float) -> Tensor:
    cache = cache_of(g)
    key = ("cts_sum", start, _weights_key(w))
    if key not in cache:  # the summed matrix's SVD does not depend on ``common``
        cache[key] = _svd((w.to(g.deltas.dtype) @ g.deltas[:, start : start + n]).view(shape))
    u, s, vh = cache[key]
    k, per_task = cts_split(min(shape), g.n_models, common)
    us, ss, vhs = [u[:, :k]], [s[:k]], [vh[:k]]
    if per_task > 0:
        u_c = u[:, :k]
        for i in range(g.n_models):
            task = (float(w[i]) * g.deltas[i, start : start + n].float()).view(shape)
            rest = task - u_c @ (u_c.t() @ task)  # projected off the common subspace
            ut, st, vht = _svd(rest)
            us.append(ut[:, :per_task])
            ss.append(st[:per_task])
            vhs.append(vht[:per_task])
    sigma = torch.cat(ss).mean()
    u_perp = polar(torch.cat(us, dim=1))
    v_perp = polar(torch.cat(vhs, dim=0).t())
    return sigma * (u_perp @ v_perp.t())


def _iso_cts_direction(g: DeltaGroup, w: Tensor, common: float) -> Tensor:
    def build():
        merged = torch.empty_like(g.base)
        for start, n, shape in segment_layout(g):
            if shape is None:
                merged[start : start + n] = _mean_fallback(g, start, n, w)
            else:
                merged[start : start + n] = _iso_cts_matrix(g, start, n, shape, w, common).reshape(-1).to(merged.dtype)
        return merged

    return _lru_get(_lru(g, "iso_cts"), (_weights_key(w), snap(common)), build)


def iso_cts(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    return _write(g, _iso_cts_direction(g, p["weight"].float(), float(p["common"])), float(p["lambda"]), out)


# ---------------------------------------------------------------- registry

# Iso's flat spectrum shrinks the dominant directions (by 4-20x on the toy zoo), so useful
# scales reach well above task arithmetic's: a wider hard bound than the other methods' 3
_SCALE = ParamSpec("lambda", 0.0, 10.0, 1.0, help="scale of the merged task vector")
_FIXED_WEIGHT = ParamSpec(
    "weight", 0.0, 2.0, 1.0, per_model=True, searchable=False,
    help="scale of each task vector before the SVD (not searched: new weights mean new SVDs)",
)

_NO_MERGEKIT = "mergekit 0.1.5 has no SVD-family method"

register(
    MergeMethod(
        "tsv_m",
        tsv_m,
        (
            ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True, help="scale of each task's singular values"),
            ParamSpec("rank", RANK_STEP, 1.0, 1.0, help=f"fraction of min(m, n) kept over all tasks (snapped to {RANK_STEP})"),
            _SCALE,
        ),
        "TSV-M: per-task truncated SVDs, orthogonalised singular bases (2-D tensors)",
        elementwise=False,
        mergekit_reason=_NO_MERGEKIT,
    )
)
register(
    MergeMethod(
        "iso_c", iso_c, (_FIXED_WEIGHT, _SCALE), "Iso-C: summed task matrix with a flat (isotropic) spectrum", elementwise=False,
        mergekit_reason=_NO_MERGEKIT,
    )
)
register(
    MergeMethod(
        "iso_cts",
        iso_cts,
        (
            _FIXED_WEIGHT,
            ParamSpec("common", 0.0, 1.0, 0.8, help=f"fraction of min(m, n) given to the common subspace (snapped to {RANK_STEP})"),
            _SCALE,
        ),
        "Iso-CTS: common + task-specific subspaces with an isotropic spectrum",
        elementwise=False,
        mergekit_reason=_NO_MERGEKIT,
    )
)
