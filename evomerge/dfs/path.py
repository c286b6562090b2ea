"""Layer paths and their genome (pure: no torch).

Layout (Sakana's DFS): the candidate slots are all layers of all models of the pool, in
order, repeated ``repeats`` times -- ``T = repeats * M * L`` slots; slot ``t`` holds layer
``t mod L`` of model ``(t // L) mod M``. The genome has

- one include gene per slot (included when >= 0.5), so a path is a subsequence of the
  layout (a layer may appear once per repeat);
- one scale gene per ordered pair of different models ``(a, b)``: the hidden state
  entering the first layer of ``b`` after a layer of ``a`` is multiplied by it (the
  paper's ``W`` matrix scales every layer-to-layer transition; this is its low-parameter
  form: one factor per model switch). A path starts after the first model's embeddings, so
  a path starting in another model ``b`` is scaled by ``(first, b)`` too. With
  ``scale_range: [1, 1]`` there are no scale genes.

The first model of the pool (``base``, or ``merged`` for PS+DFS) provides the embeddings,
the final norm and the LM head, so the path of its own layers ``0..L-1`` is that model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.recipe import mergekit_model

KIND = "dfs"
INCLUDE_THRESHOLD = 0.5


@dataclass(frozen=True)
class Slot:
    model: str  # a pool model name: "base", "expert:<name>" or "merged"
    layer: int
    scale: float = 1.0


@dataclass
class LayerPath:
    """A candidate: the layers a token passes through, each with its input scale."""

    slots: list[Slot]
    models: list[str]  # the pool models; the first one gives embeddings, norm and head
    merged: dict[str, Any] | None = None  # the parameter-space recipe of model "merged"
    base: str | None = None  # model paths, filled in for exports
    experts: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def anchor(self) -> str:
        return self.models[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            "models": list(self.models),
            "path": [[s.model, int(s.layer), float(s.scale)] for s in self.slots],
            "merged": self.merged,
            "base": self.base,
            "experts": list(self.experts),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerPath":
        if d.get("kind") != KIND:
            raise ConfigError(f"not a layer path (kind {d.get('kind')!r})")
        return cls(
            slots=[Slot(str(m), int(layer), float(s)) for m, layer, s in d["path"]],
            models=[str(m) for m in d["models"]],
            merged=d.get("merged"),
            base=d.get("base"),
            experts=list(d.get("experts") or []),
            metadata=dict(d.get("metadata") or {}),
        )

    def key(self) -> str:
        """Identity for the archive's duplicate check (same layers, scales and merged model)."""
        import json

        return json.dumps({"path": self.to_dict()["path"], "models": self.models, "merged": self.merged}, sort_keys=True)

    def save(self, path: str | Path) -> None:
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    def describe(self) -> str:
        """``base[0-3] > expert:math[1]*1.25 > ...``: runs of consecutive layers of one model."""
        parts: list[str] = []
        run: list[Slot] = []

        def flush() -> None:
            if run:
                a, b = run[0].layer, run[-1].layer
                scale = f"*{run[0].scale:g}" if run[0].scale != 1.0 else ""
                parts.append(f"{run[0].model}[{a}{'' if a == b else f'-{b}'}]{scale}")

        for s in self.slots:
            if run and s.model == run[-1].model and s.layer == run[-1].layer + 1 and s.scale == 1.0:
                run.append(s)
            else:
                flush()
                run = [s]
        flush()
        return " > ".join(parts) or "(empty)"

    def to_mergekit_yaml(self, paths: dict[str, str]) -> str:
        """mergekit ``passthrough`` slices (``paths``: pool model name -> folder); refused
        (MergeError, one line) when a scale is not 1 or the path uses the in-memory merged model."""
        return passthrough_yaml(self, paths)


def pool_paths(base: str, experts: dict[str, str]) -> dict[str, str]:
    """Pool model names of a path (``base``, ``expert:<name>``) -> their folders."""
    return {"base": str(base), **{f"expert:{k}": str(v) for k, v in experts.items()}}


def candidate_from_dict(d: dict[str, Any]):
    """An archived recipe dict as what the merger applies: a ``LayerPath`` or a ``Recipe``."""
    if isinstance(d, dict) and d.get("kind") == KIND:
        return LayerPath.from_dict(d)
    from evomerge.merge.recipe import Recipe

    return Recipe.from_dict(d)


def passthrough_yaml(path: LayerPath, paths: dict[str, str]) -> str:
    import yaml

    if not path.slots:
        raise MergeError("the path is empty: nothing to export")
    scaled = [s for s in path.slots if s.scale != 1.0]
    if scaled:
        raise MergeError(
            f"mergekit passthrough cannot scale a layer's input (slot {path.slots.index(scaled[0])} of {scaled[0].model} has scale {scaled[0].scale:g}); "
            "search with genome.scale_range=[1,1] for exportable paths"
        )
    if "merged" in {s.model for s in path.slots} or path.anchor == "merged":
        raise MergeError("the path uses the parameter-space merged model, which mergekit needs on disk: export that point first and use its folder")
    ends = {path.slots[0].model, path.slots[-1].model}
    if ends != {path.anchor}:
        # mergekit 0.1.5 (plan_module): embeddings from the first slice's model, final norm and head from the last's
        raise MergeError(
            f"mergekit takes the embeddings from the first slice's model ({path.slots[0].model}) and the head from the last's "
            f"({path.slots[-1].model}); this path takes both from {path.anchor}"
        )
    missing = sorted({s.model for s in path.slots} - set(paths))
    if missing:
        raise MergeError(f"no model path for {missing[0]!r}")
    slices = []
    for s in path.slots:
        last = slices[-1]["sources"][0] if slices else None
        if last is not None and last["model"] == mergekit_model(paths[s.model]) and last["layer_range"][1] == s.layer:
            last["layer_range"][1] = s.layer + 1
        else:
            slices.append({"sources": [{"model": mergekit_model(paths[s.model]), "layer_range": [s.layer, s.layer + 1]}]})
    body = yaml.safe_dump({"merge_method": "passthrough", "dtype": "float32", "slices": slices}, sort_keys=False)
    return f"# evomerge layer path {path.describe()}: exact (every input scale is 1)\n" + body


@dataclass
class DfsLayout:
    models: Sequence[str]
    n_layers: int
    repeats: int = 1
    scale_range: tuple[float, float] = (0.5, 2.0)

    def __post_init__(self) -> None:
        self.models = list(self.models)
        if not self.models:
            raise ConfigError("genome.models must name at least one pool model")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"genome.models lists a model twice: {self.models}")
        if self.repeats < 1:
            raise ConfigError(f"genome.repeats must be >= 1, got {self.repeats}")
        if self.n_layers < 1:
            raise ConfigError("the models have no layers")
        lo, hi = (float(v) for v in self.scale_range)
        if not 0 < lo <= hi:
            raise ConfigError(f"genome.scale_range must be [low, high] with 0 < low <= high, got {[lo, hi]}")
        self.scale_range = (lo, hi)
        self.pairs = [(a, b) for a in self.models for b in self.models if a != b] if hi > lo else []

    @property
    def n_slots(self) -> int:
        return self.repeats * len(self.models) * self.n_layers

    def slot(self, t: int) -> tuple[str, int]:
        return self.models[(t // self.n_layers) % len(self.models)], t % self.n_layers

    @property
    def n_var(self) -> int:
        return self.n_slots + len(self.pairs)

    @property
    def gene_names(self) -> list[str]:
        names = [f"include.{t}.{m}[{layer}]" for t, (m, layer) in ((t, self.slot(t)) for t in range(self.n_slots))]
        return names + [f"scale.{a}>{b}" for a, b in self.pairs]

    def scale_of(self, u: float) -> float:
        lo, hi = self.scale_range
        return round(lo + float(u) * (hi - lo), 6)

    def gene_of_scale(self, s: float) -> float | None:
        lo, hi = self.scale_range
        if not lo - 1e-12 <= s <= hi + 1e-12:
            return None
        return (s - lo) / (hi - lo) if hi > lo else 0.0

    def decode(self, x: Sequence[float], merged: dict[str, Any] | None = None) -> LayerPath:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.n_var,):
            raise ConfigError(f"the dfs genome has {self.n_var} genes, got a vector of shape {x.shape}")
        scales = {pair: self.scale_of(x[self.n_slots + i]) for i, pair in enumerate(self.pairs)}
        slots: list[Slot] = []
        previous = self.models[0]  # the embeddings come from the first model
        for t in range(self.n_slots):
            if x[t] < INCLUDE_THRESHOLD:
                continue
            model, layer = self.slot(t)
            slots.append(Slot(model, layer, scales.get((previous, model), 1.0) if model != previous else 1.0))
            previous = model
        return LayerPath(slots, list(self.models), merged)

    def encode(self, included: Sequence[int], scales: dict[tuple[str, str], float] | None = None) -> np.ndarray | None:
        """The genome including exactly the slot indices ``included`` (scales default 1),
        or None when a needed scale is outside ``scale_range``."""
        scales = scales or {}
        x = np.zeros(self.n_var)
        x[list(included)] = 1.0
        for i, pair in enumerate(self.pairs):
            g = self.gene_of_scale(scales.get(pair, 1.0))
            x[self.n_slots + i] = 0.0 if g is None else g  # out of range: fine if the path never uses it
        previous = self.models[0]
        for s in self.decode(x).slots:
            want = scales.get((previous, s.model), 1.0) if s.model != previous else 1.0
            if abs(s.scale - want) > 1e-6:
                return None
            previous = s.model
        return x

    def hand_made(self) -> dict[str, np.ndarray]:
        """Each model alone (its layers 0..L-1: the first model's path is that model) and
        all models stacked in pool order (mergekit's typical hand-written passthrough)."""
        out: dict[str, np.ndarray] = {}
        L = self.n_layers
        for i, m in enumerate(self.models):
            x = self.encode(range(i * L, (i + 1) * L))
            if x is not None:
                out[f"path:{m}"] = x
        if len(self.models) > 1:
            x = self.encode(range(len(self.models) * L))
            if x is not None:
                out["path:stack"] = x
        return out
