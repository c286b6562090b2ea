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

# Hand-made baselines every default search starts from (issue 8): uniform task
# arithmetic at these global weights, and TIES as users run it (all weights 1, half of
# each task vector kept, disjoint mean).
HAND_MADE_TA_WEIGHTS = (0.3, 0.5, 0.7, 1.0)
TIES_DEFAULT = {"density": 0.5, "lambda": 1.0}

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
    # explicit contiguous layer blocks (inclusive ranges covering every layer), e.g. the
    # adaptive blocks of evomerge.search.blocks; None: ``layer_groups`` equal blocks
    layer_ranges: Sequence[tuple[int, int]] | None = None

    def __post_init__(self) -> None:
        if self.n_experts < 1:
            raise ConfigError("the genome needs at least one expert")
        if self.layer_ranges is not None:
            self.layer_ranges = [(int(a), int(b)) for a, b in self.layer_ranges]
            edges = [a for a, _ in self.layer_ranges] + [self.layer_ranges[-1][1] + 1] if self.layer_ranges else []
            if not edges or edges[0] != 0 or edges[-1] != self.n_layers or any(a > b for a, b in self.layer_ranges) or any(
                self.layer_ranges[i][1] + 1 != self.layer_ranges[i + 1][0] for i in range(len(self.layer_ranges) - 1)
            ):
                raise ConfigError(f"genome.layer_ranges must be contiguous [first, last] blocks covering layers 0-{self.n_layers - 1}, got {self.layer_ranges}")
            self.layer_groups = len(self.layer_ranges)
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
        if self.layer_ranges is not None:
            ranges = list(self.layer_ranges)
        else:
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

    def encode_uniform(self, method: str, params: dict[str, Any]) -> np.ndarray | None:
        """The genome whose every group decodes to ``method`` with ``params`` (per-expert
        ``weight``/``density`` lists, shared values such as ``lambda``), or None when the
        space cannot express that recipe exactly (method not searched, value out of range)."""
        if method not in self.methods:
            return None
        spec = get_method(method)
        try:
            values = spec.validate(params, self.n_experts)
        except Exception:
            return None
        per = self.genes_per_slot()
        block: dict[str, float] = {}
        for g in per:
            if g == "method":
                block[g] = (list(self.methods).index(method) + 0.5) / len(self.methods)
                continue
            name, _, expert = g.partition(".")
            if expert:  # weight.<expert> / density.<expert>
                value = values.get(name, 1.0 if name == "density" else None)
                value = value[self.names.index(expert)] if isinstance(value, list) else value
            elif name in LINES_GENES:  # LiNeS off: scale 1 at every depth (alpha 1, beta 0)
                value = 1.0 if name == "lines_alpha" else 0.0
            else:
                value = values.get(name)
                if value is None:  # a gene this method ignores: any in-range value will do
                    lo, hi = self._ranges[name]
                    value = min(max(1.0 if name == "lambda" else (lo + hi) / 2, lo), hi)
            if value is None:
                return None
            lo, hi = self._ranges[name]
            if not lo - 1e-12 <= float(value) <= hi + 1e-12:
                return None
            block[g] = (float(value) - lo) / (hi - lo) if hi > lo else 0.0
        x = np.tile([block[g] for g in per], len(self.slots))
        if not self._decodes_to(x, method, values):
            return None
        return x

    def _decodes_to(self, x: np.ndarray, method: str, values: dict[str, Any]) -> bool:
        for group in self.decode(x).groups:
            if group.method != method:
                return False
            for name, value in group.params.items():
                want = values.get(name)
                if name == "seed" or want is None:
                    continue
                got = np.asarray(value, dtype=float)
                if got.shape != np.shape(want) or not np.allclose(got, want, atol=1e-5):
                    return False
        return True

    def encode_reference(self, method: str, weights: Sequence[float], density: float = 1.0) -> np.ndarray | None:
        """The genome of a uniform recipe with these weights (and density), if representable."""
        params: dict[str, Any] = {"weight": list(weights)}
        if _has_param(method, "density"):
            params["density"] = [density] * self.n_experts
        return self.encode_uniform(method, params)

    def hand_made_genomes(self, ta_weights: Sequence[float] = HAND_MADE_TA_WEIGHTS) -> dict[str, np.ndarray]:
        """The merges a user would try by hand, expressed in this genome: the base, each
        expert alone, uniform task arithmetic at a few global weights and TIES with its
        usual settings. A search seeded with them can never start below them. Recipes
        the space cannot express exactly are left out (see ``encode_uniform``)."""
        k = self.n_experts
        wanted: list[tuple[str, list[tuple[str, dict[str, Any]]]]] = []
        # exact task arithmetic through whichever method expresses it
        def ta(weights: list[float]) -> list[tuple[str, dict[str, Any]]]:
            return [
                ("task_arithmetic", {"weight": weights}),
                ("dare_linear", {"weight": weights, "density": [1.0] * k}),
                ("ties", {"weight": weights, "density": [1.0] * k}) if sum(w != 0 for w in weights) <= 1 else ("", {}),
                ("dare_ties", {"weight": weights, "density": [1.0] * k}) if sum(w != 0 for w in weights) <= 1 else ("", {}),
            ]

        wanted.append(("base", ta([0.0] * k)))
        for i, name in enumerate(self.names):
            wanted.append((f"expert:{name}", ta([1.0 if j == i else 0.0 for j in range(k)])))
        for w in ta_weights:
            wanted.append((f"task_arithmetic:{w:g}", ta([float(w)] * k)))
        wanted.append(("ties:default", [("ties", dict(TIES_DEFAULT, weight=[1.0] * k, density=[TIES_DEFAULT["density"]] * k))]))
        out: dict[str, np.ndarray] = {}
        seen: set[bytes] = set()
        for label, options in wanted:
            for method, params in options:
                x = self.encode_uniform(method, params) if method else None
                if x is not None and x.tobytes() not in seen:
                    seen.add(x.tobytes())
                    out[label] = x
                    break
        return out

    def reference_genomes(self) -> np.ndarray:
        """Genomes of the hand-made merges (``hand_made_genomes``), as rows: a warm start."""
        rows = list(self.hand_made_genomes().values())
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
