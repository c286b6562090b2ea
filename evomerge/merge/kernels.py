"""Fused one-pass CPU kernels (numba) for the element-wise sparsify-and-merge methods.

The torch implementations in ``methods.py`` make 8-12 passes over ``[K, N]`` temporaries;
on a CPU each pass runs far below copy bandwidth. These kernels read every input once and
write the output once, element by element, with the same semantics: per element, the K
task-vector entries are masked (by magnitude thresholds with an index tie cut, a magnitude
band, exact ranks, or the unit's resident noise), weighted, then summed or combined by TIES sign election. They are used for
float32/float64 tensors on the CPU when numba imports; everything else (GPU, bfloat16)
takes the torch path. ``tests/test_merge_methods.py`` checks both paths agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency (pymoo's AGE-MOEA), but keep the torch path if it is broken
    import numba

    _njit = numba.njit(cache=True, nogil=True, parallel=True, error_model="numpy")
    _prange = numba.prange
except Exception:  # pragma: no cover - exercised only without numba
    numba = None

MAG, BAND, NOISE, DELLA, RANK = 0, 1, 2, 3, 4
# int16 levels -32768..32767 stand for u = (level + 32768) * LEVEL_SCALE in [0, 1) (noise)
# and rank = (level + 32768) * RANK_SCALE in [0, 1] (DELLA's magnitude ranks)
LEVEL_SCALE = 1.0 / 65536.0
RANK_SCALE = 1.0 / 65535.0

if numba is not None:

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _kept(mode, v, gi, r, lk, uk, clo, chi):  # pragma: no cover - compiled
        """Is task-vector entry ``v`` (unit index ``gi``, exact rank ``r``) in the mask?
        MAG: among the top c (``|v| > lk``, or tied with it and ``gi < clo``); BAND: that,
        and not among the top cut (``|v| < uk``, or tied with it and ``gi >= chi``);
        RANK: ``clo <= r < chi``. Comparisons of ``v`` and ``-lk`` avoid an abs (vectorises)."""
        if mode == 4:
            return (r >= clo) & (r < chi)
        above = (v > lk) | (v < -lk) | (((v == lk) | (v == -lk)) & (gi < clo))
        if mode == 0:
            return above
        return above & ((v < uk) & (v > -uk) | (((v == uk) | (v == -uk)) & (gi >= chi)))

    @numba.njit(cache=True, nogil=True, error_model="numpy", inline="always")
    def _accumulate(mode, d, lv, rk, order, first, wk, lk, uk, sk, clo, chi, total, acc, div, phase):  # pragma: no cover - compiled
        """One task vector over one block starting at unit index ``first``. ``phase`` 0:
        ``total += x``; phase 1: add the entries agreeing with the elected sign (+ when
        ``total >= 0``) to ``acc``/``div``, where ``x`` = w_k * kept, rescaled entry, else
        0. The mode and phase tests sit outside the loops so every loop is branch-free."""
        n = d.shape[0]
        zero = total[0] * 0
        # float32 constants (a bare 32768.0 would make numba compute in float64)
        off = np.float32(32768.0)
        rank_scale = np.float32(RANK_SCALE)
        level_scale = np.float32(LEVEL_SCALE)
        exact = mode == 4
        if phase == 0:
            if mode == 0 or mode == 1 or exact:  # top c, band or exact ranks
                for i in range(n):
                    v = d[i]
                    r = order[i] if exact else 0
                    total[i] += wk * v if _kept(mode, v, first + i, r, lk, uk, clo, chi) else zero
            elif mode == 2:  # noise level below the density's level (DARE)
                for i in range(n):
                    total[i] += wk * (d[i] * sk) if lv[i] < lk else zero
            else:  # DELLA: keep probability lk + uk * rank, survivors times 1 / p
                for i in range(n):
                    p = lk + uk * ((np.float32(rk[i]) + off) * rank_scale)
                    total[i] += wk * (d[i] / p) if (np.float32(lv[i]) + off) * level_scale < p else zero
            return
        if mode == 0 or mode == 1 or exact:
            for i in range(n):
                v = d[i]
                r = order[i] if exact else 0
                x = wk * v if _kept(mode, v, first + i, r, lk, uk, clo, chi) else zero
                agree = ((x > 0) & (total[i] >= 0)) | ((x < 0) & (total[i] < 0))
                acc[i] += x if agree else zero
                div[i] += wk if agree else zero
        elif mode == 2:
            for i in range(n):
                x = wk * (d[i] * sk) if lv[i] < lk else zero
                agree = ((x > 0) & (total[i] >= 0)) | ((x < 0) & (total[i] < 0))
                acc[i] += x if agree else zero
                div[i] += wk if agree else zero
        else:
            for i in range(n):
                p = lk + uk * ((np.float32(rk[i]) + off) * rank_scale)
                x = wk * (d[i] / p) if (np.float32(lv[i]) + off) * level_scale < p else zero
                agree = ((x > 0) & (total[i] >= 0)) | ((x < 0) & (total[i] < 0))
                acc[i] += x if agree else zero
                div[i] += wk if agree else zero

    @_njit
    def _fused(base, deltas, bounds, lower, upper, weight, scale, cut_lo, cut_hi, levels, ranks, order, mode, consensus, normalize, lam, out):  # pragma: no cover - compiled
        # blocks of 2048 entries with their sums kept in L1
        k_models = deltas.shape[0]
        n_seg = bounds.shape[0] - 1
        block = 2048
        noise = mode == 2 or mode == 3  # otherwise levels / ranks are 1 x 1 placeholders
        ranked = mode == 3
        exact = mode == 4
        for s in range(n_seg):
            a, b = bounds[s], bounds[s + 1]
            n_blocks = (b - a + block - 1) // block
            for blk in _prange(n_blocks):
                lo = a + blk * block
                hi = min(lo + block, b)
                total = np.zeros(hi - lo, dtype=base.dtype)
                acc = np.zeros(hi - lo, dtype=base.dtype)
                div = np.zeros(hi - lo, dtype=base.dtype)
                for phase in range(2 if consensus else 1):
                    for k in range(k_models):
                        lv = levels[k, lo:hi] if noise else levels[0, 0:1]
                        rk = ranks[k, lo:hi] if ranked else ranks[0, 0:1]
                        od = order[k, lo:hi] if exact else order[0, 0:1]
                        _accumulate(
                            mode, deltas[k, lo:hi], lv, rk, od, lo, weight[k], lower[k, s], upper[k, s], scale[k, s],
                            cut_lo[k, s], cut_hi[k, s], total, acc, div, phase,
                        )
                ob = out[lo:hi]
                bb = base[lo:hi]
                if not consensus:
                    for i in range(hi - lo):
                        ob[i] = bb[i] + lam * total[i]
                elif normalize:
                    for i in range(hi - lo):
                        ob[i] = bb[i] + lam * (acc[i] / div[i] if div[i] != 0 else acc[i])
                else:
                    for i in range(hi - lo):
                        ob[i] = bb[i] + lam * acc[i]


class torch_thread_budget:
    """Run a parallel kernel on torch's thread count, and leave torch's count as it was.

    numba's OpenMP thread pool shares torch's libgomp, and launching it sets that library's
    thread count to numba's (every core): from the first fused merge on, torch ran every op on
    all cores whatever OMP_NUM_THREADS or torch.set_num_threads said. Two benchmark processes
    told to use one thread each on a 2-core machine evaluated candidates 3-5x slower, their
    idle OpenMP workers spinning against each other. (The kernel's blocks are independent:
    its result does not depend on the thread count.)"""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(self.threads, numba.config.NUMBA_NUM_THREADS)))

    def __exit__(self, *exc: object) -> bool:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return False


def available(*tensors: Tensor) -> bool:
    """True when the fused kernels can run on these tensors (CPU, float32/64, numba)."""
    return numba is not None and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


_DUMMY_I16 = np.zeros((1, 1), dtype=np.int16)
_DUMMY_I32 = np.zeros((1, 1), dtype=np.int32)


def fused_merge(
    base: Tensor,
    deltas: Tensor,
    segments: tuple[int, ...],
    mode: int,
    weight: Tensor,
    lower: Tensor | None = None,
    upper: Tensor | None = None,
    scale: Tensor | None = None,
    levels: Tensor | None = None,
    ranks: Tensor | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    out: Tensor | None = None,
    cut_lo: Tensor | None = None,
    cut_hi: Tensor | None = None,
    order: Tensor | None = None,
) -> Tensor:
    """``out = base + lam * merge(mask(deltas))`` in one pass; per-segment ``[K, S]``
    ``lower``/``upper``/``scale`` (thresholds, noise levels or DELLA's ``d - e`` / ``2e``),
    ``cut_lo``/``cut_hi`` (the tie cuts of MAG/BAND, unit indices; the rank bounds of RANK)
    and, for RANK, ``order`` (``[K, N]`` int32 exact ranks, ``DeltaGroup.order_ranks``)."""
    dtype = base.dtype
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    target = out if out is not None else torch.empty_like(base)
    k, s = deltas.shape[0], len(segments)

    def per_seg(t: Tensor | None, fill: float) -> np.ndarray:
        if t is None:
            return np.full((k, s), fill, dtype=np_dtype)
        return np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy().astype(np_dtype).reshape(k, s))

    def per_seg_int(t: Tensor | None) -> np.ndarray:
        if t is None:
            return np.zeros((k, s), dtype=np.int64)
        return np.ascontiguousarray(t.detach().to("cpu", torch.int64).numpy().reshape(k, s))

    bounds = np.zeros(s + 1, dtype=np.int64)
    bounds[1:] = np.cumsum(segments)
    with torch_thread_budget():
        _fused(
            base.numpy(),
            deltas.numpy(),
            bounds,
            per_seg(lower, 0.0),
            per_seg(upper, 0.0),
            weight.detach().to("cpu", torch.float64).numpy().astype(np_dtype),
            per_seg(scale, 1.0),
            per_seg_int(cut_lo),
            per_seg_int(cut_hi),
            levels.numpy() if levels is not None else _DUMMY_I16,
            ranks.numpy() if ranks is not None else _DUMMY_I16,
            order.numpy() if order is not None else _DUMMY_I32,
            mode,
            consensus,
            normalize,
            np_dtype(lam),
            target.numpy(),
        )
    return target
