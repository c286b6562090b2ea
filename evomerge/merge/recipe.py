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
from typing import Any, Iterable, Literal, Sequence

import yaml

from evomerge.errors import MergeError
from evomerge.merge.methods import MergeMethod, get_method

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
    def to_mergekit(self, base: str | None = None, experts: list[str] | None = None, dtype: str = "float32") -> dict[str, Any]:
        """A mergekit (0.1.5) config that reproduces this recipe's weights, merged in ``dtype``
        (the pool's: a bfloat16 pool merges in bfloat16 arithmetic, and so does mergekit with
        ``dtype: bfloat16``).

        Every layer range where the groups change becomes one slice; attention/MLP splits
        and the embed/head groups become per-tensor ``filter`` conditions (Llama-style
        names: ``embed_tokens``, ``mlp``, ``self_attn``, ``lm_head``, ``model.norm``).
        Every parameter is written explicitly (mergekit's defaults differ from ours). Each
        method declares its translation (``MergeMethod.mergekit``); what mergekit cannot
        express (mixed methods, DELLA spreads outside (0, 1), ...) raises ``MergeError``
        with a one-line reason. Random methods (DARE, DELLA) reproduce the recipe only in
        distribution: the masks (and DARE/DELLA's rescaling, see docs/mergekit.md) differ.
        """
        methods = sorted({g.method for g in self.groups})
        if len(methods) != 1:
            raise MergeError(f"mergekit cannot express a recipe mixing methods ({', '.join(methods)}) in one config")
        method = get_method(methods[0])
        spec = method.mergekit
        if spec is None:
            raise MergeError(f"mergekit cannot express method '{method.name}': {method.mergekit_reason}")
        base = base or self.base
        experts = list(experts or self.experts)
        if not base or not experts:
            raise MergeError("mergekit export needs the base and expert model paths")
        k = len(experts)
        translated: dict[int, tuple[dict[str, Any], dict[Any, dict[str, Any]]]] = {}
        for g in self.groups:
            checked = method.validate(g.params, k)
            reason = spec.check(checked, k) if spec.check else None
            if reason:
                raise MergeError(f"mergekit cannot express group '{g.name}' ({method.name}): {reason}")
            translated[id(g)] = (spec.translate or default_mergekit_translation(method))(checked, k)
        sources = _mergekit_sources(spec.sources, base, experts)
        layer_groups = [g for g in self.groups if g.part == "layers"]
        if not layer_groups:
            raise MergeError("mergekit export needs at least one layer group")
        n_layers = 1 + max(g.layers[1] for g in layer_groups)  # type: ignore[index]
        cuts = sorted({0, n_layers} | {g.layers[0] for g in layer_groups} | {g.layers[1] + 1 for g in layer_groups})  # type: ignore[index]
        embed = next((g for g in self.groups if g.part == "embed"), None)
        head = next((g for g in self.groups if g.part == "head"), None)
        slices = []
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            attn = _covering(self.groups, Unit("layers", a, "attn"))
            mlp = _covering(self.groups, Unit("layers", a, "mlp"))
            roles: list[tuple[str | None, Group]] = []
            if i == 0 and embed is not None:
                roles.append(("embed_tokens", embed))
            if i == len(cuts) - 2 and head is not None:
                roles += [("lm_head", head), ("model.norm", head)]
            if mlp is not attn:
                roles += [("mlp", mlp), ("self_attn", attn)]
            roles.append((None, attn))  # norms of the layer follow its attention group
            slice_: dict[str, Any] = {"sources": []}
            for key, model in sources:
                src: dict[str, Any] = {"model": mergekit_model(model), "layer_range": [a, b]}
                params = _settings([(f, translated[id(g)][1].get(key, {})) for f, g in roles])
                if params:
                    src["parameters"] = params
                slice_["sources"].append(src)
            shared = _settings([(f, {**spec.fixed, **translated[id(g)][0]}) for f, g in roles])
            if shared:
                slice_["parameters"] = shared
            slices.append(slice_)
        cfg: dict[str, Any] = {"merge_method": spec.method}
        if spec.sources in ("base+experts", "pair"):  # the base model is the first source
            cfg["base_model"] = mergekit_model(sources[0][1])
        cfg.update({"slices": slices, "dtype": dtype})
        return _plain(cfg)

    def to_mergekit_yaml(self, base: str | None = None, experts: list[str] | None = None, dtype: str = "float32") -> str:
        """``to_mergekit`` as YAML text, with a header saying what it reproduces."""
        cfg = self.to_mergekit(base, experts, dtype)
        spec = get_method(self.groups[0].method).mergekit
        note = (
            "# exported by evomerge for mergekit 0.1.5: deterministic method, meant to give evomerge's exact merge\n"
            "# (not verified here; `evomerge export run=... point=... verify=true` runs mergekit and compares)\n"
        )
        if spec is not None and spec.random:
            note = (
                "# exported by evomerge for mergekit 0.1.5: random method -- drop masks differ between the tools\n"
                "# (and mergekit rescales by the L1 norm, evomerge by 1/keep-probability); equal only at density 1\n"
            )
        return note + yaml.safe_dump(cfg, sort_keys=False)


def default_mergekit_translation(method: MergeMethod):
    """Shared parameters to the slice, per-model ones to each expert's source; 0/1 switches
    (``normalize``) become booleans; ``spec.skip`` names (the seed) are dropped and
    ``spec.rename`` ones renamed."""
    spec = method.mergekit
    assert spec is not None

    def translate(params: dict[str, Any], n_models: int) -> tuple[dict[str, Any], dict[Any, dict[str, Any]]]:
        shared: dict[str, Any] = {}
        per_source: dict[Any, dict[str, Any]] = {i: {} for i in range(n_models)}
        for p in method.params:
            if p.name in spec.skip:
                continue
            value = params[p.name]
            name = spec.rename.get(p.name, p.name)
            if p.per_model:
                for i in range(n_models):
                    per_source[i][name] = value[i]
            else:
                shared[name] = bool(value) if p.name in _BOOLEAN_PARAMS else value
        return shared, per_source

    return translate


_BOOLEAN_PARAMS = {"normalize", "rescale", "normalize_weights", "flatten", "row_wise"}


def mergekit_model(path: str) -> Any:
    """A model path as mergekit reads it: plain, or (where mergekit's string form would split
    it: ``path@revision``, ``model+lora``) its structured form ``{model: {path: ...}}``."""
    path = str(path)
    return {"model": {"path": path}} if ("@" in path or "+" in path) else path


def _mergekit_sources(layout: str, base: str, experts: list[str]) -> list[tuple[Any, str]]:
    """(key, model path) per mergekit source; keys match the translation's per_source keys."""
    if layout in ("base+experts", "all"):
        return [("base", base)] + list(enumerate(experts))
    if layout == "experts":
        return list(enumerate(experts))
    if layout == "pair":
        return [("base", base), (0, experts[0])] if len(experts) == 1 else [(0, experts[0]), (1, experts[1])]
    raise MergeError(f"unknown mergekit source layout {layout!r}")


def _covering(groups: list[Group], unit: Unit) -> Group:
    covering = [g for g in groups if g.covers(unit)]
    if len(covering) != 1:
        raise MergeError(f"{unit.name} is covered by {len(covering)} recipe groups (needs exactly one)")
    return covering[0]


def _settings(roles: list[tuple[str | None, dict[str, Any]]]) -> dict[str, Any]:
    """Per parameter: a plain value when every role agrees, else filter conditions (first
    match wins in mergekit) ending with the unfiltered fallback (the last role)."""
    names: list[str] = []
    for _, params in roles:
        names += [n for n in params if n not in names]
    out: dict[str, Any] = {}
    for name in names:
        conditions = [(f, params[name]) for f, params in roles if name in params]
        if all(v == conditions[-1][1] for _, v in conditions):
            out[name] = conditions[-1][1]
            continue
        out[name] = [{"filter": f, "value": v} if f is not None else {"value": v} for f, v in conditions]
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


def reference_recipes(n_experts: int, names: Sequence[str], n_layers: int) -> dict[str, Recipe]:
    """The reference models as recipes: ``base`` (no task vector) and ``expert:<name>``."""
    refs = {"base": Recipe.uniform("task_arithmetic", {"weight": [0.0] * n_experts}, n_layers)}
    for i, name in enumerate(names):
        w = [0.0] * n_experts
        w[i] = 1.0
        refs[f"expert:{name}"] = Recipe.uniform("task_arithmetic", {"weight": w}, n_layers)
    return refs
