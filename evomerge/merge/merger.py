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
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from evomerge.errors import MergeError
from evomerge.merge.groups import DEFAULT_TABLE_SIZE, DeltaGroup
from evomerge.merge.methods import apply_method
from evomerge.merge.recipe import Recipe, Unit
from evomerge.pool import InMemoryPool, ModelPool, layer_index, parameters_of

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
        table_size: int = DEFAULT_TABLE_SIZE,
        check_finite: bool = True,
        chunk_size: int | None | str = "auto",
    ):
        self.pool = pool
        self.device = resolve_device(device)
        self.check_finite = check_finite
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
        for idx, (unit, names) in enumerate(sorted(by_unit.items(), key=lambda kv: _unit_order(kv[0]))):
            sizes = tuple(params[n].numel() for n in names)
            base = torch.cat([params[n].detach().reshape(-1) for n in names])
            out = base.clone()
            start = 0
            for n, size in zip(names, sizes):
                params[n].data = out[start : start + size].view(params[n].shape)
                self._param_slices[n] = (idx, start, size)
                start += size
            deltas = torch.empty((k, base.numel()), dtype=base.dtype, device=self.device)
            group = DeltaGroup(base=base, deltas=deltas, segments=sizes, seed_offset=idx, table_size=table_size)
            group.shapes = tuple(tuple(params[n].shape) for n in names)  # per-matrix methods (svd.py)
            self._units.append(_UnitBuffers(unit, group, out))
        for i, expert_params in pool.iter_experts(self.model, tokenizer):
            for name, tensor in expert_params.items():
                u, start, size = self._param_slices[name]
                buf = self._units[u].group
                buf.deltas[i, start : start + size] = tensor.reshape(-1).to(self.device, buf.deltas.dtype) - buf.base[start : start + size]
        log.info("merger ready: %d units, %d experts, %s", len(self._units), k, self.device)

    @property
    def units(self) -> list[Unit]:
        return [u.unit for u in self._units]

    @property
    def n_experts(self) -> int:
        return len(self.pool.experts)

    def resident_bytes(self) -> int:
        return sum(
            (u.group.base.numel() + u.group.deltas.numel() + u.out.numel()) * u.out.element_size() for u in self._units
        )

    @torch.no_grad()
    def apply(self, recipe: Recipe) -> MergeTiming:
        """Write the recipe's merged weights into the live model, in place."""
        plan = recipe.assign(self.units, self.n_experts)
        started = time.perf_counter()
        for buffers, (_, group) in zip(self._units, plan):
            apply_method(group.method, buffers.group, group.params, out=buffers.out, chunk_size=self.chunk_size)
            if self.check_finite and not bool(torch.isfinite(buffers.out).all()):
                raise MergeError(f"merged weights of {buffers.unit.name} are not finite (NaN or inf)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return MergeTiming(time.perf_counter() - started, len(plan))

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


def _unit_order(unit: Unit) -> tuple[int, int, int]:
    part = {"embed": 0, "layers": 1, "head": 2}[unit.part]
    return (part, unit.layer or 0, 0 if unit.component in (None, "attn") else 1)
