"""Genome spaces: decode a real vector in [0, 1]^n into a merge recipe (pure, model-free).

Layout: the model is cut into groups -- embeddings, ``layer_groups`` contiguous ranges
of transformer layers (optionally split into attention and MLP tensors), and the head.
Each group owns the same block of genes:

- a method gene (only when there is more than one method to choose from), decoded as
  ``methods[floor(u * M)]`` so every real-valued pymoo algorithm can search it;
- one weight and one density gene per expert;
- one gene per searchable shared parameter of the candidate methods (``t``, ``gamma``,
  ``epsilon``, ``select_topk``, ``rank``, ``common``; ``lambda`` when ``search_lambda``);
- with ``lines``, two LiNeS genes ``lines_alpha`` and ``lines_beta``: the task-vector scale
  ``lambda`` of a layer at depth ``l / (L - 1)`` is multiplied by ``alpha + beta * depth``
  (Wang et al., ICLR 2025), so shallow layers can stay close to the base. Layer groups
  then decode into one recipe group per layer (embeddings at depth 0, head at depth 1);
  methods without a ``lambda`` parameter ignore the two genes.

A gene that the decoded method does not use is ignored. ``n_var`` grows with the
number of groups, so a model-wise genome (the Sakana/Mergenetic setting) is
``layer_groups=1, separate_embed_head=False``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from evomerge.errors import ConfigError
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Group, Recipe

DEFAULT_RANGES = {
    "weight": (0.0, 1.0), "density": (0.1, 1.0), "lambda": (0.5, 1.5), "t": (0.0, 1.0), "gamma": (0.0, 0.1), "epsilon": (0.0, 0.2),
    "select_topk": (0.1, 1.0), "rank": (0.1, 1.0), "common": (0.5, 1.0), "lines_alpha": (0.0, 1.0), "lines_beta": (0.0, 1.0),
}
# shared (one value per group) method parameters that get a gene, in gene order
SHARED_PARAMS = ("t", "gamma", "epsilon", "select_topk", "rank", "common")
LINES_GENES = ("lines_alpha", "lines_beta")


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
    lines: bool = False
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
        self._shared = [p for p in SHARED_PARAMS if any(_has_param(m, p) for m in self.methods)]
        if self.search_lambda:
            self._shared.append("lambda")
        self._uses_density = any(_has_param(m, "density") for m in self.methods)
        if self.lines and not any(_has_param(m, "lambda", searchable_only=False) for m in self.methods):
            raise ConfigError(f"genome.lines scales 'lambda', which none of {list(self.methods)} has")

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
        return genes + list(self._shared) + (list(LINES_GENES) if self.lines else [])

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
        lines: list[Callable[[float], dict[str, Any]] | None] = []
        for i, slot in enumerate(self.slots):
            genes = dict(zip(per, x[i * len(per) : (i + 1) * len(per)]))
            method = self.methods[min(int(genes["method"] * len(self.methods)), len(self.methods) - 1)] if "method" in genes else self.methods[0]
            spec = get_method(method)
            params: dict[str, Any] = {}
            for p in spec.params:
                if not p.searchable and p.name != "seed":
                    continue
                if p.name == "weight":
                    params["weight"] = [round(self._scale("weight", genes[f"weight.{n}"]), 6) for n in self.names]
                elif p.name == "density":
                    params["density"] = [round(self._scale("density", genes[f"density.{n}"]), 6) for n in self.names]
                elif p.name in genes:
                    params[p.name] = round(self._scale(p.name, genes[p.name]), 6)
                elif p.name == "seed":
                    params["seed"] = int(self.seed)
            line = self._lines_of(method, params, genes)
            if line is None:
                groups.append(Group(slot.name, slot.part, method, params, slot.layers, slot.component))  # type: ignore[arg-type]
            elif slot.part != "layers":
                groups.append(Group(slot.name, slot.part, method, line(0.0 if slot.part == "embed" else 1.0)))  # type: ignore[arg-type]
            else:
                assert slot.layers is not None
                suffix = "" if slot.component == "all" else f".{slot.component}"
                for layer in range(slot.layers[0], slot.layers[1] + 1):
                    groups.append(
                        Group(f"layers.{layer}{suffix}", "layers", method, line(self._depth(layer)), (layer, layer), slot.component)  # type: ignore[arg-type]
                    )
            lines.append(line)
        if not self.separate_embed_head:
            # embeddings and head follow the first / last layer group (at depth 0 / 1 with LiNeS)
            first, last = groups[0], groups[-1]
            groups.insert(0, Group("embed", "embed", first.method, lines[0](0.0) if lines[0] else dict(first.params)))
            groups.append(Group("head", "head", last.method, lines[-1](1.0) if lines[-1] else dict(last.params)))
        return Recipe(groups=groups, experts=list(self.names))

    # ---- LiNeS depth scaling
    def _depth(self, layer: int) -> float:
        return layer / (self.n_layers - 1) if self.n_layers > 1 else 0.0

    def _lines_of(self, method: str, params: dict[str, Any], genes: dict[str, float]) -> Callable[[float], dict[str, Any]] | None:
        """``depth -> params`` with ``lambda`` scaled by ``alpha + beta * depth`` (None: no LiNeS here)."""
        spec = get_method(method)
        if not self.lines or not any(p.name == "lambda" for p in spec.params):
            return None
        alpha, beta = self._scale("lines_alpha", genes["lines_alpha"]), self._scale("lines_beta", genes["lines_beta"])
        lam = spec.spec("lambda")
        base = float(params.get("lambda", lam.default))

        def at(depth: float) -> dict[str, Any]:
            return {**params, "lambda": round(min(max(base * (alpha + beta * depth), lam.low), lam.high), 6)}

        return at

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
            for gene, target in zip(LINES_GENES, (1.0, 0.0)):  # LiNeS off: scale 1 at every depth
                if gene in block:
                    lo, hi = self._ranges[gene]
                    if not lo <= target <= hi:
                        return None
                    block[gene] = (target - lo) / (hi - lo) if hi > lo else 0.0
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


def _has_param(method: str, name: str, searchable_only: bool = True) -> bool:
    spec = get_method(method)
    return any(p.name == name and (p.searchable or not searchable_only) for p in spec.params)
