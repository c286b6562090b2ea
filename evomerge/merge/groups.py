"""Flat delta groups: the unit a merge method works on.

A group is one or more tensors ("segments") flattened and concatenated: the base
weights ``base`` of shape ``[N]`` and the K task vectors ``deltas`` of shape
``[K, N]``. Methods that need per-tensor statistics (magnitude thresholds, cosine
angles) compute them per segment, so merging a group of many tensors gives exactly
what merging each tensor on its own would give (up to the quantile-table
approximation for segments larger than ``table_size``, see ``MagnitudeTable``; keeping
everything or nothing is always exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

DEFAULT_TABLE_SIZE = 4096


def keep_counts(density: Tensor, sizes: Tensor) -> Tensor:
    """How many entries a ``density`` keeps: ``[K]`` densities x ``[S]`` sizes -> ``[K, S]``.

    The convention is mergekit's: ``floor(d * n)``, at least one entry when ``d > 0``, none
    when ``d <= 0`` and all ``n`` when ``d >= 1`` (exactly). Computed in float64 so a
    density given as a decimal (0.7) counts like Python's ``int(0.7 * n)``.
    """
    d = density.double()[:, None]
    n = sizes.double()[None, :]
    counts = (d * n).floor().clamp(min=1)
    counts = torch.where(d <= 0, torch.zeros_like(counts), counts)
    return torch.where(d >= 1, n.expand_as(counts), torch.minimum(counts, n))


class MagnitudeTable:
    """Per-segment, per-expert table of |delta| sorted in descending order.

    Built once per group and kept resident, it answers "what magnitude keeps the
    top ``c`` entries of this tensor?" with one gather instead of a sort or kthvalue per
    candidate. Segments with at most ``table_size`` elements are stored exactly; larger
    ones are sampled at ``table_size`` evenly spaced ranks, so for 0 < c < n the number of
    kept elements is off by at most ``n / table_size``. Keeping all (``c >= n``) or none
    (``c <= 0``) is always exact. ``table_size=None`` stores every segment exactly
    (one float32 copy of the task vectors; bit-for-bit parity with mergekit on any size).
    """

    def __init__(self, deltas: Tensor, segments: tuple[int, ...], table_size: int | None = DEFAULT_TABLE_SIZE):
        k = deltas.shape[0]
        self.segments = segments
        self.table_size = table_size
        lengths = [n if table_size is None else min(n, table_size) for n in segments]
        # ragged rows: segment s occupies columns [offset_s, offset_s + length_s)
        self.lengths = lengths
        self.offsets = [0]
        for n in lengths[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.table = torch.empty(k, sum(lengths), dtype=torch.float32, device=deltas.device)
        self.scale: list[float] = []
        start = 0
        for s, n in enumerate(segments):
            sorted_desc = deltas[:, start : start + n].abs().float().sort(dim=1, descending=True).values
            length = lengths[s]
            scale = n / length if length else 1.0
            if length == n:
                self.table[:, self.offsets[s] : self.offsets[s] + n] = sorted_desc
            else:
                idx = (torch.arange(length, device=deltas.device, dtype=torch.float64) * scale).floor().long()
                self.table[:, self.offsets[s] : self.offsets[s] + length] = sorted_desc[:, idx.clamp(max=n - 1)]
            self.scale.append(scale)
            start += n
        dev = deltas.device
        self._scale_t = torch.tensor(self.scale, dtype=torch.float64, device=dev)
        self._n_t = torch.tensor(segments, dtype=torch.float64, device=dev)
        self._len_t = torch.tensor(lengths, dtype=torch.long, device=dev)
        self._off_t = torch.tensor(self.offsets, dtype=torch.long, device=dev)

    @property
    def sizes(self) -> Tensor:
        return self._n_t

    def counts(self, density: Tensor) -> Tensor:
        """``[K, S]`` number of entries ``density`` keeps per segment (see ``keep_counts``)."""
        return keep_counts(density, self._n_t)

    def threshold_for(self, counts: Tensor) -> Tensor:
        """Magnitude thresholds ``[K, S]``: ``|delta| >= threshold`` keeps the ``counts``
        largest entries (``-inf`` keeps all, ``+inf`` none)."""
        pos = ((counts - 1).clamp(min=0) / self._scale_t[None, :]).round().long()
        pos = torch.minimum(pos, (self._len_t - 1).clamp(min=0)[None, :]) + self._off_t[None, :]
        thr = self.table.gather(1, pos)
        thr = torch.where(counts >= 1, thr, torch.full_like(thr, float("inf")))
        return torch.where(counts >= self._n_t[None, :], torch.full_like(thr, float("-inf")), thr)

    def threshold(self, density: Tensor) -> Tensor:
        """Thresholds keeping the top ``density[k]`` fraction of each segment."""
        return self.threshold_for(self.counts(density))

    def rank_fraction(self, values: Tensor, segment: int) -> Tensor:
        """Magnitude rank of ``values`` (``[K, n]``, part of ``segment``) in [0, 1] (1 = largest)."""
        length = self.lengths[segment]
        off = self.offsets[segment]
        ascending = self.table[:, off : off + length].flip(-1).contiguous()
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
    table_size: int | None = DEFAULT_TABLE_SIZE
    _table: MagnitudeTable | None = field(default=None, repr=False)
    _segment_ids: Tensor | None = field(default=None, repr=False)
    # for chunks: which segment of the parent table each of our segments belongs to
    _table_index: tuple[int, ...] | None = field(default=None, repr=False)
    _chunk_cache: dict = field(default_factory=dict, repr=False)
    # for chunks: the whole unit and our [a, b) span in it (noise and ranks live there)
    _parent: "DeltaGroup | None" = field(default=None, repr=False)
    _span: tuple[int, int] = (0, 0)
    _noise: tuple[int, Tensor] | None = field(default=None, repr=False)
    _ranks: Tensor | None = field(default=None, repr=False)
    _stats: dict = field(default_factory=dict, repr=False)

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
        """``[K, S]`` magnitude thresholds keeping the top ``density`` of each tensor
        (``keep_counts`` convention; density >= 1 keeps everything, exactly)."""
        return self._local(self.magnitudes.threshold(density))

    def counts(self, density: Tensor) -> Tensor:
        """``[K, S]`` kept-entry counts per whole tensor (for chunks: of the parent tensor)."""
        return self._local(self.magnitudes.counts(density), cast=False)

    def sizes(self) -> Tensor:
        """``[S]`` element counts of the whole tensors our segments belong to."""
        return self._local(self.magnitudes.sizes[None, :], cast=False)[0]

    def thresholds_for(self, counts: Tensor) -> Tensor:
        """``[K, S]`` thresholds keeping the ``counts`` largest entries of each whole tensor;
        ``counts`` is indexed like ``counts()`` (by our segments)."""
        table = self.magnitudes
        if self._table_index is None:
            return table.threshold_for(counts).to(self.deltas.dtype)
        full = torch.zeros((counts.shape[0], len(table.segments)), dtype=counts.dtype, device=counts.device)
        full[:, list(self._table_index)] = counts
        return self._local(table.threshold_for(full))

    def _local(self, per_parent: Tensor, cast: bool = True) -> Tensor:
        out = per_parent if self._table_index is None else per_parent[:, list(self._table_index)]
        return out.to(self.deltas.dtype) if cast else out

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
                    _parent=self,
                    _span=(a, b),
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

    def noise(self, seed: int) -> Tensor:
        """``[K, N]`` int16 uniform noise levels (-32768..32767; ``u = (level + 32768) / 65536``)
        for random drops ("common random numbers"): drawn once per unit and seed on the CPU,
        kept resident, and sliced by chunks -- so masks do not depend on the chunk size or
        the device, and candidates differing only in density share their draws."""
        if self._parent is not None:
            a, b = self._span
            return self._parent.noise(seed)[:, a:b]
        if self._noise is None or self._noise[0] != int(seed):
            self._noise = None  # free the previous seed's noise first
            gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + self.seed_offset) % (2**63))
            levels = torch.randint(-32768, 32768, tuple(self.deltas.shape), generator=gen, dtype=torch.int16)
            self._noise = (int(seed), levels.to(self.deltas.device))
        return self._noise[1]

    def ranks(self) -> Tensor:
        """``[K, N]`` int16 magnitude rank of each entry within its tensor, quantised:
        ``rank = (level + 32768) / 65535`` in [0, 1] (1 = largest). Computed once (a sort
        per tensor) and kept resident; chunks slice the unit's ranks."""
        if self._parent is not None:
            a, b = self._span
            return self._parent.ranks()[:, a:b]
        if self._ranks is None:
            out = torch.empty(self.deltas.shape, dtype=torch.int16, device=self.deltas.device)
            start = 0
            for n in self.segments:
                order = self.deltas[:, start : start + n].abs().float().argsort(dim=1)
                frac = torch.arange(n, device=order.device, dtype=torch.float64) / max(n - 1, 1)
                levels = (frac * 65535).round().sub(32768).to(torch.int16).expand(order.shape[0], n)
                out[:, start : start + n].scatter_(1, order, levels)
                start += n
            self._ranks = out
        return self._ranks

    def cached(self, key: str, compute):
        """Genome-independent per-unit statistics (SLERP angles, Model Stock factors),
        computed on first use and reused by every later candidate."""
        if key not in self._stats:
            self._stats[key] = compute()
        return self._stats[key]

    def generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.base.device)
        gen.manual_seed((int(seed) * 1_000_003 + self.seed_offset) % (2**63))
        return gen
