"""The ``genome=dfs`` search space: a vector in [0, 1]^n decoded into a ``LayerPath``.

It offers what the search loop and the strategies use of ``GenomeSpace`` (``n_var``,
``decode``, hand-made genomes, pymoo mixed variables), so every algorithm runs on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge.dfs.path import DfsLayout, LayerPath
from evomerge.errors import ConfigError


@dataclass
class DfsSpace:
    layout: DfsLayout
    merged: dict[str, Any] | None = None  # recipe dict of the "merged" pool model
    methods: tuple[str, ...] = ("dfs",)
    slots: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.slots = [self.layout.slot(t) for t in range(self.layout.n_slots)]

    @property
    def n_var(self) -> int:
        return self.layout.n_var

    @property
    def gene_names(self) -> list[str]:
        return self.layout.gene_names

    def decode(self, x: Sequence[float]) -> LayerPath:
        return self.layout.decode(x, self.merged)

    def hand_made_genomes(self) -> dict[str, np.ndarray]:
        return self.layout.hand_made()

    def reference_genomes(self) -> np.ndarray:
        rows = list(self.hand_made_genomes().values())
        return np.array(rows) if rows else np.zeros((0, self.n_var))

    def encode_uniform(self, method: str, params: dict[str, Any]) -> None:
        return None  # a parameter-space recipe is not a path (search.stages cannot carry it)

    def mixed_variables(self) -> dict[str, Any]:
        from pymoo.core.variable import Real

        return {name: Real(bounds=(0.0, 1.0)) for name in self.gene_names}

    def from_mixed(self, values: dict[str, Any]) -> np.ndarray:
        return np.array([float(values[n]) for n in self.gene_names])


def build_dfs_space(
    pool_models: Sequence[str],
    n_layers: int,
    repeats: int = 1,
    models: Sequence[str] | None = None,
    merged: str | None = None,
    scale_range: Sequence[float] = (0.5, 2.0),
) -> DfsSpace:
    """``pool_models``: base and ``expert:<name>``; ``models``: which of them (plus
    ``merged``) the path draws from, the first giving embeddings and head (default: base
    and every expert, or ``merged`` and every expert when ``merged`` names a recipe file)."""
    merged_recipe = load_merged(merged) if merged else None
    available = list(pool_models) + (["merged"] if merged_recipe else [])
    if models is None:
        models = (["merged"] if merged_recipe else ["base"]) + [m for m in pool_models if m != "base"]
    models = [str(m) for m in models]
    unknown = [m for m in models if m not in available]
    if unknown:
        hint = " (set genome.merged to a recipe file)" if unknown[0] == "merged" else ""
        raise ConfigError(f"genome.models: unknown model {unknown[0]!r}{hint}; available: {', '.join(available)}")
    if len(scale_range) != 2:
        raise ConfigError(f"genome.scale_range must be [low, high], got {list(scale_range)}")
    layout = DfsLayout(models, int(n_layers), int(repeats), (float(scale_range[0]), float(scale_range[1])))
    return DfsSpace(layout, merged_recipe)


def load_merged(source: str) -> dict[str, Any]:
    """A parameter-space recipe (``recipes/knee.yaml`` of an earlier run, or JSON) as a dict."""
    from evomerge.merge.recipe import Recipe

    p = Path(source).expanduser()
    if not p.is_file():
        raise ConfigError(f"genome.merged: no recipe file at {p}")
    try:
        if p.suffix == ".json":
            import json

            recipe = Recipe.from_dict(json.loads(p.read_text()))
        else:
            recipe = Recipe.load(p)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- any parse failure is the user's file
        raise ConfigError(f"genome.merged: {p} is not a recipe ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    d = recipe.to_dict()
    d.pop("metadata", None)  # scores of the earlier run are not part of the model's identity
    return d
