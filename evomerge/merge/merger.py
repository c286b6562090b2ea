"""In-place merger: base weights and task vectors stay resident on the device, and each
recipe is written straight into the parameters of one live model.

Layout: every merge unit (embeddings, head, each layer's attention / MLP tensors) owns
three flat buffers -- ``base [N]``, ``deltas [K, N]`` and ``out [N]`` -- and the live
model's parameters are *views* into ``out``. Merging a unit writes ``out`` once, so the
model is updated with no copy, no re-instantiation and no disk I/O.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from evomerge.errors import MergeError
from evomerge.merge.groups import DEFAULT_TABLE_SIZE, DeltaGroup
from evomerge.merge.methods import apply_method
from evomerge.merge.recipe import Recipe, Unit
from evomerge.pool import InMemoryPool, ModelPool, available_bytes, layer_index, parameters_of

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks what accelerate picks (a GPU when present), else the CPU."""
    if device is None or str(device) == "auto":
        from accelerate import PartialState

        return PartialState().device
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MergeError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("device 'cuda' requested but no GPU is available")
    return dev


def unit_of(param_name: str) -> Unit:
    layer = layer_index(param_name)
    if layer is not None:
        return Unit("layers", layer, "mlp" if "mlp" in param_name.split(".") or ".mlp" in param_name else "attn")
    lowered = param_name.lower()
    if "embed" in lowered or lowered.split(".")[-2:-1] in (["wte"], ["wpe"]):
        return Unit("embed")
    return Unit("head")


@dataclass
class _UnitBuffers:
    unit: Unit
    group: DeltaGroup
    out: torch.Tensor
    host_deltas: torch.Tensor | None = None  # offloaded task vectors (pinned on CUDA hosts)


def estimate_bytes(n_params: int, n_experts: int, dtype: torch.dtype, offload: bool = False) -> tuple[int, int]:
    """(device bytes, host bytes) the merger keeps resident: base and output on the device,
    the K task vectors on the device (or, offloaded, on the host). DARE/DELLA add 2 bytes
    per task-vector entry on the device for their noise, DELLA 2 more for its ranks."""
    el = torch.empty((), dtype=dtype).element_size()
    vectors = n_experts * n_params * el
    return (2 * n_params * el + (0 if offload else vectors), vectors if offload else 0)


def check_fits(pool, device: torch.device, offload: bool = False) -> None:
    """Fail before loading anything when the resident buffers cannot fit (one line)."""
    n = pool.parameter_count() if hasattr(pool, "parameter_count") else None
    if not n:
        return
    k = len(pool.experts)
    dtype = getattr(pool, "dtype", torch.float32)
    need_dev, need_host = estimate_bytes(n, k, dtype, offload)
    checks = [(device, need_dev)] + ([(torch.device("cpu"), need_host)] if offload and device.type != "cpu" else [])
    if offload and device.type == "cpu":
        checks = [(device, need_dev + need_host)]
    for dev, need in checks:
        have = available_bytes(dev)
        if have is not None and need > have:
            what = "base, output" + ("" if offload and dev.type != "cpu" else f" and {k} task vectors")
            raise MergeError(
                f"merging needs {need / 2**30:.1f} GiB on {dev} ({what}; {n / 1e9:.2f}B parameters in "
                f"{str(dtype).replace('torch.', '')}) but {dev} has {have / 2**30:.1f} GiB free; "
                "use dtype=bfloat16, fewer experts or offload the task vectors"
            )


@dataclass
class MergeTiming:
    seconds: float
    units: int


class Merger:
    """Owns the live model and the resident base/task-vector buffers."""

    def __init__(
        self,
        pool: ModelPool | InMemoryPool,
        device: str | torch.device | None = "auto",
        table_size: int | None = DEFAULT_TABLE_SIZE,
        check_finite: bool = True,
        chunk_size: int | None | str = "auto",
        offload: bool = False,
        check_memory: bool = True,
    ):
        self.pool = pool
        self.device = resolve_device(device)
        self.check_finite = check_finite
        # offload: task vectors stay in host memory (pinned when the device is a GPU) and
        # stream through two device staging buffers, one unit ahead of the merge
        self.offload = offload
        if check_memory:
            check_fits(pool, self.device, offload)
        # bounded temporaries: element-wise methods run over pieces of this many elements
        # (smaller on CPU for cache locality; large on GPU, where launch overhead dominates)
        self.chunk_size = (1 << 18 if self.device.type == "cpu" else 1 << 26) if chunk_size == "auto" else chunk_size
        model, tokenizer = pool.load_base()
        self.model: nn.Module = model.to(self.device)
        self.tokenizer = tokenizer
        params = parameters_of(self.model)
        by_unit: dict[Unit, list[str]] = {}
        for name in params:
            by_unit.setdefault(unit_of(name), []).append(name)
        self.n_layers = 1 + max((u.layer for u in by_unit if u.layer is not None), default=-1)
        self._param_slices: dict[str, tuple[int, int, int]] = {}  # name -> (unit index, start, numel)
        self._units: list[_UnitBuffers] = []
        k = len(pool.experts)
        ordered = sorted(by_unit.items(), key=lambda kv: _unit_order(kv[0]))
        width = max(sum(params[n].numel() for n in names) for _, names in ordered)
        dtype = next(iter(params.values())).dtype
        pinned = offload and self.device.type == "cuda"
        self._staging = [torch.empty((k, width), dtype=dtype, device=self.device) for _ in range(2)] if offload else []
        for idx, (unit, names) in enumerate(ordered):
            sizes = tuple(params[n].numel() for n in names)
            base = torch.cat([params[n].detach().reshape(-1) for n in names])
            out = base.clone()
            start = 0
            for n, size in zip(names, sizes):
                params[n].data = out[start : start + size].view(params[n].shape)
                self._param_slices[n] = (idx, start, size)
                start += size
            host = None
            if offload:
                host = torch.empty((k, base.numel()), dtype=base.dtype, pin_memory=pinned)
                deltas = self._staging[idx % 2][:, : base.numel()]  # a unit always uses the same buffer
            else:
                deltas = torch.empty((k, base.numel()), dtype=base.dtype, device=self.device)
            group = DeltaGroup(base=base, deltas=deltas, segments=sizes, seed_offset=idx, table_size=table_size)
            group.shapes = tuple(tuple(params[n].shape) for n in names)  # per-matrix methods (svd.py)
            self._units.append(_UnitBuffers(unit, group, out, host))
        for i, expert_params in pool.iter_experts(self.model, tokenizer):
            for name, tensor in expert_params.items():
                u, start, size = self._param_slices[name]
                buf = self._units[u]
                delta = tensor.reshape(-1).to(self.device, buf.group.deltas.dtype) - buf.group.base[start : start + size]
                target = buf.host_deltas if buf.host_deltas is not None else buf.group.deltas
                target[i, start : start + size] = delta
        log.info("merger ready: %d units, %d experts, %s", len(self._units), k, self.device)

    @contextmanager
    def exact_thresholds(self) -> Iterator["Merger"]:
        """Within the block every "top d" mask is exact and chooses among tied magnitudes
        as mergekit does (``table_size=None``, see ``groups.py``): for the test re-score
        and exports of points the search found with the sampled table. The exact rank
        arrays (int32, per task-vector entry and order used) are freed on exit."""
        saved = [u.group.table_size for u in self._units]
        for u in self._units:
            u.group.table_size = None
        try:
            yield self
        finally:
            for u, size in zip(self._units, saved):
                u.group.table_size = size
                if size is not None:
                    u.group.drop_exact_ranks()

    def fingerprint(self) -> tuple[int, ...]:
        """Per-unit integer checksums of the merged weights' bits (equal weights, equal
        fingerprints): tells whether two merges of one recipe gave the same model."""
        sums = []
        for u in self._units:
            bits = u.out.view(torch.int16 if u.out.element_size() == 2 else torch.int32 if u.out.element_size() == 4 else torch.int64)
            wide = bits.to(torch.int64)
            mixed = wide * (torch.arange(wide.numel(), device=wide.device, dtype=torch.int64) % 65521 + 1)
            sums.append(int(wide.sum()) ^ (int(mixed.sum()) << 1))
        return tuple(sums)

    @property
    def units(self) -> list[Unit]:
        return [u.unit for u in self._units]

    @property
    def n_experts(self) -> int:
        return len(self.pool.experts)

    def layer_task_vector_norms(self):
        """(layers x experts) L2 norms of each expert's task vector per transformer layer
        (attention and MLP together): the statistics adaptive layer blocks are cut from."""
        import numpy as np

        out = np.zeros((self.n_layers, self.n_experts))
        for buffers in self._units:
            layer = buffers.unit.layer
            if layer is None:
                continue
            deltas = buffers.host_deltas if buffers.host_deltas is not None else buffers.group.deltas
            out[layer] += (deltas.double() ** 2).sum(dim=1).cpu().numpy()
        return np.sqrt(out)

    def resident_bytes(self) -> int:
        """Bytes of the merge buffers on the device (task vectors: staging only when offloaded)."""
        el = self._units[0].out.element_size()
        vectors = sum(s.numel() for s in self._staging) if self.offload else sum(u.group.deltas.numel() for u in self._units)
        return el * (vectors + sum(u.group.base.numel() + u.out.numel() for u in self._units))

    def host_bytes(self) -> int:
        """Bytes of offloaded task vectors in host memory (0 when resident)."""
        return sum(u.host_deltas.numel() * u.host_deltas.element_size() for u in self._units if u.host_deltas is not None)

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> MergeTiming:
        """Write the recipe's merged weights into the live model, in place."""
        plan = recipe.assign(self.units, self.n_experts)
        started = time.perf_counter()
        stream = _Prefetch(self._units, self.device) if self.offload else None
        sums: list[torch.Tensor] = []
        for idx, (buffers, (_, group)) in enumerate(zip(self._units, plan)):
            if stream is not None:
                stream.ready(idx)  # this unit's task vectors are in its staging buffer
            apply_method(group.method, buffers.group, group.params, out=buffers.out, chunk_size=self.chunk_size)
            if stream is not None:
                stream.done(idx)  # its staging buffer may be refilled for unit idx + 2
            if self.check_finite:
                sums.append(buffers.out.sum(dtype=torch.float32))
        if sums:
            self._raise_if_not_finite(sums)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MergeTiming(time.perf_counter() - started, len(plan))

    def _raise_if_not_finite(self, sums: list[torch.Tensor]) -> None:
        """MergeError naming the first unit whose merged weights hold a NaN or an inf.

        One sum per unit, checked together (one device sync, no bool copy of the weights): a
        sum is non-finite whenever an entry is; a sum that overflowed on finite weights is
        cleared by the exact check of that unit."""
        suspects = (~torch.isfinite(torch.stack(sums))).nonzero().flatten().tolist()
        for idx in suspects:
            unit = self._units[idx]
            if not bool(torch.isfinite(unit.out).all()):
                raise MergeError(f"merged weights of {unit.unit.name} are not finite (NaN or inf)")

    @torch.no_grad()
    def save(self, path: str | Path, recipe: Recipe | None = None) -> Path:
        """Write the live (merged) model as an HF folder loadable by ``from_pretrained``."""
        target = Path(path)
        target.mkdir(parents=True, exist_ok=True)
        # Parameters are views into shared buffers; safetensors needs separate storage.
        state = {k: v.detach().to("cpu").clone().contiguous() for k, v in self.model.state_dict().items()}
        self.model.save_pretrained(str(target), state_dict=state)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(target))
        if recipe is not None:
            recipe.save(target / "evomerge_recipe.yaml")
        return target


class _Prefetch:
    """Streams offloaded task vectors into two staging buffers, one unit ahead: on CUDA the
    copy of unit i + 1 runs on a side stream while unit i merges; on the CPU it is a copy."""

    def __init__(self, units: list[_UnitBuffers], device: torch.device):
        self.units = units
        self.cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if self.cuda else None
        self.copied: dict[int, object] = {}
        self.merged: dict[int, object] = {}
        self._copy(0)

    def _copy(self, idx: int) -> None:
        if idx >= len(self.units):
            return
        unit = self.units[idx]
        if not self.cuda:
            unit.group.deltas.copy_(unit.host_deltas)
            return
        with torch.cuda.stream(self.copy_stream):
            previous = self.merged.get(idx - 2)  # the last unit that used this buffer
            if previous is not None:
                self.copy_stream.wait_event(previous)
            unit.group.deltas.copy_(unit.host_deltas, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
            self.copied[idx] = event

    def ready(self, idx: int) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_event(self.copied.pop(idx))
        self._copy(idx + 1)

    def done(self, idx: int) -> None:
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream())
            self.merged[idx] = event


def _unit_order(unit: Unit) -> tuple[int, int, int]:
    part = {"embed": 0, "layers": 1, "head": 2}[unit.part]
    return (part, unit.layer or 0, 0 if unit.component in (None, "attn") else 1)
