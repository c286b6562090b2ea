"""Running a layer path in memory on the live model.

``PathMerger`` wraps the parameter-space ``Merger`` (same ``apply`` / ``model`` /
``tokenizer``), so a session, the fitness and lm-eval's ``HFLM`` keep the one live model
object. At start it materialises the decoder layers of every path model once, as resident
modules (base, each expert = base + its task vector, and optionally ``merged``, a
parameter-space recipe). Per candidate, ``apply(path)`` replaces ``model.model.layers``
by an ``nn.ModuleList`` of thin ``_PathSlot`` wrappers that *reference* resident layers
(no weight copy: microseconds) and sets ``config.num_hidden_layers`` to the path length.

Each slot runs its layer with ``self_attn.layer_idx`` set to the slot's index for the
duration of the call, so a layer that appears twice writes two KV-cache entries (the
cache is indexed by ``layer_idx``) and generation with ``use_cache=True`` is correct.
Embeddings, final norm and LM head are those of the path's first model (the merger holds
that model's weights whenever a path runs), so that model's own path is the model itself.
A parameter-space ``Recipe`` (the reference models) restores the original layers first.
"""

from __future__ import annotations

import copy
import time
from typing import Any, Sequence

import torch
from torch import nn

from evomerge.dfs.path import LayerPath
from evomerge.errors import MergeError
from evomerge.merge.merger import MergeTiming, Merger
from evomerge.merge.recipe import Recipe, reference_recipes


class _PathSlot(nn.Module):
    """One step of a path: scale the incoming hidden state, run a resident layer as cache layer ``index``."""

    def __init__(self, layer: nn.Module, index: int, scale: float):
        super().__init__()
        self.layer = layer  # shared with the resident list and other slots: no copy
        self.index = index
        self.scale = float(scale)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        attn = self.layer.self_attn
        saved = attn.layer_idx
        attn.layer_idx = self.index  # the KV cache entry of this slot, not of the layer
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            attn.layer_idx = saved


def decoder_of(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (``model.model`` for Llama-style causal LMs)."""
    inner = getattr(model, "model", None)
    if inner is None or not isinstance(getattr(inner, "layers", None), nn.ModuleList):
        raise MergeError(f"data-flow merging needs a Llama-style model with model.layers; {type(model).__name__} has none")
    if not hasattr(inner.layers[0], "self_attn"):
        raise MergeError("data-flow merging needs decoder layers with self_attn.layer_idx")
    return inner


def model_recipes(models: Sequence[str], expert_names: Sequence[str], n_layers: int, merged: dict[str, Any] | None) -> dict[str, Recipe]:
    refs = reference_recipes(len(expert_names), list(expert_names), n_layers)
    out: dict[str, Recipe] = {}
    for m in models:
        if m == "merged":
            if merged is None:
                raise MergeError("the path uses model 'merged' but no parameter-space recipe was given")
            out[m] = Recipe.from_dict(merged)
        elif m in refs:
            out[m] = refs[m]
        else:
            raise MergeError(f"unknown path model {m!r}; available: {', '.join(refs)}{', merged' if merged else ''}")
    return out


class PathMerger:
    """The merger of a data-flow search: runs ``LayerPath``s and (for the references) recipes."""

    def __init__(self, merger: Merger, expert_names: Sequence[str], models: Sequence[str], merged: dict[str, Any] | None = None):
        self.merger = merger
        self.model = merger.model
        self.tokenizer = merger.tokenizer
        self.pool = merger.pool
        self.device = merger.device
        self.expert_names = list(expert_names)
        self.models = list(models)
        self.decoder = decoder_of(self.model)
        self.config = self.decoder.config
        self.original_layers = self.decoder.layers
        self.original_n_layers = int(self.config.num_hidden_layers)
        self.original_layer_types = getattr(self.config, "layer_types", None)
        self.recipes = model_recipes(self.models, self.expert_names, merger.n_layers, merged)
        self.resident: dict[str, nn.ModuleList] = {}
        with torch.no_grad():
            for name, recipe in self.recipes.items():
                merger.apply(recipe)
                # deepcopy clones each parameter view into its own storage: a frozen snapshot
                # (the config stays shared, e.g. for the attention implementation)
                self.resident[name] = copy.deepcopy(self.original_layers, memo={id(self.config): self.config})
        self._merger_holds: str | None = None  # which model's embeddings/head the merger holds
        self.current: LayerPath | None = None

    # the Merger interface the rest of evomerge reads
    @property
    def n_layers(self) -> int:
        return self.merger.n_layers

    @property
    def n_experts(self) -> int:
        return self.merger.n_experts

    @property
    def units(self):
        return self.merger.units

    def resident_bytes(self) -> int:
        layers = sum(p.numel() * p.element_size() for m in self.resident.values() for p in m.parameters())
        return self.merger.resident_bytes() + layers

    def apply(self, candidate: LayerPath | Recipe) -> MergeTiming:
        if isinstance(candidate, LayerPath):
            return self.apply_path(candidate)
        self.restore()
        self._merger_holds = None
        return self.merger.apply(candidate)

    def restore(self) -> None:
        """Put the model's own layers back (for parameter-space recipes)."""
        if self.decoder.layers is not self.original_layers:
            self.decoder.layers = self.original_layers
            self._set_length(self.original_n_layers, self.original_layer_types)
        self.current = None

    @torch.no_grad()
    def apply_path(self, path: LayerPath) -> MergeTiming:
        started = time.perf_counter()
        if not path.slots:
            raise MergeError("the layer path is empty (every include gene below 0.5): nothing to run")
        if path.anchor != self.models[0]:
            raise MergeError(f"the path's embeddings come from {path.anchor!r}, this session's from {self.models[0]!r}")
        for i, s in enumerate(path.slots):
            if s.model not in self.resident:
                raise MergeError(f"path slot {i} uses model {s.model!r}, not one of {', '.join(self.resident)}")
            if not 0 <= s.layer < len(self.resident[s.model]):
                raise MergeError(f"path slot {i} uses layer {s.layer} of {s.model}, which has {len(self.resident[s.model])}")
            if not (s.scale > 0 and s.scale < float("inf")):
                raise MergeError(f"path slot {i} has input scale {s.scale}; scales must be positive and finite")
        if self._merger_holds != path.anchor:  # embeddings, final norm and head of the anchor model
            self.merger.apply(self.recipes[path.anchor])
            self._merger_holds = path.anchor
        self.decoder.layers = nn.ModuleList(_PathSlot(self.resident[s.model][s.layer], i, s.scale) for i, s in enumerate(path.slots))
        types = None
        if self.original_layer_types is not None:
            types = [self.original_layer_types[s.layer] for s in path.slots]
        self._set_length(len(path.slots), types)
        self.current = path
        return MergeTiming(time.perf_counter() - started, len(path.slots))

    def _set_length(self, n: int, layer_types: list[str] | None) -> None:
        # the mask, the layer loop and DynamicCache(config=...) read these
        self.config.num_hidden_layers = n
        if layer_types is not None:
            self.config.layer_types = layer_types
