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

    def rank_fraction(self, values: Tensor, segment: int) -> Tensor:
        """Magnitude rank of ``values`` (``[K, n]``, part of ``segment``) in [0, 1] (1 = largest)."""
        length = min(self.segments[segment], self.table_size)
        ascending = self.table[:, segment, :length].flip(-1).contiguous()
        below = torch.searchsorted(ascending, values.abs().float().contiguous(), right=True).float()
        return (below - 1).clamp(min=0) / max(length - 1, 1)


@dataclass
class DeltaGroup:
    """Base weights and task vectors of one merge unit, flattened.

    ``seed_offset`` makes random methods (DARE, DELLA) draw an independent, reproducible
    stream per unit, so the result does not depend on the order units are merged in.
    A group can be cut into chunks (``chunks``) that share the parent's per-tensor
    magnitude table, so element-wise methods can run chunk by chunk in cache-sized pieces.
    """

    base: Tensor  # [N]
    deltas: Tensor  # [K, N]
    segments: tuple[int, ...]
    seed_offset: int = 0
    table_size: int = DEFAULT_TABLE_SIZE
    _table: MagnitudeTable | None = field(default=None, repr=False)
    _segment_ids: Tensor | None = field(default=None, repr=False)
    # for chunks: which segment of the parent table each of our segments belongs to
    _table_index: tuple[int, ...] | None = field(default=None, repr=False)
    _chunk_cache: dict = field(default_factory=dict, repr=False)

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
    def numel(self) -> int:
        return self.base.numel()

    @property
    def magnitudes(self) -> MagnitudeTable:
        if self._table is None:
            self._table = MagnitudeTable(self.deltas, self.segments, self.table_size)
        return self._table

    def _index(self) -> tuple[int, ...]:
        return self._table_index if self._table_index is not None else tuple(range(len(self.segments)))

    def thresholds(self, density: Tensor) -> Tensor:
        """``[K, S]`` magnitude thresholds keeping the top ``density`` of each tensor."""
        thr = self.magnitudes.threshold(density)
        if self._table_index is not None:
            thr = thr[:, list(self._table_index)]
        return thr.to(self.deltas.dtype)

    def rank_fraction(self) -> Tensor:
        """Per-element magnitude rank within its tensor, in [0, 1] (1 = largest)."""
        out = torch.empty(self.deltas.shape, dtype=torch.float32, device=self.deltas.device)
        start = 0
        for n, parent in zip(self.segments, self._index()):
            out[:, start : start + n] = self.magnitudes.rank_fraction(self.deltas[:, start : start + n], parent)
            start += n
        return out

    def chunks(self, size: int) -> list[tuple[int, int, "DeltaGroup"]]:
        """Views of at most ``size`` elements; magnitude statistics stay per whole tensor."""
        if size not in self._chunk_cache:
            table = self.magnitudes  # build once on the full group
            bounds, start = [], 0
            for n in self.segments:
                bounds.append((start, start + n))
                start += n
            out = []
            for i, a in enumerate(range(0, self.numel, size)):
                b = min(a + size, self.numel)
                pieces = [(min(e, b) - max(s, a), j) for j, (s, e) in enumerate(bounds) if s < b and e > a]
                sub = DeltaGroup(
                    base=self.base[a:b],
                    deltas=self.deltas[:, a:b],
                    segments=tuple(n for n, _ in pieces),
                    seed_offset=self.seed_offset * 1_000_003 + i,
                    table_size=self.table_size,
                    _table=table,
                    _table_index=tuple(self._index()[j] for _, j in pieces),
                )
                out.append((a, b, sub))
            self._chunk_cache[size] = out
        return self._chunk_cache[size]

    def expand(self, per_segment: Tensor) -> Tensor:
        """Broadcast ``[..., S]`` per-segment values to ``[..., N]`` per element."""
        if len(self.segments) == 1:
            return per_segment[..., :1]
        if self._segment_ids is None:
            lengths = torch.tensor(self.segments, device=self.base.device)
            self._segment_ids = torch.repeat_interleave(torch.arange(len(self.segments), device=self.base.device), lengths)
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
