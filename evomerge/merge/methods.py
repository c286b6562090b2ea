"""Merge methods as pure functions of a ``DeltaGroup`` and validated parameters.

Every method returns the merged *weights* (not a delta) of shape ``[N]``. Per-model
parameters arrive as float64 tensors of shape ``[K]`` on the group's device (exact decimal
values, so kept-entry counts match ``int(d * n)``; cast with ``.to(dtype)`` before mixing
them with weights), shared parameters as Python numbers. Per-tensor semantics (magnitude ranks, angles) are per
segment of the group; see ``groups.py``.

To add a method: write ``def my_method(g: DeltaGroup, p: Params, out=None) -> Tensor`` and call
``register(MergeMethod(name=..., fn=my_method, params=(...)))`` (see docs/extending.md). To make it
exportable to mergekit, pass ``mergekit=MergekitSpec(...)``; without one the export
refuses the method with ``mergekit_reason``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.merge import kernels
from evomerge.merge.groups import DeltaGroup

Params = Mapping[str, "Tensor | float | int"]
_EPS = 1e-8
SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: linear interpolation (mergekit's value)


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


Sources = Literal["base+experts", "experts", "all", "pair"]


@dataclass(frozen=True)
class MergekitSpec:
    """How a method is written as a mergekit 0.1.5 config (declared next to the method).

    ``sources``: ``base+experts`` (base_model = base, every expert a source with its
    per-model parameters), ``experts`` (no base model; the experts are the sources),
    ``all`` (no base model; base and experts are sources) or ``pair`` (the two
    interpolation endpoints: base_model = first endpoint).
    ``fixed``: shared parameters always written (mergekit defaults differ from ours, so
    everything is explicit). ``skip``: our parameters mergekit has no counterpart for.
    ``check(params, n_models)`` returns a one-line reason when mergekit cannot express
    these (validated) parameters, else None. ``translate(params, n_models)`` may replace
    the default mapping; it returns ``(shared, {source: per-source params})`` with
    sources ``"base"`` or an expert index. ``rename``: our parameter name -> mergekit's.
    ``random``: masks are drawn, so the export reproduces the recipe only in distribution
    (and exactly at density 1).
    """

    method: str
    sources: Sources = "base+experts"
    fixed: Mapping[str, Any] = field(default_factory=dict)
    skip: tuple[str, ...] = ("seed",)
    check: Callable[[Mapping[str, Any], int], "str | None"] | None = None
    translate: Callable[[Mapping[str, Any], int], "tuple[dict, dict]"] | None = None
    rename: Mapping[str, str] = field(default_factory=dict)
    random: bool = False


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
    mergekit: MergekitSpec | None = None
    mergekit_reason: str = "mergekit has no equivalent method"

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
    if name not in REGISTRY:
        from evomerge.plugins import load_methods

        load_methods()  # methods of installed packages (entry point group evomerge.methods)
    try:
        return REGISTRY[name]
    except KeyError:
        raise MergeError(f"unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


# ---------------------------------------------------------------- building blocks


def _weighted(g: DeltaGroup, weight: Tensor, deltas: Tensor | None = None) -> Tensor:
    d = g.deltas if deltas is None else deltas
    return d * weight.to(d.dtype)[:, None]


def magnitude_mask(g: DeltaGroup, density: Tensor) -> Tensor:
    """Keep the top ``density`` fraction of each task vector by magnitude, per tensor:
    exactly ``floor(d * n)`` entries (at least one when d > 0, see ``keep_counts``; ties
    broken as in ``groups.py``); d >= 1 keeps all."""
    return g.top_mask(g.counts(density))


def top_kernel_args(g: DeltaGroup, counts: Tensor) -> dict[str, Any]:
    """Arguments of ``kernels.fused_merge`` keeping the ``counts`` largest entries."""
    if g.exact:
        return {"mode": kernels.RANK, "order": g.order_ranks("desc"), "cut_lo": torch.zeros_like(counts), "cut_hi": counts}
    thr, cut = g.cutoffs_for(counts)
    return {"mode": kernels.MAG, "lower": thr, "cut_lo": cut}


def band_kernel_args(g: DeltaGroup, top: Tensor, target: Tensor) -> dict[str, Any]:
    """Arguments of ``kernels.fused_merge`` for the breadcrumbs band (``DeltaGroup.band_mask``)."""
    if g.exact:
        n = g.sizes()[None, :]
        return {"mode": kernels.RANK, "order": g.order_ranks("asc"), "cut_lo": n - top - target, "cut_hi": n - top}
    lower, cut_lo = g.cutoffs_for(top + target)
    upper, cut_hi = g.cutoffs_for(top)
    return {"mode": kernels.BAND, "lower": lower, "upper": upper, "cut_lo": cut_lo, "cut_hi": cut_hi}


def trim_by_magnitude(g: DeltaGroup, density: Tensor, weight: Tensor) -> Tensor:
    """``w_k * delta_k`` where ``delta_k`` is in its tensor's top ``density_k``, else 0."""
    kept = g.deltas * magnitude_mask(g, density)
    return kept.mul_(weight.to(kept.dtype)[:, None])


def random_keep(g: DeltaGroup, keep_prob: Tensor, seed: int) -> Tensor:
    """DARE-style drop: keep each element with ``keep_prob`` and rescale by ``1/keep_prob``.

    ``keep_prob`` broadcasts against ``[K, N]``. The draws are the unit's resident noise
    (``DeltaGroup.noise``: common random numbers, the same for every candidate, chunk size
    and device). An element is kept iff its uniform ``u < keep_prob`` (``u`` on a 1/65536
    grid) and rescaled by ``1 / keep_prob`` (paper). ``keep_prob <= 0`` drops the element,
    ``keep_prob >= 1`` keeps it unchanged (exactly).
    """
    keep_prob = keep_prob.to(torch.float32)
    if keep_prob.numel() and bool((keep_prob >= 1).all()):
        return g.deltas.clone()
    levels = g.noise(seed)
    if keep_prob.shape[-1] == 1:
        thr, scale = _noise_threshold(keep_prob[:, 0])
        mask = levels < thr.clamp(max=32767).to(torch.int16)[:, None]
        full = thr >= 32768
        if bool(full.any()):
            mask[full] = True
        return (g.deltas * mask).mul_(scale.to(g.deltas.dtype)[:, None])
    u = (levels.to(torch.float32) + 32768.0) * kernels.LEVEL_SCALE
    kept = torch.where(u < keep_prob, g.deltas / keep_prob.clamp(min=_EPS).to(g.deltas.dtype), torch.zeros_like(g.deltas))
    return kept


def _noise_threshold(keep_prob: Tensor) -> tuple[Tensor, Tensor]:
    """Per-model ``(level threshold, rescale)``: ``level < ceil(p * 65536) - 32768`` is the
    same test as ``u < p``; survivors are multiplied by ``1 / p``."""
    p = keep_prob.to(torch.float32).double().clamp(0, 1)  # the float32 p the torch path compares with
    q = (p * 65536).ceil()
    scale = torch.where(p > 0, 1 / p.clamp(min=_EPS), torch.zeros_like(p))
    return q - 32768, scale


def mergekit_arithmetic(t: Tensor) -> bool:
    """bfloat16 / float16 task vectors: every step rounds, so the torch paths follow mergekit's
    own order of operations (``dtype:`` the pool's in the exported config) and give its bits;
    float32 / float64 keep the fused forms (they agree with mergekit to float rounding)."""
    return t.dtype in (torch.bfloat16, torch.float16)


def weighted_sum(deltas: Tensor, weight: Tensor) -> Tensor:
    """``sum_k w_k * deltas_k``: one matrix-vector product, or, in mergekit's arithmetic
    (``mergekit_arithmetic``), each product rounded and then summed over the models, column
    chunk by column chunk (a column's result depends only on its own entries)."""
    w = weight.to(deltas.dtype)
    if not mergekit_arithmetic(deltas):
        return w @ deltas
    out = torch.empty(deltas.shape[1:], dtype=deltas.dtype, device=deltas.device)
    for a in range(0, deltas.shape[1], _SUM_CHUNK):
        b = min(a + _SUM_CHUNK, deltas.shape[1])
        torch.sum(deltas[:, a:b] * w[:, None], dim=0, out=out[a:b])
    return out


_SUM_CHUNK = 1 << 20  # columns per temporary [K, chunk] product in mergekit's arithmetic


def sign_consensus(weighted: Tensor, weight: Tensor, normalize: bool) -> Tensor:
    """TIES: elect a sign per element by total mass, keep agreeing entries, average them."""
    majority = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)  # ties go to +, as in mergekit
    # entries pointing the majority's way are > 0 after this product; zeros never agree
    aligned = (weighted * majority).clamp_(min=0)
    merged = aligned.sum(0).mul_(majority)
    if normalize:
        agree = (aligned > 0).to(weighted.dtype)
        if mergekit_arithmetic(weighted):  # mergekit: (weights * mask).sum(0)
            divisor = (weight.to(weighted.dtype)[:, None] * agree).sum(0)
        else:
            divisor = weight.to(weighted.dtype) @ agree
        merged = merged.div_(torch.where(divisor == 0, torch.ones_like(divisor), divisor))  # as mergekit
    return merged


def _finish(g: DeltaGroup, merged_delta: Tensor, p: Params, out: Tensor | None = None) -> Tensor:
    """base + lambda * merged_delta, written into ``out`` when given (saves one pass)."""
    alpha = float(p.get("lambda", 1.0))
    if mergekit_arithmetic(merged_delta):  # mergekit: delta *= lambda (when not 1), then base + delta
        if alpha != 1:
            merged_delta = merged_delta * alpha
        alpha = 1.0
    if out is None:
        return torch.add(g.base, merged_delta, alpha=alpha)
    return torch.add(g.base, merged_delta, alpha=alpha, out=out)


def _weighted_sum(g: DeltaGroup, weight: Tensor) -> Tensor:
    """sum_i w_i * delta_i (``weighted_sum``)."""
    return weighted_sum(g.deltas, weight)


# ---------------------------------------------------------------- methods


def linear(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    w = p["weight"]
    total = float(w.sum())
    if p["normalize"] and abs(total) > _EPS:
        return _finish(g, _weighted_sum(g, w / total), {}, out)
    return total * g.base + _weighted_sum(g, w)


def task_arithmetic(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    if mergekit_arithmetic(g.deltas):
        return _finish(g, _weighted_sum(g, p["weight"]), p, out)
    # one fused pass: out = base + deltas^T (lambda * w)
    scaled = (p["weight"] * float(p.get("lambda", 1.0))).to(g.deltas.dtype)
    if out is None:
        return torch.addmv(g.base, g.deltas.t(), scaled)
    return torch.addmv(g.base, g.deltas.t(), scaled, out=out)


def ties(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    w = p["weight"]
    if kernels.available(g.base, g.deltas):
        return kernels.fused_merge(
            g.base, g.deltas, g.segments, weight=w, consensus=True, normalize=bool(p["normalize"]), lam=_lambda(p), out=out,
            **top_kernel_args(g, g.counts(p["density"])),
        )
    trimmed = trim_by_magnitude(g, p["density"], w)
    return _finish(g, sign_consensus(trimmed, w, bool(p["normalize"])), p, out)


def _lambda(p: Params) -> float:
    return float(p.get("lambda", 1.0))


def _dare(g: DeltaGroup, p: Params, out: Tensor | None, consensus: bool) -> Tensor:
    w, seed = p["weight"], int(p["seed"])
    if kernels.available(g.base, g.deltas):
        thr, scale = _noise_threshold(p["density"])
        k, s = g.n_models, len(g.segments)
        return kernels.fused_merge(
            g.base, g.deltas, g.segments, kernels.NOISE, w, thr[:, None].expand(k, s), scale=scale[:, None].expand(k, s),
            levels=g.noise(seed), consensus=consensus, normalize=consensus and bool(p["normalize"]), lam=_lambda(p), out=out,
        )
    kept = random_keep(g, p["density"][:, None], seed)
    if not consensus:
        return _finish(g, weighted_sum(kept, w), p, out)
    return _finish(g, sign_consensus(_weighted(g, w, kept), w, bool(p["normalize"])), p, out)


def dare_linear(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    return _dare(g, p, out, consensus=False)


def dare_ties(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    return _dare(g, p, out, consensus=True)


for _fn in (ties, dare_linear, dare_ties):
    _fn.streams = True  # type: ignore[attr-defined]  # runs as one fused kernel on the CPU


def breadcrumbs_band(g: DeltaGroup, density: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """``(top, target)`` ``[K, S]`` counts of the breadcrumbs mask: the ``top`` largest
    entries are cut, the next ``target`` kept (``DeltaGroup.band_mask``).

    Counts follow mergekit: keep ``t = floor(d * n)`` entries, cut the ``min(floor(gamma * n),
    n - t)`` largest (the outlier cut shrinks when ``density + gamma > 1``, so the kept
    fraction is always ``density``); density >= 1 keeps everything.
    """
    d = density.double()[:, None]
    n = g.sizes()[None, :].double()  # of the whole tensors (chunks share them)
    target = torch.where(d >= 1, n, (d.clamp(min=0) * n).floor())  # no "at least one" here, as mergekit
    top = torch.minimum((float(gamma) * n).floor(), n - target)
    return top, target


def banded_merge(g: DeltaGroup, p: Params, out: Tensor | None, consensus: bool) -> Tensor:
    """Breadcrumbs mask (``p["gamma"]``, default 0 = plain magnitude trim), weights, then a
    sum or TIES sign election (normalised when ``p["normalize"]``), times ``lambda``."""
    w = p["weight"]
    top, target = breadcrumbs_band(g, p["density"], float(p.get("gamma", 0.0)))
    normalize = consensus and bool(p.get("normalize", 0))
    if kernels.available(g.base, g.deltas):
        return kernels.fused_merge(
            g.base, g.deltas, g.segments, weight=w, consensus=consensus, normalize=normalize, lam=_lambda(p), out=out,
            **band_kernel_args(g, top, target),
        )
    kept = g.deltas * g.band_mask(top, target)
    if not consensus:
        return _finish(g, weighted_sum(kept, w), p, out)
    return _finish(g, sign_consensus(kept.mul_(w.to(kept.dtype)[:, None]), w, normalize), p, out)


def breadcrumbs(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Keep ``density`` of each task vector after cutting the largest ``gamma`` (outliers),
    then the weighted sum (counts: ``breadcrumbs_band``)."""
    return banded_merge(g, p, out, consensus=False)


def della_epsilon(density: Tensor, epsilon: float) -> Tensor:
    """Spread actually used per model: ``min(epsilon, d, 1 - d)``, so every keep probability
    stays in [0, 1] and their mean stays ``d`` (the paper requires ``d +- eps`` in range);
    at density 1 (or 0) the spread is 0 and DELLA is exactly a no-op (or drops all)."""
    d = density.double().clamp(0, 1)
    return torch.minimum(torch.minimum(torch.full_like(d, float(epsilon)), d), 1 - d)


def della(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """DELLA: keep probability rises linearly with magnitude rank within
    ``[density - eps, density + eps]`` (``eps`` from ``della_epsilon``); survivors are
    rescaled by ``1 / keep_prob`` (paper), then TIES consensus."""
    eps = della_epsilon(p["density"], float(p["epsilon"])).to(torch.float32)
    density = p["density"].to(torch.float32).clamp(0, 1)
    w, seed = p["weight"], int(p["seed"])
    if kernels.available(g.base, g.deltas):
        k, s = g.n_models, len(g.segments)
        return kernels.fused_merge(
            g.base, g.deltas, g.segments, kernels.DELLA, w, (density - eps)[:, None].expand(k, s), (2 * eps)[:, None].expand(k, s),
            levels=g.noise(seed), ranks=g.ranks(), consensus=True, normalize=bool(p["normalize"]), lam=_lambda(p), out=out,
        )
    if bool((eps == 0).all()):
        keep_prob = density[:, None]
    else:
        rank = (g.ranks().to(torch.float32) + 32768.0) * kernels.RANK_SCALE
        keep_prob = (density - eps)[:, None] + (2 * eps)[:, None] * rank
    kept = _weighted(g, w, random_keep(g, keep_prob, seed))
    return _finish(g, sign_consensus(kept, w, bool(p["normalize"])), p, out)


def _endpoints(g: DeltaGroup) -> tuple[Tensor, Tensor]:
    if g.n_models == 1:
        return g.base, g.base + g.deltas[0]
    return g.base + g.deltas[0], g.base + g.deltas[1]


breadcrumbs.streams = True  # type: ignore[attr-defined]
della.streams = True  # type: ignore[attr-defined]


def _slerp_angles(g: DeltaGroup) -> tuple[Tensor, Tensor]:
    """Per-tensor angle between the endpoints and the (anti)parallel flag (genome-independent)."""
    a, b = _endpoints(g)
    dot = g.segment_sum(a * b)
    norms = (g.segment_sum(a * a) * g.segment_sum(b * b)).sqrt().clamp(min=_EPS)
    cos = (dot / norms).clamp(-1, 1)
    # nearly (anti)parallel tensors interpolate linearly, with mergekit's threshold
    nearly_parallel = cos.abs() > SLERP_DOT_THRESHOLD
    theta = torch.arccos(torch.where(nearly_parallel, torch.zeros_like(cos), cos))
    return theta.double(), nearly_parallel


def slerp(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Spherical interpolation per tensor between expert 0 and expert 1 (or base and
    expert 0 when there is only one expert); ``t=0`` gives the first endpoint.

    The angles are cached per unit; a candidate then costs one fused pass per tensor:
    ``(s0 + s1) * base + s0 * delta_0 + s1 * delta_1`` (``s0 * base + s1 * (base + delta_0)``
    with one expert)."""
    t = float(p["t"])
    theta, parallel = g.cached("slerp", lambda: _slerp_angles(g))
    sin = torch.where(parallel, torch.ones_like(theta), torch.sin(theta))
    s0 = torch.where(parallel, torch.full_like(theta, 1 - t), torch.sin((1 - t) * theta) / sin)
    s1 = torch.where(parallel, torch.full_like(theta, t), torch.sin(t * theta) / sin)
    if g.n_models == 1:
        coeffs = torch.stack([s1])  # [1, S]
    else:
        coeffs = torch.stack([s0, s1])
    return _per_segment_addmv(g, (s0 + s1).tolist(), coeffs, out)


def _per_segment_addmv(g: DeltaGroup, beta: list[float], coeffs: Tensor, out: Tensor | None) -> Tensor:
    """``out_s = beta_s * base_s + sum_k coeffs[k, s] * deltas[k]_s`` per segment, one pass each."""
    target = out if out is not None else torch.empty_like(g.base)
    k = coeffs.shape[0]
    cols = coeffs.to(g.deltas.dtype).t().contiguous()  # [S, k]
    start = 0
    for s, n in enumerate(g.segments):
        end = start + n
        torch.addmv(g.base[start:end], g.deltas[:k, start:end].t(), cols[s], beta=beta[s], out=target[start:end])
        start = end
    return target


def _model_stock_factors(g: DeltaGroup) -> Tensor:
    """Per-tensor ``t = K cos / (1 + (K - 1) cos)`` (genome-independent)."""
    k = g.n_models
    norms = g.segment_sum(g.deltas * g.deltas).sqrt()  # [K, S]
    pair_cos = []
    for i in range(k):
        for j in range(i + 1, k):
            dot = g.segment_sum(g.deltas[i] * g.deltas[j])
            pair_cos.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(pair_cos).mean(0)
    denominator = 1 + (k - 1) * cos
    # at the singularity (mean cosine -1/(K-1)) there is no finite estimate: keep the base
    singular = denominator.abs() < 1e-6
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(cos), denominator))


def model_stock(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Model Stock: interpolate between the experts' mean and the base by
    ``t = K cos / (1 + (K - 1) cos)``, cos = mean pairwise cosine of task vectors, per tensor.
    ``t`` is cached per unit; a candidate costs one fused pass per tensor."""
    t = g.cached("model_stock", lambda: _model_stock_factors(g))  # [S]
    coeffs = (t / g.n_models).expand(g.n_models, -1)
    return _per_segment_addmv(g, [1.0] * len(g.segments), coeffs, out)


def passthrough(g: DeltaGroup, p: Params, out: Tensor | None = None) -> Tensor:
    """Copy one source unchanged: 0 = base, i = expert i (1-based)."""
    source = int(p["source"])
    if source > g.n_models:
        raise MergeError(f"'passthrough.source' = {source} but there are only {g.n_models} experts")
    return g.base.clone() if source == 0 else g.base + g.deltas[source - 1]


# ---------------------------------------------------------------- mergekit export


def _linear_check(p: Mapping[str, Any], n_models: int) -> str | None:
    if p["normalize"] and abs(sum(p["weight"])) < _EPS:
        return "normalize with weights summing to 0 divides by 0 in mergekit"
    return None


def della_check(p: Mapping[str, Any], n_models: int) -> str | None:
    eps = float(p["epsilon"])
    for i, d in enumerate(p["density"]):
        if 0 < d < 1 and not (d - eps > 0 and d + eps < 1):
            return f"mergekit needs density +- epsilon inside (0, 1), expert {i} has density {d:g}, epsilon {eps:g}"
    return None


def _passthrough_as_linear(p: Mapping[str, Any], n_models: int) -> tuple[dict, dict]:
    # mergekit's passthrough takes one source per slice, so a per-group choice of source is
    # written as a linear merge with one-hot weights (1 * x + 0 * y = x exactly)
    source = int(p["source"])
    if source > n_models:
        raise MergeError(f"'passthrough.source' = {source} but there are only {n_models} experts")
    keys: list[Any] = ["base", *range(n_models)]
    return {"normalize": False}, {key: {"weight": 1.0 if j == source else 0.0} for j, key in enumerate(keys)}


# ---------------------------------------------------------------- registry

WEIGHT = ParamSpec("weight", -1.0, 2.0, 1.0, per_model=True, help="scale of each task vector")
DENSITY = ParamSpec("density", 0.0, 1.0, 1.0, per_model=True, help="fraction of each task vector kept")
LAMBDA = ParamSpec("lambda", 0.0, 3.0, 1.0, help="global scale of the merged task vector")
NORMALIZE = ParamSpec("normalize", 0, 1, 1, integer=True, searchable=False, help="divide by the summed weights")
SEED = ParamSpec("seed", 0, 2**31 - 1, 0, integer=True, searchable=False, help="seed of random drops")

register(
    MergeMethod(
        "linear", linear, (WEIGHT, NORMALIZE), "weighted average of the experts",
        mergekit=MergekitSpec("linear", sources="experts", check=_linear_check),
    )
)
register(
    MergeMethod(
        "task_arithmetic", task_arithmetic, (WEIGHT, LAMBDA), "base + lambda * sum(w_i * tau_i)",
        mergekit=MergekitSpec("task_arithmetic", fixed={"normalize": False, "rescale": False}),
    )
)
register(
    MergeMethod(
        "ties", ties, (WEIGHT, DENSITY, LAMBDA, NORMALIZE), "trim by magnitude, elect sign, disjoint mean",
        mergekit=MergekitSpec("ties", fixed={"rescale": False}),
    )
)
register(
    MergeMethod(
        "dare_linear", dare_linear, (WEIGHT, DENSITY, LAMBDA, SEED), "random drop + rescale, then sum",
        mergekit=MergekitSpec("dare_linear", fixed={"normalize": False, "rescale": True}, random=True),
    )
)
register(
    MergeMethod(
        "dare_ties", dare_ties, (WEIGHT, DENSITY, LAMBDA, NORMALIZE, SEED), "random drop + rescale, then TIES sign election",
        mergekit=MergekitSpec("dare_ties", fixed={"rescale": True}, random=True),
    )
)
register(
    MergeMethod(
        "breadcrumbs",
        breadcrumbs,
        (WEIGHT, DENSITY, ParamSpec("gamma", 0.0, 0.5, 0.01, help="fraction of largest entries dropped"), LAMBDA),
        "drop the largest gamma and the smallest entries, then sum",
        mergekit=MergekitSpec("breadcrumbs", fixed={"normalize": False, "rescale": False}),
    )
)
register(
    MergeMethod(
        "della",
        della,
        (WEIGHT, DENSITY, ParamSpec("epsilon", 0.0, 0.5, 0.1, help="spread of keep probabilities"), LAMBDA, NORMALIZE, SEED),
        "magnitude-ranked drop probabilities, rescale, TIES sign election",
        mergekit=MergekitSpec("della", fixed={"rescale": True}, check=della_check, random=True),
    )
)
register(
    MergeMethod(
        "slerp", slerp, (ParamSpec("t", 0.0, 1.0, 0.5, help="interpolation factor"),), "spherical interpolation of two models",
        max_models=2, elementwise=False, mergekit=MergekitSpec("slerp", sources="pair"),
    )
)
register(
    MergeMethod(
        "model_stock", model_stock, (), "geometry-derived interpolation towards the experts' mean", min_models=2,
        elementwise=False, mergekit=MergekitSpec("model_stock", fixed={"filter_wise": False}),
    )
)
register(
    MergeMethod(
        "passthrough",
        passthrough,
        (ParamSpec("source", 0, 64, 0, integer=True, help="0 = base, i = expert i"),),
        "copy one source model's tensors",
        mergekit=MergekitSpec("linear", sources="all", translate=_passthrough_as_linear),
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
        k: (torch.tensor(v, dtype=torch.float64, device=device) if isinstance(v, list) else v) for k, v in checked.items()
    }
    # the fused CPU kernels stream the whole unit block by block (no temporaries to bound);
    # chunk views would also make their inputs strided, which stops them vectorising
    streams = getattr(method.fn, "streams", False) and kernels.available(group.base, group.deltas)
    if chunk_size and method.elementwise and group.numel > chunk_size and not streams:
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
        return out
    # a method computing in float64 (its parameters are float64 tensors) still merges in the pool's dtype
    return result if result.dtype == group.base.dtype else result.to(group.base.dtype)

# more methods (mergekit's extra set, SVD family) register themselves on import
from evomerge.merge import methods_extra, svd  # noqa: E402,F401
