"""Flat delta groups: the unit a merge method works on.

A group is one or more tensors ("segments") flattened and concatenated: the base
weights ``base`` of shape ``[N]`` and the K task vectors ``deltas`` of shape
``[K, N]``. Methods that need per-tensor statistics (magnitude thresholds, cosine
angles) compute them per segment, so merging a group of many tensors gives exactly
what merging each tensor on its own would give (up to the quantile-table
approximation for segments larger than ``table_size``, see ``MagnitudeTable``; keeping
everything or nothing is always exact).

"Keep the top c entries" always keeps exactly c entries (up to the table's sampling):
entries tied in magnitude are ordered by a deterministic tie-break, so bfloat16 task
vectors, with few distinct magnitudes, keep ``floor(d * n)`` like float32 ones. Two orders:

- sampled table (``table_size`` an int, the search's default): ties in index order (lower
  index first), as a stable sort would; a threshold is a pair (magnitude, index cut).
- exact (``table_size=None``): each entry's rank in the very permutation mergekit 0.1.5
  computes (``torch.argsort(|tv|, descending=True)`` for TIES, the ascending
  ``torch.sort`` for breadcrumbs), so exports reproduce mergekit's choice among ties
  bit for bit (on the CPU, same torch build). Costs one int32 rank per task-vector entry
  and order while a group is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

# exact thresholds by default: the merge a search scores is the one exports write (issue 35);
# a sampled magnitude table of this many ranks per tensor is what runs made before 2026-12-07
# used when their config named no table size
DEFAULT_TABLE_SIZE: int | None = None
LEGACY_TABLE_SIZE = 4096


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
    """Per-segment, per-expert table of |delta| sorted in descending order (ties by
    index, lower first), with the index of the entry at each slot.

    Built once per group and kept resident, it answers "which (magnitude, index) pair
    keeps the top ``c`` entries of this tensor?" with one gather instead of a sort per
    candidate. Segments with at most ``table_size`` elements are stored exactly; larger
    ones are sampled at ``table_size`` evenly spaced ranks, so for 0 < c < n the number of
    kept elements is off by at most ``n / table_size`` (ties included). Keeping all
    (``c >= n``) or none (``c <= 0``) is always exact. ``table_size=None`` stores every
    segment (exact groups use ``DeltaGroup.order_ranks`` instead).
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
        # float64 task vectors keep float64 magnitudes (ties are compared exactly)
        value_dtype = torch.float64 if deltas.dtype == torch.float64 else torch.float32
        self.table = torch.empty(k, sum(lengths), dtype=value_dtype, device=deltas.device)
        self.index = torch.empty(k, sum(lengths), dtype=torch.int64, device=deltas.device)  # unit-wide index
        self.scale: list[float] = []
        start = 0
        for s, n in enumerate(segments):
            ordered = deltas[:, start : start + n].abs().to(value_dtype).sort(dim=1, descending=True, stable=True)
            length = lengths[s]
            scale = n / length if length else 1.0
            cols = slice(self.offsets[s], self.offsets[s] + length)
            if length == n:
                self.table[:, cols] = ordered.values
                self.index[:, cols] = ordered.indices + start
            else:
                idx = (torch.arange(length, device=deltas.device, dtype=torch.float64) * scale).floor().long().clamp(max=n - 1)
                self.table[:, cols] = ordered.values[:, idx]
                self.index[:, cols] = ordered.indices[:, idx] + start
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

    def cutoff_for(self, counts: Tensor) -> tuple[Tensor, Tensor]:
        """``(threshold, cut)`` ``[K, S]``: an entry at unit index ``i`` is among the
        ``counts`` largest of its tensor iff ``|delta| > threshold`` or ``|delta| ==
        threshold and i < cut`` (``-inf`` keeps all, ``+inf`` none)."""
        pos = ((counts - 1).clamp(min=0) / self._scale_t[None, :]).round().long()
        pos = torch.minimum(pos, (self._len_t - 1).clamp(min=0)[None, :]) + self._off_t[None, :]
        thr = self.table.gather(1, pos)
        cut = self.index.gather(1, pos) + 1
        none, every = counts < 1, counts >= self._n_t[None, :]
        thr = torch.where(none, torch.full_like(thr, float("inf")), thr)
        thr = torch.where(every, torch.full_like(thr, float("-inf")), thr)
        return thr, torch.where(none | every, torch.zeros_like(cut), cut)

    def threshold_for(self, counts: Tensor) -> Tensor:
        """Magnitude thresholds ``[K, S]`` of ``cutoff_for`` (without the tie cut,
        ``|delta| >= threshold`` keeps every entry tied with the last one)."""
        return self.cutoff_for(counts)[0]

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
        if self._parent is not None:
            return self._parent.magnitudes  # chunks: the whole tensors' table
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
        return keep_counts(density, self.sizes())

    def sizes(self) -> Tensor:
        """``[S]`` element counts (float64) of the whole tensors our segments belong to."""
        root = self._parent if self._parent is not None else self
        whole = torch.tensor(root.segments, dtype=torch.float64, device=self.deltas.device)
        return whole if self._parent is None else whole[list(self._index())]

    def thresholds_for(self, counts: Tensor) -> Tensor:
        """``[K, S]`` thresholds keeping the ``counts`` largest entries of each whole tensor;
        ``counts`` is indexed like ``counts()`` (by our segments)."""
        return self.cutoffs_for(counts)[0]

    def cutoffs_for(self, counts: Tensor) -> tuple[Tensor, Tensor]:
        """``(threshold [K, S] in the deltas' dtype, cut [K, S] int64)`` keeping exactly the
        ``counts`` largest entries of each whole tensor (``MagnitudeTable.cutoff_for``)."""
        table = self.magnitudes
        if self._table_index is None:
            thr, cut = table.cutoff_for(counts)
            return thr.to(self.deltas.dtype), cut
        full = torch.zeros((counts.shape[0], len(table.segments)), dtype=counts.dtype, device=counts.device)
        full[:, list(self._table_index)] = counts
        thr, cut = table.cutoff_for(full)
        return self._local(thr), self._local(cut, cast=False)

    # ---- exact "top c" masks (both orders), see the module docstring

    @property
    def exact(self) -> bool:
        """True when "top c" masks follow mergekit's own sort (``table_size=None``)."""
        root = self._parent if self._parent is not None else self
        return root.table_size is None

    def order_ranks(self, order: str) -> Tensor:
        """``[K, N]`` int32 position of every entry in mergekit's sort of its tensor's
        magnitudes: ``"desc"`` = ``argsort(|tv|, descending=True)`` (TIES' top k),
        ``"asc"`` = ``sort(|tv|).indices`` (breadcrumbs). Computed once per unit and kept
        while the group is exact; chunks slice the unit's ranks."""
        if self._parent is not None:
            a, b = self._span
            return self._parent.order_ranks(order)[:, a:b]
        cache = self.__dict__.setdefault("_order_ranks", {})
        if order not in cache:
            ranks = torch.empty(self.deltas.shape, dtype=torch.int32, device=self.deltas.device)
            start = 0
            for n in self.segments:
                positions = torch.arange(n, dtype=torch.int32, device=ranks.device)
                for k in range(self.n_models):
                    w = self.deltas[k, start : start + n].abs()
                    w = w.float() if w.device.type == "cpu" else w  # as mergekit does
                    perm = torch.argsort(w, descending=True) if order == "desc" else torch.sort(w, descending=False).indices
                    ranks[k, start : start + n][perm] = positions
                start += n
            cache[order] = ranks
        return cache[order]

    def drop_exact_ranks(self) -> None:
        """Free the rank arrays of ``order_ranks`` (they are rebuilt on demand)."""
        self.__dict__.pop("_order_ranks", None)

    def top_mask(self, counts: Tensor) -> Tensor:
        """``[K, N]`` bool: the ``counts[k, s]`` largest-magnitude entries of each tensor,
        exactly that many (ties broken as described in the module docstring)."""
        if self.exact:
            return self.rank_between(self.order_ranks("desc"), torch.zeros_like(counts), counts)
        return self.above_cutoff(*self.cutoffs_for(counts))

    def band_mask(self, top: Tensor, target: Tensor) -> Tensor:
        """``[K, N]`` bool: drop the ``top`` largest entries, keep the next ``target``
        (breadcrumbs); mergekit's ascending order when exact."""
        if self.exact:
            n = self.sizes()[None, :]
            return self.rank_between(self.order_ranks("asc"), n - top - target, n - top)
        return self.above_cutoff(*self.cutoffs_for(top + target)) & ~self.above_cutoff(*self.cutoffs_for(top))

    def above_cutoff(self, thr: Tensor, cut: Tensor) -> Tensor:
        """``|delta| > thr or (|delta| == thr and unit index < cut)`` per segment."""
        out = torch.empty(self.deltas.shape, dtype=torch.bool, device=self.deltas.device)
        start = 0
        for s, n in enumerate(self.segments):
            mags = self.deltas[:, start : start + n].abs()
            t = thr[:, s : s + 1]
            first = self._span[0] + start
            index = torch.arange(first, first + n, device=mags.device)
            torch.gt(mags, t, out=out[:, start : start + n])
            out[:, start : start + n] |= (mags == t) & (index[None, :] < cut[:, s : s + 1])
            start += n
        return out

    def rank_between(self, ranks: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
        """``lo[k, s] <= ranks < hi[k, s]`` per segment (``[K, S]`` bounds, any numeric dtype)."""
        out = torch.empty(ranks.shape, dtype=torch.bool, device=ranks.device)
        lo, hi = lo.to(torch.int64), hi.to(torch.int64)
        start = 0
        for s, n in enumerate(self.segments):
            r = ranks[:, start : start + n]
            out[:, start : start + n] = (r >= lo[:, s : s + 1]) & (r < hi[:, s : s + 1])
            start += n
        return out

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
            # no magnitude table here: chunks ask the parent for it (``magnitudes``), so it is
            # built on the first threshold a method needs, never for methods without one
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
