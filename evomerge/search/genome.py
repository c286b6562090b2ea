"""Genome spaces: decode a real vector in [0, 1]^n into a merge recipe (pure, model-free).

Layout: the model is cut into groups -- embeddings, ``layer_groups`` contiguous ranges
of transformer layers (optionally split into attention and MLP tensors), and the head.
Each group owns the same block of genes:

- a method gene (only when there is more than one method to choose from), decoded as
  ``methods[floor(u * M)]`` so every real-valued pymoo algorithm can search it;
- one weight and one density gene per expert;
- one gene per searchable shared parameter of the candidate methods (``t``, ``gamma``,
  ``epsilon``; ``lambda`` when ``search_lambda``).

A gene that the decoded method does not use is ignored. ``n_var`` grows with the
number of groups, so a model-wise genome (the Sakana/Mergenetic setting) is
``layer_groups=1, separate_embed_head=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Group, Recipe

DEFAULT_RANGES = {"weight": (0.0, 1.0), "density": (0.1, 1.0), "lambda": (0.5, 1.5), "t": (0.0, 1.0), "gamma": (0.0, 0.1), "epsilon": (0.0, 0.2)}


@dataclass(frozen=True)
class GroupSlot:
    name: str
    part: str
    layers: tuple[int, int] | None = None
    component: str = "all"


@dataclass
class GenomeSpace:
    n_experts: int
    n_layers: int
    expert_names: Sequence[str] = ()
    methods: Sequence[str] = ("ties",)
    layer_groups: int = 1
    split_attn_mlp: bool = False
    separate_embed_head: bool = True
    search_lambda: bool = False
    ranges: dict[str, Sequence[float]] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ConfigError("the genome needs at least one expert")
        if not 1 <= self.layer_groups <= self.n_layers:
            raise ConfigError(f"genome.layer_groups must be between 1 and the model's {self.n_layers} layers, got {self.layer_groups}")
        if not self.methods:
            raise ConfigError("genome.methods must name at least one merge method")
        for m in self.methods:
            method = get_method(m)  # raises on unknown names
            try:
                method.validate({}, self.n_experts)
            except Exception as exc:
                raise ConfigError(f"genome method '{m}' cannot merge these {self.n_experts} experts: {exc}") from None
        unknown = set(self.ranges) - set(DEFAULT_RANGES)
        if unknown:
            raise ConfigError(f"genome.ranges has unknown parameter {sorted(unknown)[0]!r}; known: {', '.join(DEFAULT_RANGES)}")
        self._ranges = {k: tuple(float(x) for x in self.ranges.get(k, v)) for k, v in DEFAULT_RANGES.items()}
        for k, (lo, hi) in self._ranges.items():
            if not lo <= hi:
                raise ConfigError(f"genome.ranges.{k} must be [low, high] with low <= high, got {[lo, hi]}")
        self.names = list(self.expert_names) or [f"expert{i}" for i in range(self.n_experts)]
        self.slots = self._slots()
        self._shared = [p for p in ("t", "gamma", "epsilon") if any(_has_param(m, p) for m in self.methods)]
        if self.search_lambda:
            self._shared.append("lambda")
        self._uses_density = any(_has_param(m, "density") for m in self.methods)

    # ---- layout
    def _slots(self) -> list[GroupSlot]:
        slots: list[GroupSlot] = []
        bounds = [math.floor(i * self.n_layers / self.layer_groups) for i in range(self.layer_groups + 1)]
        ranges = [(bounds[i], bounds[i + 1] - 1) for i in range(self.layer_groups)]
        if self.separate_embed_head:
            slots.append(GroupSlot("embed", "embed"))
        for a, b in ranges:
            comps = ("attn", "mlp") if self.split_attn_mlp else ("all",)
            for c in comps:
                suffix = "" if c == "all" else f".{c}"
                slots.append(GroupSlot(f"layers.{a}-{b}{suffix}", "layers", (a, b), c))
        if self.separate_embed_head:
            slots.append(GroupSlot("head", "head"))
        return slots

    def genes_per_slot(self) -> list[str]:
        genes = ["method"] if len(self.methods) > 1 else []
        genes += [f"weight.{n}" for n in self.names]
        if self._uses_density:
            genes += [f"density.{n}" for n in self.names]
        return genes + list(self._shared)

    @property
    def gene_names(self) -> list[str]:
        return [f"{s.name}.{g}" for s in self.slots for g in self.genes_per_slot()]

    @property
    def n_var(self) -> int:
        return len(self.slots) * len(self.genes_per_slot())

    # ---- decoding
    def _scale(self, name: str, u: float) -> float:
        lo, hi = self._ranges[name]
        return lo + float(u) * (hi - lo)

    def decode(self, x: Sequence[float]) -> Recipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.n_var,):
            raise ConfigError(f"genome has {self.n_var} genes, got a vector of shape {x.shape}")
        per = self.genes_per_slot()
        groups: list[Group] = []
        for i, slot in enumerate(self.slots):
            genes = dict(zip(per, x[i * len(per) : (i + 1) * len(per)]))
            method = self.methods[min(int(genes["method"] * len(self.methods)), len(self.methods) - 1)] if "method" in genes else self.methods[0]
            spec = get_method(method)
            params: dict[str, Any] = {}
            for p in spec.params:
                if p.name == "weight":
                    params["weight"] = [round(self._scale("weight", genes[f"weight.{n}"]), 6) for n in self.names]
                elif p.name == "density":
                    params["density"] = [round(self._scale("density", genes[f"density.{n}"]), 6) for n in self.names]
                elif p.name in genes:
                    params[p.name] = round(self._scale(p.name, genes[p.name]), 6)
                elif p.name == "seed":
                    params["seed"] = int(self.seed)
            groups.append(Group(slot.name, slot.part, method, params, slot.layers, slot.component))  # type: ignore[arg-type]
        if not self.separate_embed_head:
            # embeddings and head follow the first / last layer group
            first, last = groups[0], groups[-1]
            groups.insert(0, Group("embed", "embed", first.method, dict(first.params)))
            groups.append(Group("head", "head", last.method, dict(last.params)))
        return Recipe(groups=groups, experts=list(self.names))

    def encode_reference(self, method: str, weights: Sequence[float], density: float = 1.0) -> np.ndarray | None:
        """The genome of a uniform recipe (used for marking experts), if representable."""
        if method not in self.methods:
            return None
        x = np.zeros(self.n_var)
        per = self.genes_per_slot()
        for i in range(len(self.slots)):
            block = {g: 0.5 for g in per}
            if "method" in block:
                block["method"] = (list(self.methods).index(method) + 0.5) / len(self.methods)
            for n, w in zip(self.names, weights):
                lo, hi = self._ranges["weight"]
                if not lo <= w <= hi:
                    return None
                block[f"weight.{n}"] = (w - lo) / (hi - lo) if hi > lo else 0.0
                if f"density.{n}" in block:
                    lo_d, hi_d = self._ranges["density"]
                    block[f"density.{n}"] = (density - lo_d) / (hi_d - lo_d) if hi_d > lo_d else 0.0
            x[i * len(per) : (i + 1) * len(per)] = [block[g] for g in per]
        return x

    def reference_genomes(self) -> np.ndarray:
        """Genomes that decode to the base and to each expert alone, where the space can
        express them (through task arithmetic, or TIES with density 1): a warm start."""
        method = next((m for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear") if m in self.methods), None)
        if method is None:
            return np.zeros((0, self.n_var))
        rows = []
        for i in range(-1, self.n_experts):
            weights = [1.0 if j == i else 0.0 for j in range(self.n_experts)]
            x = self.encode_reference(method, weights, density=1.0)
            if x is not None:
                rows.append(x)
        return np.array(rows) if rows else np.zeros((0, self.n_var))

    # ---- pymoo mixed-variable support
    def mixed_variables(self) -> dict[str, Any]:
        """pymoo ``vars`` for MixedVariableGA: method genes as Choice, the rest Real."""
        from pymoo.core.variable import Choice, Real

        out: dict[str, Any] = {}
        for name in self.gene_names:
            if name.endswith(".method"):
                out[name] = Choice(options=list(range(len(self.methods))))
            else:
                out[name] = Real(bounds=(0.0, 1.0))
        return out

    def from_mixed(self, values: dict[str, Any]) -> np.ndarray:
        """Vector form of a MixedVariableGA individual (method index -> bin centre)."""
        m = len(self.methods)
        return np.array(
            [(int(values[n]) + 0.5) / m if n.endswith(".method") else float(values[n]) for n in self.gene_names]
        )


def _has_param(method: str, name: str) -> bool:
    spec = get_method(method)
    return any(p.name == name and p.searchable for p in spec.params)
