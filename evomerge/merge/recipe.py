"""Recipes: serializable descriptions of a merge.

A recipe is an ordered list of groups. Each group selects a set of merge *units*
(the embeddings, the head = final norm + lm_head, or a range of transformer layers,
optionally only their attention or MLP tensors) and says which method and parameters
merge them. Every unit of a model must be covered by exactly one group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import yaml

from evomerge.errors import MergeError
from evomerge.merge.methods import get_method

Part = Literal["embed", "head", "layers"]
Component = Literal["all", "attn", "mlp"]
RECIPE_FORMAT = 1


@dataclass(frozen=True)
class Unit:
    """The finest piece of a model a recipe can address."""

    part: Part
    layer: int | None = None
    component: Literal["attn", "mlp"] | None = None

    @property
    def name(self) -> str:
        if self.part != "layers":
            return self.part
        return f"layers.{self.layer}.{self.component}"


@dataclass
class Group:
    name: str
    part: Part
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    layers: tuple[int, int] | None = None  # inclusive range, for part == "layers"
    component: Component = "all"

    def covers(self, unit: Unit) -> bool:
        if unit.part != self.part:
            return False
        if self.part != "layers":
            return True
        assert self.layers is not None and unit.layer is not None
        in_range = self.layers[0] <= unit.layer <= self.layers[1]
        return in_range and self.component in ("all", unit.component)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "part": self.part}
        if self.part == "layers":
            d["layers"] = list(self.layers or ())
            d["component"] = self.component
        d["method"] = self.method
        d["params"] = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.params.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Group":
        try:
            part = d["part"]
            layers = tuple(int(x) for x in d["layers"]) if part == "layers" else None
            if part not in ("embed", "head", "layers") or (layers is not None and len(layers) != 2):
                raise ValueError(part)
            return cls(
                name=str(d.get("name", part)),
                part=part,
                method=str(d["method"]),
                params=dict(d.get("params") or {}),
                layers=layers,  # type: ignore[arg-type]
                component=d.get("component", "all"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MergeError(f"invalid recipe group {d!r}: expected part (embed|head|layers), layers [a, b] and method") from exc


@dataclass
class Recipe:
    groups: list[Group]
    base: str | None = None
    experts: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- construction helpers
    @classmethod
    def uniform(cls, method: str, params: dict[str, Any], n_layers: int, **kwargs: Any) -> "Recipe":
        """One method and parameter set for the whole model."""
        return cls(
            groups=[
                Group("embed", "embed", method, dict(params)),
                Group("layers", "layers", method, dict(params), layers=(0, n_layers - 1)),
                Group("head", "head", method, dict(params)),
            ],
            **kwargs,
        )

    # ---- validation / assignment
    def assign(self, units: Iterable[Unit], n_models: int) -> list[tuple[Unit, Group]]:
        """Map every unit to its one covering group, validating methods and parameters."""
        for g in self.groups:
            get_method(g.method).validate(g.params, n_models)
        pairs = []
        for unit in units:
            covering = [g for g in self.groups if g.covers(unit)]
            if not covering:
                raise MergeError(f"recipe has no group for {unit.name}")
            if len(covering) > 1:
                raise MergeError(f"{unit.name} is covered by several recipe groups: {', '.join(g.name for g in covering)}")
            pairs.append((unit, covering[0]))
        return pairs

    # ---- serialization
    def to_dict(self) -> dict[str, Any]:
        return {
            "evomerge_recipe": RECIPE_FORMAT,
            "base": self.base,
            "experts": list(self.experts),
            "metadata": dict(self.metadata),
            "groups": [g.to_dict() for g in self.groups],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict) or "groups" not in d:
            raise MergeError("not an evomerge recipe: expected a mapping with 'groups'")
        return cls(
            groups=[Group.from_dict(g) for g in d["groups"]],
            base=d.get("base"),
            experts=list(d.get("experts") or []),
            metadata=dict(d.get("metadata") or {}),
        )

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        return cls.from_dict(yaml.safe_load(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        p = Path(path)
        if not p.is_file():
            raise MergeError(f"recipe file not found: {p}")
        return cls.from_yaml(p.read_text())

    # ---- mergekit export
    def to_mergekit(self, base: str | None = None, experts: list[str] | None = None) -> dict[str, Any]:
        """A mergekit config reproducing this recipe (single-method recipes only).

        Layer groups become slices; attention/MLP splits and the embed/head groups become
        per-tensor ``filter`` conditions. mergekit has one merge method per config, so
        recipes that mix methods raise ``MergeError``.
        """
        methods = {g.method for g in self.groups}
        if len(methods) != 1:
            raise MergeError(f"mergekit cannot express a recipe mixing methods ({', '.join(sorted(methods))}) in one config")
        method = methods.pop()
        base = base or self.base
        experts = experts or self.experts
        if not base or not experts:
            raise MergeError("mergekit export needs the base and expert model paths")
        layer_groups = sorted((g for g in self.groups if g.part == "layers"), key=lambda g: (g.layers, g.component))
        ranges = sorted({g.layers for g in layer_groups})  # type: ignore[type-var]
        embed = [g for g in self.groups if g.part == "embed"]
        head = [g for g in self.groups if g.part == "head"]
        shared_names = {"lambda", "normalize", "t", "gamma", "epsilon"}
        slices = []
        for i, (a, b) in enumerate(ranges):
            in_range = [g for g in layer_groups if g.layers == (a, b)]
            extra = (embed if i == 0 else []) + (head if i == len(ranges) - 1 else [])
            sources = [{"model": base, "layer_range": [a, b + 1]}] if method != "slerp" else []
            for k, expert in enumerate(experts[: 2 if method == "slerp" else None]):
                params = _mergekit_params(in_range, extra, k, per_model_only=True, exclude=shared_names)
                src: dict[str, Any] = {"model": expert, "layer_range": [a, b + 1]}
                if params:
                    src["parameters"] = params
                sources.append(src)
            slice_: dict[str, Any] = {"sources": sources}
            shared = _mergekit_params(in_range, extra, None, per_model_only=False, include=shared_names)
            if shared:
                slice_["parameters"] = shared
            slices.append(slice_)
        cfg: dict[str, Any] = {"merge_method": method, "base_model": base, "slices": slices, "dtype": "float32"}
        return _plain(cfg)


def _condition_value(group: Group, name: str, k: int | None) -> Any:
    value = group.params.get(name)
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return value[k] if k is not None else None
    return value if k is None else None


def _mergekit_params(
    layer_groups: list[Group],
    extra: list[Group],
    k: int | None,
    per_model_only: bool,
    include: set[str] | None = None,
    exclude: set[str] | None = None,
) -> dict[str, Any]:
    names = sorted({n for g in layer_groups + extra for n in g.params})
    out: dict[str, Any] = {}
    for name in names:
        if (include is not None and name not in include) or (exclude is not None and name in exclude):
            continue
        conditions = []
        for g in extra:
            v = _condition_value(g, name, k)
            if v is not None:
                conditions.append({"filter": "embed_tokens" if g.part == "embed" else "lm_head", "value": v})
                if g.part == "head":
                    conditions.append({"filter": "model.norm", "value": v})
        fallback = None
        for g in layer_groups:
            v = _condition_value(g, name, k)
            if v is None:
                continue
            if g.component == "all":
                fallback = v
            else:
                conditions.append({"filter": "self_attn" if g.component == "attn" else "mlp", "value": v})
                if g.component == "attn":
                    fallback = v if fallback is None else fallback
        if not conditions and fallback is None:
            continue
        out[name] = fallback if not conditions else conditions + ([{"value": fallback}] if fallback is not None else [])
    return out


def _plain(obj: Any) -> Any:
    """Convert numpy/torch scalars and tuples so yaml.safe_dump accepts them."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    if isinstance(obj, float) and math.isfinite(obj):
        return float(obj)
    return obj
