"""Merge methods as pure functions of a ``DeltaGroup`` and validated parameters.

Every method returns the merged *weights* (not a delta) of shape ``[N]``. Per-model
parameters arrive as float tensors of shape ``[K]`` on the group's device, shared
parameters as Python numbers. Per-tensor semantics (magnitude ranks, angles) are per
segment of the group; see ``groups.py``.

To add a method: write ``def my_method(g: DeltaGroup, p: Params, out=None) -> Tensor`` and call
``register(MergeMethod(name=..., fn=my_method, params=(...)))`` (see README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.merge.groups import DeltaGroup

Params = Mapping[str, "Tensor | float | int"]
_EPS = 1e-8


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a merge method, with hard bounds used for validation."""

    name: str
    low: float
    high: float
    default: float | None
    per_model: bool = False
    integer: bool = False
    searchable: bool = True
    help: str = ""


@dataclass(frozen=True)
class MergeMethod:
    name: str
    fn: Callable[..., Tensor]  # (group, params, out=None) -> merged weights
    params: tuple[ParamSpec, ...]
    description: str
    min_models: int = 1
    max_models: int | None = None
    # True when each output element depends only on the same element of the inputs and
    # per-tensor magnitude statistics: the merge can then run chunk by chunk
    elementwise: bool = True

    def spec(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def validate(self, values: Mapping[str, object], n_models: int) -> dict[str, object]:
        """Fill defaults and check names, lengths and bounds; raise ``MergeError`` otherwise."""
        if n_models < self.min_models or (self.max_models is not None and n_models > self.max_models):
            bound = f"{self.min_models}..{self.max_models}" if self.max_models else f">= {self.min_models}"
            raise MergeError(f"merge method '{self.name}' needs {bound} expert models, got {n_models}")
        known = {p.name for p in self.params}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MergeError(
                f"merge method '{self.name}' has no parameter {unknown[0]!r} (it takes: {', '.join(sorted(known)) or 'none'})"
            )
        out: dict[str, object] = {}
        for p in self.params:
            value = values.get(p.name, p.default)
            if value is None:
                raise MergeError(f"merge method '{self.name}' needs parameter '{p.name}'")
            if p.per_model:
                seq = list(value) if isinstance(value, (list, tuple)) else [value] * n_models
                if len(seq) != n_models:
                    raise MergeError(
                        f"'{self.name}.{p.name}' needs one value per expert model ({n_models}), got {len(seq)}"
                    )
                out[p.name] = [self._check(p, v) for v in seq]
            else:
                out[p.name] = self._check(p, value)
        return out

    def _check(self, p: ParamSpec, value: object) -> float | int:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise MergeError(f"'{self.name}.{p.name}' must be a number, got {value!r}") from None
        if not math.isfinite(number) or not p.low <= number <= p.high:
            raise MergeError(f"'{self.name}.{p.name}' = {value!r} is out of bounds [{p.low}, {p.high}]")
        if p.integer:
            if number != int(number):
                raise MergeError(f"'{self.name}.{p.name}' must be an integer, got {value!r}")
            return int(number)
        return number


REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in REGISTRY:
        raise ValueError(f"merge method {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> MergeMethod:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


# ---------------------------------------------------------------- building blocks


def _weighted(g: DeltaGroup, weight: Tensor, deltas: Tensor | None = None) -> Tensor:
    d = g.deltas if deltas is None else deltas
    return d * weight.to(d.dtype)[:, None]


def magnitude_mask(g: DeltaGroup, density: Tensor) -> Tensor:
    """Keep the top ``density`` fraction of each task vector by magnitude, per tensor."""
    return g.compare(g.deltas.abs(), g.thresholds(density))


def trim_by_magnitude(g: DeltaGroup, density: Tensor, weight: Tensor) -> Tensor:
    """``w_k * delta_k`` where ``delta_k`` is in its tensor's top ``density_k``, else 0."""
    kept = g.deltas * magnitude_mask(g, density)
    return kept.mul_(weight.to(kept.dtype)[:, None])


def random_keep(g: DeltaGroup, keep_prob: Tensor, seed: int) -> Tensor:
    """DARE-style drop: keep each element with ``keep_prob`` and rescale by ``1/keep_prob``.

    ``keep_prob`` broadcasts against ``[K, N]``. Elements with ``keep_prob == 0`` become 0.
    """
    noise = torch.rand(g.deltas.shape, generator=g.generator(seed), device=g.deltas.device, dtype=torch.float32)
    keep_prob = keep_prob.to(torch.float32)
    scale = torch.where(keep_prob > 0, 1.0 / keep_prob.clamp(min=_EPS), torch.zeros_like(keep_prob))
    return g.deltas * ((noise < keep_prob) * scale).to(g.deltas.dtype)


def sign_consensus(weighted: Tensor, weight: Tensor, normalize: bool) -> Tensor:
    """TIES: elect a sign per element by total mass, keep agreeing entries, average them."""
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)  # ties go to +, as in mergekit
    # entries pointing the majority's way are > 0 after this product; zeros never agree
    aligned = (weighted * majority).clamp_(min=0)
    merged = aligned.sum(0).mul_(majority)
    if normalize:
        divisor = weight.to(weighted.dtype) @ (aligned > 0).to(weighted.dtype)
        merged = merged.div_(torch.where(divisor.abs() < _EPS, torch.ones_like(divisor), divisor))
    return merged


def _finish(g: DeltaGroup, merged_delta: Tensor, p: Params, out: Tensor | None = None) -> Tensor:
    """base + lambda * merged_delta, written into ``out`` when given (saves one pass)."""
    alpha = float(p.get("lambda", 1.0))
    if out is None:
        return torch.add(g.base, merged_delta, alpha=alpha)
    return torch.add(g.base, merged_delta, alpha=alpha, out=out)


def _weighted_sum(g: DeltaGroup, weight: Tensor) -> Tensor:
    """sum_i w_i * delta_i as one matrix-vector product (a single pass over the deltas)."""
    return weight.to(g.deltas.dtype) @ g.deltas


# ---------------------------------------------------------------- methods


def linear(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    w = p["weight"]
    total = float(w.sum())
    if p["normalize"] and abs(total) > _EPS:
        return _finish(g, _weighted_sum(g, w / total), {}, out)
    return total * g.base + _weighted_sum(g, w)


def task_arithmetic(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    # one fused pass: out = base + deltas^T (lambda * w)
    scaled = (p["weight"] * float(p.get("lambda", 1.0))).to(g.deltas.dtype)
    if out is None:
        return torch.addmv(g.base, g.deltas.t(), scaled)
    return torch.addmv(g.base, g.deltas.t(), scaled, out=out)


def ties(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    w = p["weight"]
    trimmed = trim_by_magnitude(g, p["density"], w)
    return _finish(g, sign_consensus(trimmed, w, bool(p["normalize"])), p, out)


def dare_linear(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    kept = random_keep(g, p["density"][:, None], int(p["seed"]))
    return _finish(g, p["weight"].to(kept.dtype) @ kept, p, out)


def dare_ties(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    w = p["weight"]
    kept = _weighted(g, w, random_keep(g, p["density"][:, None], int(p["seed"])))
    return _finish(g, sign_consensus(kept, w, bool(p["normalize"])), p, out)


def breadcrumbs(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Drop the largest ``gamma`` fraction (outliers) and keep the next ``density`` fraction."""
    gamma = torch.full_like(p["density"], float(p["gamma"]))
    upper = g.thresholds(gamma)
    lower = g.thresholds((gamma + p["density"]).clamp(max=1))
    mags = g.deltas.abs()
    kept = g.deltas * (g.compare(mags, upper, torch.lt) & g.compare(mags, lower, torch.ge))
    return _finish(g, p["weight"].to(kept.dtype) @ kept, p, out)


def della(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """DELLA: keep probability rises linearly with magnitude rank within
    ``[density - epsilon, density + epsilon]``; survivors are rescaled, then TIES consensus."""
    eps = float(p["epsilon"])
    rank = g.rank_fraction()
    keep_prob = (p["density"][:, None] - eps + 2 * eps * rank).clamp(0, 1)
    w = p["weight"]
    kept = _weighted(g, w, random_keep(g, keep_prob, int(p["seed"])))
    return _finish(g, sign_consensus(kept, w, bool(p["normalize"])), p, out)


def _endpoints(g: DeltaGroup) -> tuple[Tensor, Tensor]:
    if g.n_models == 1:
        return g.base, g.base + g.deltas[0]
    return g.base + g.deltas[0], g.base + g.deltas[1]


def slerp(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Spherical interpolation per tensor between expert 0 and expert 1 (or base and
    expert 0 when there is only one expert); ``t=0`` gives the first endpoint."""
    t = float(p["t"])
    a, b = _endpoints(g)
    dot = g.segment_sum(a * b)
    norms = (g.segment_sum(a * a) * g.segment_sum(b * b)).sqrt().clamp(min=_EPS)
    cos = (dot / norms).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    nearly_parallel = sin.abs() < 1e-6
    safe_sin = torch.where(nearly_parallel, torch.ones_like(sin), sin)
    s0 = torch.where(nearly_parallel, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / safe_sin)
    s1 = torch.where(nearly_parallel, torch.full_like(theta, t), torch.sin(t * theta) / safe_sin)
    return g.expand(s0) * a + g.expand(s1) * b


def model_stock(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Model Stock: interpolate between the experts' mean and the base by
    ``t = K cos / (1 + (K - 1) cos)``, cos = mean pairwise cosine of task vectors, per tensor."""
    k = g.n_models
    norms = g.segment_sum(g.deltas * g.deltas).sqrt().clamp(min=_EPS)  # [K, S]
    pair_cos = []
    for i in range(k):
        for j in range(i + 1, k):
            pair_cos.append(g.segment_sum(g.deltas[i] * g.deltas[j]) / (norms[i] * norms[j]))
    cos = torch.stack(pair_cos).mean(0)
    t = k * cos / (1 + (k - 1) * cos).clamp(min=_EPS)
    return g.base + g.expand(t) * g.deltas.mean(0)


def passthrough(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Copy one source unchanged: 0 = base, i = expert i (1-based)."""
    source = int(p["source"])
    if source > g.n_models:
        raise MergeError(f"'passthrough.source' = {source} but there are only {g.n_models} experts")
    return g.base.clone() if source == 0 else g.base + g.deltas[source - 1]


# ---------------------------------------------------------------- registry

WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True, help="scale of each task vector")
DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, help="fraction of each task vector kept")
LAMBDA = ParamSpec("lambda", 0.0, 3.0, 1.0, help="global scale of the merged task vector")
NORMALIZE = ParamSpec("normalize", 0, 1, 1, integer=True, searchable=False, help="divide by the summed weights")
SEED = ParamSpec("seed", 0, 2**31 - 1, 0, integer=True, searchable=False, help="seed of random drops")

register(MergeMethod("linear", linear, (WEIGHT, NORMALIZE), "weighted average of the experts"))
register(MergeMethod("task_arithmetic", task_arithmetic, (WEIGHT, LAMBDA), "base + lambda * sum(w_i * tau_i)"))
register(MergeMethod("ties", ties, (WEIGHT, DENSITY, LAMBDA, NORMALIZE), "trim by magnitude, elect sign, disjoint mean"))
register(MergeMethod("dare_linear", dare_linear, (WEIGHT, DENSITY, LAMBDA, SEED), "random drop + rescale, then sum"))
register(
    MergeMethod("dare_ties", dare_ties, (WEIGHT, DENSITY, LAMBDA, NORMALIZE, SEED), "random drop + rescale, then TIES sign election")
)
register(
    MergeMethod(
        "breadcrumbs",
        breadcrumbs,
        (WEIGHT, DENSITY, ParamSpec("gamma", 0.0, 0.5, 0.01, help="fraction of largest entries dropped"), LAMBDA),
        "drop the largest gamma and the smallest entries, then sum",
    )
)
register(
    MergeMethod(
        "della",
        della,
        (WEIGHT, DENSITY, ParamSpec("epsilon", 0.0, 0.5, 0.1, help="spread of keep probabilities"), LAMBDA, NORMALIZE, SEED),
        "magnitude-ranked drop probabilities, rescale, TIES sign election",
    )
)
register(
    MergeMethod("slerp", slerp, (ParamSpec("t", 0.0, 1.0, 0.5, help="interpolation factor"),), "spherical interpolation of two models", max_models=2, elementwise=False)
)
register(MergeMethod("model_stock", model_stock, (), "geometry-derived interpolation towards the experts' mean", min_models=2, elementwise=False))
register(
    MergeMethod(
        "passthrough",
        passthrough,
        (ParamSpec("source", 0, 64, 0, integer=True, help="0 = base, i = expert i"),),
        "copy one source model's tensors",
    )
)


def apply_method(
    name: str, group: DeltaGroup, values: Mapping[str, object], out: Tensor | None = None, chunk_size: int | None = None
) -> Tensor:
    """Validate ``values`` for method ``name`` and merge ``group`` (into ``out`` if given).

    With ``chunk_size``, element-wise methods run over cache-sized chunks, which keeps the
    temporaries small (faster on CPU, less peak memory on GPU). Random methods draw per
    chunk, so their result depends on ``chunk_size`` (fixed per device, reproducible)."""
    method = get_method(name)
    checked = method.validate(values, group.n_models)
    device = group.deltas.device
    params: dict[str, object] = {
        k: (torch.tensor(v, dtype=torch.float32, device=device) if isinstance(v, list) else v) for k, v in checked.items()
    }
    if chunk_size and method.elementwise and group.numel > chunk_size:
        target = out if out is not None else torch.empty_like(group.base)
        for a, b, sub in group.chunks(chunk_size):
            piece = target[a:b]
            result = method.fn(sub, params, piece)
            if result is not piece:
                piece.copy_(result)
        return target
    result = method.fn(group, params, out)
    if out is not None and result is not out:
        out.copy_(result)
    return result

# more methods (mergekit's extra set, SVD family) register themselves on import
from evomerge.merge import methods_extra, svd  # noqa: E402,F401
