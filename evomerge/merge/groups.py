"""Flat delta groups: the unit a merge method works on.

A group is one or more tensors ("segments") flattened and concatenated: the base
weights ``base`` of shape ``[N]`` and the K task vectors ``deltas`` of shape
``[K, N]``. Methods that need per-tensor statistics (magnitude thresholds, cosine
angles) compute them per segment, so merging a group of many tensors gives exactly
what merging each tensor on its own would give (up to the quantile-table
approximation for segments larger than ``table_size``, see ``MagnitudeTable``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

DEFAULT_TABLE_SIZE = 4096


class MagnitudeTable:
    """Per-segment, per-expert table of |delta| sorted in descending order.

    Built once per group and kept resident, it answers "what magnitude keeps the
    top ``density`` fraction of this tensor?" with one gather instead of a sort or
    kthvalue per candidate. Segments with at most ``table_size`` elements are stored
    exactly; larger ones are sampled at ``table_size`` evenly spaced ranks, so the
    number of kept elements is off by at most ``n / table_size``.
    """

    def __init__(self, deltas: Tensor, segments: tuple[int, ...], table_size: int = DEFAULT_TABLE_SIZE):
        k = deltas.shape[0]
        self.segments = segments
        self.table_size = table_size
        self.table = torch.empty(k, len(segments), table_size, dtype=torch.float32, device=deltas.device)
        self.scale: list[float] = []
        start = 0
        for s, n in enumerate(segments):
            sorted_desc = deltas[:, start : start + n].abs().float().sort(dim=1, descending=True).values
            scale = max(n, table_size) / table_size
            idx = (torch.arange(table_size, device=deltas.device, dtype=torch.float64) * scale).floor().long()
            self.table[:, s] = sorted_desc[:, idx.clamp(max=n - 1)]
            self.scale.append(scale)
            start += n
        self._scale_t = torch.tensor(self.scale, dtype=torch.float64, device=deltas.device)
        self._n_t = torch.tensor(segments, dtype=torch.float64, device=deltas.device)

    def threshold(self, density: Tensor) -> Tensor:
        """Magnitude thresholds ``[K, S]``: keep ``|delta| >= threshold`` to keep the
        top ``density[k]`` fraction of each segment (``+inf`` keeps nothing)."""
        keep = (density.double().clamp(0, 1)[:, None] * self._n_t[None, :]).round()  # [K, S]
        pos = ((keep - 1).clamp(min=0) / self._scale_t[None, :]).round().long().clamp(max=self.table_size - 1)
        thr = self.table.gather(2, pos.unsqueeze(-1)).squeeze(-1)
        return torch.where(keep >= 1, thr, torch.full_like(thr, float("inf")))

    def rank_fraction(self, deltas: Tensor) -> Tensor:
        """Magnitude rank of every element in its segment, in [0, 1] (1 = largest)."""
        out = torch.empty(deltas.shape, dtype=torch.float32, device=deltas.device)
        start = 0
        for s, n in enumerate(self.segments):
            length = min(n, self.table_size)
            ascending = self.table[:, s, :length].flip(-1).contiguous()
            mags = deltas[:, start : start + n].abs().float().contiguous()
            below = torch.searchsorted(ascending, mags, right=True).float()
            out[:, start : start + n] = (below - 1).clamp(min=0) / max(length - 1, 1)
            start += n
        return out


@dataclass
class DeltaGroup:
    """Base weights and task vectors of one merge unit, flattened.

    ``seed_offset`` makes random methods (DARE, DELLA) draw an independent, reproducible
    stream per unit, so the result does not depend on the order units are merged in.
    """

    base: Tensor  # [N]
    deltas: Tensor  # [K, N]
    segments: tuple[int, ...]
    seed_offset: int = 0
    table_size: int = DEFAULT_TABLE_SIZE
    _table: MagnitudeTable | None = field(default=None, repr=False)
    _segment_ids: Tensor | None = field(default=None, repr=False)

    @classmethod
    def from_tensors(cls, base: Tensor, experts: list[Tensor], **kwargs) -> "DeltaGroup":
        """One-tensor group from full weights (base and expert models), for direct use."""
        flat_base = base.reshape(-1)
        deltas = torch.stack([e.reshape(-1) - flat_base for e in experts])
        return cls(base=flat_base, deltas=deltas, segments=(flat_base.numel(),), **kwargs)

    @property
    def n_models(self) -> int:
        return self.deltas.shape[0]

    @property
    def magnitudes(self) -> MagnitudeTable:
        if self._table is None:
            self._table = MagnitudeTable(self.deltas, self.segments, self.table_size)
        return self._table

    def expand(self, per_segment: Tensor) -> Tensor:
        """Broadcast ``[..., S]`` per-segment values to ``[..., N]`` per element."""
        if len(self.segments) == 1:
            return per_segment[..., :1]
        if self._segment_ids is None:
            lengths = torch.tensor(self.segments, device=self.base.device)
            # int32 ids: half the bytes of int64 for the one gather per merge
            self._segment_ids = torch.repeat_interleave(torch.arange(len(self.segments), device=self.base.device, dtype=torch.int32), lengths)
        return per_segment[..., self._segment_ids]

    def compare(self, values: Tensor, per_segment: Tensor, op=torch.ge) -> Tensor:
        """``op(values, threshold of its segment)`` for ``[K, N]`` values and ``[K, S]``
        thresholds, one broadcast kernel per segment (cheaper than expanding to ``[K, N]``)."""
        out = torch.empty(values.shape, dtype=torch.bool, device=values.device)
        start = 0
        for s, n in enumerate(self.segments):
            op(values[..., start : start + n], per_segment[..., s : s + 1], out=out[..., start : start + n])
            start += n
        return out

    def segment_sum(self, values: Tensor) -> Tensor:
        """Sum ``[..., N]`` over each segment, giving ``[..., S]``."""
        return torch.stack([chunk.sum(-1) for chunk in values.split(list(self.segments), dim=-1)], dim=-1)

    def generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.base.device)
        gen.manual_seed((int(seed) * 1_000_003 + self.seed_offset) % (2**63))
        return gen
