"""Fused one-pass CPU kernels (numba) for the element-wise sparsify-and-merge methods.

The torch implementations in ``methods.py`` make 8-12 passes over ``[K, N]`` temporaries;
on a CPU each pass runs far below copy bandwidth. These kernels read every input once and
write the output once, element by element, with the same semantics: per element, the K
task-vector entries are masked (by magnitude thresholds, a magnitude band, or the unit's
resident noise), weighted, then summed or combined by TIES sign election. They are used for
float32/float64 tensors on the CPU when numba imports; everything else (GPU, bfloat16)
takes the torch path. ``tests/test_merge_methods.py`` checks both paths agree.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency (pymoo's AGE-MOEA), but keep the torch path if it is broken
    import numba

    _njit = numba.njit(cache=True, nogil=True, parallel=True)
    _prange = numba.prange
except Exception:  # pragma: no cover - exercised only without numba
    numba = None

MAG, BAND, NOISE, DELLA = 0, 1, 2, 3
NOISE_OFFSET = 32768.0  # int16 noise levels -32768..32767 stand for u = (level + 32768) / 65536

if numba is not None:

    @_njit
    def _fused(base, deltas, bounds, lower, upper, weight, scale, levels, ranks, mode, consensus, normalize, lam, out):  # pragma: no cover - compiled
        k_models = deltas.shape[0]
        n_seg = bounds.shape[0] - 1
        block = 4096
        for s in range(n_seg):
            a, b = bounds[s], bounds[s + 1]
            n_blocks = (b - a + block - 1) // block
            for blk in _prange(n_blocks):
                lo = a + blk * block
                hi = min(lo + block, b)
                for j in range(lo, hi):
                    total = 0.0
                    for k in range(k_models):
                        v = deltas[k, j]
                        keep = False
                        factor = scale[k, s]
                        if mode == 0:
                            keep = abs(v) >= lower[k, s]
                        elif mode == 1:
                            m = abs(v)
                            keep = m >= lower[k, s] and m < upper[k, s]
                        elif mode == 2:
                            keep = levels[k, j] < lower[k, s]
                        else:
                            # DELLA: keep probability lower + upper * rank, rescaled by 1/p
                            r = (ranks[k, j] + NOISE_OFFSET) / 65535.0
                            p = lower[k, s] + upper[k, s] * r
                            u = (levels[k, j] + NOISE_OFFSET) / 65536.0
                            keep = u < p
                            if keep:
                                factor = 1.0 / p
                        if keep:
                            total += weight[k] * (v * factor)
                    if not consensus:
                        out[j] = base[j] + lam * total
                        continue
                    sign = 1.0 if total >= 0 else -1.0
                    acc = 0.0
                    div = 0.0
                    for k in range(k_models):
                        v = deltas[k, j]
                        keep = False
                        factor = scale[k, s]
                        if mode == 0:
                            keep = abs(v) >= lower[k, s]
                        elif mode == 1:
                            m = abs(v)
                            keep = m >= lower[k, s] and m < upper[k, s]
                        elif mode == 2:
                            keep = levels[k, j] < lower[k, s]
                        else:
                            r = (ranks[k, j] + NOISE_OFFSET) / 65535.0
                            p = lower[k, s] + upper[k, s] * r
                            u = (levels[k, j] + NOISE_OFFSET) / 65536.0
                            keep = u < p
                            if keep:
                                factor = 1.0 / p
                        if keep:
                            x = weight[k] * (v * factor)
                            if x * sign > 0:
                                acc += x
                                div += weight[k]
                    if normalize and div != 0:
                        acc = acc / div
                    out[j] = base[j] + lam * acc


def available(*tensors: Tensor) -> bool:
    """True when the fused kernels can run on these tensors (CPU, float32/64, numba)."""
    return numba is not None and all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors)


_DUMMY_I16 = np.zeros((1, 1), dtype=np.int16)


def fused_merge(
    base: Tensor,
    deltas: Tensor,
    segments: tuple[int, ...],
    mode: int,
    weight: Tensor,
    lower: Tensor,
    upper: Tensor | None = None,
    scale: Tensor | None = None,
    levels: Tensor | None = None,
    ranks: Tensor | None = None,
    consensus: bool = False,
    normalize: bool = False,
    lam: float = 1.0,
    out: Tensor | None = None,
) -> Tensor:
    """``out = base + lam * merge(mask(deltas))`` in one pass; per-segment ``[K, S]``
    ``lower``/``upper``/``scale`` (thresholds, noise levels or DELLA's ``d - e`` / ``2e``)."""
    dtype = base.dtype
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    target = out if out is not None else torch.empty_like(base)
    k, s = deltas.shape[0], len(segments)

    def per_seg(t: Tensor | None, fill: float) -> np.ndarray:
        if t is None:
            return np.full((k, s), fill, dtype=np_dtype)
        return np.ascontiguousarray(t.detach().to("cpu", torch.float64).numpy().astype(np_dtype).reshape(k, s))

    bounds = np.zeros(s + 1, dtype=np.int64)
    bounds[1:] = np.cumsum(segments)
    _fused(
        base.numpy(),
        deltas.numpy(),
        bounds,
        per_seg(lower, 0.0),
        per_seg(upper, 0.0),
        weight.detach().to("cpu", torch.float64).numpy().astype(np_dtype),
        per_seg(scale, 1.0),
        levels.numpy() if levels is not None else _DUMMY_I16,
        ranks.numpy() if ranks is not None else _DUMMY_I16,
        mode,
        consensus,
        normalize,
        np_dtype(lam),
        target.numpy(),
    )
    return target
