"""Merge methods against hand-computed tensors, plus properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import MergeError
from evomerge.merge.groups import DeltaGroup, MagnitudeTable, keep_counts
from evomerge.merge.methods import REGISTRY, apply_method, della_epsilon, get_method, random_keep, trim_by_magnitude

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
D1 = torch.tensor([1.0, -2.0, 3.0, -4.0])
D2 = torch.tensor([-1.0, 1.5, 0.5, 2.0])


def group(*deltas, base=BASE, **kw):
    return DeltaGroup(base=base.clone(), deltas=torch.stack(list(deltas)), segments=(base.numel(),), **kw)


def close(a, b):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ hand-computed


def test_task_arithmetic_hand_computed():
    out = apply_method("task_arithmetic", group(D1, D2), {"weight": [1.0, 0.5]})
    close(out, BASE + torch.tensor([0.5, -1.25, 3.25, -3.0]))
    out = apply_method("task_arithmetic", group(D1, D2), {"weight": [1.0, 0.5], "lambda": 2.0})
    close(out, BASE + 2 * torch.tensor([0.5, -1.25, 3.25, -3.0]))


def test_linear_is_weighted_average_of_experts():
    out = apply_method("linear", group(D1, D2), {"weight": [0.5, 1.5]})
    expected = (0.5 * (BASE + D1) + 1.5 * (BASE + D2)) / 2
    close(out, expected)
    close(out, BASE + torch.tensor([-0.5, 0.625, 1.125, 0.5]))


def test_ties_hand_computed():
    # top-50% by magnitude: D1 -> [0, 0, 3, -4]; D2 -> [0, 1.5, 0, 2]
    # weighted (w = 2, 1): [0,0,6,-8] + [0,1.5,0,2] = [0, 1.5, 6, -6] -> signs [+, +, +, -]
    # agreeing entries: D1 at 2, 3; D2 at 1 -> sums [0, 1.5, 6, -8], weights [-, 1, 2, 2]
    g = group(D1, D2)
    out = apply_method("ties", g, {"weight": [2.0, 1.0], "density": [0.5, 0.5]})
    close(out, BASE + torch.tensor([0.0, 1.5, 3.0, -4.0]))
    out = apply_method("ties", g, {"weight": [2.0, 1.0], "density": [0.5, 0.5], "normalize": 0})
    close(out, BASE + torch.tensor([0.0, 1.5, 6.0, -8.0]))


def test_breadcrumbs_hand_computed():
    # gamma 0.25 drops the largest entry, density 0.5 keeps the next two
    # D1: drop -4, keep -2, 3; D2: drop 2, keep 1.5, -1
    out = apply_method("breadcrumbs", group(D1, D2), {"weight": [1.0, 1.0], "density": [0.5, 0.5], "gamma": 0.25})
    close(out, BASE + torch.tensor([-1.0, -0.5, 3.0, 0.0]))


def test_breadcrumbs_outlier_cut_shrinks_to_keep_density():
    # density 0.75 keeps 3 of 4; gamma 0.5 would cut 2, but only 4 - 3 = 1 can go (mergekit's rule)
    g = group(D1, base=BASE)
    out = apply_method("breadcrumbs", g, {"weight": [1.0], "density": [0.75], "gamma": 0.5})
    close(out, BASE + torch.tensor([1.0, -2.0, 3.0, 0.0]))
    # density 1 keeps everything: no outlier cut at all
    close(apply_method("breadcrumbs", g, {"weight": [1.0], "density": [1.0], "gamma": 0.5}), BASE + D1)


def test_della_spread_shrinks_to_stay_in_range():
    eps = della_epsilon(torch.tensor([0.95, 0.05, 1.0, 0.5], dtype=torch.float64), 0.2)
    close(eps, [0.05, 0.05, 0.0, 0.2])
    torch.manual_seed(8)
    delta = torch.randn(20000)
    out = apply_method("della", group(delta, base=torch.zeros(20000)), {"weight": [1.0], "density": [0.9], "epsilon": 0.4, "seed": 1})
    # mean keep rate stays the density (clamping 0.5..1.3 instead would keep ~84%)
    assert abs((out != 0).float().mean().item() - 0.9) < 0.01


def test_slerp_hand_computed_orthogonal():
    base = torch.zeros(2)
    g = group(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), base=base)
    close(apply_method("slerp", g, {"t": 0.5}), [math.sqrt(0.5), math.sqrt(0.5)])
    close(apply_method("slerp", g, {"t": 0.0}), [1.0, 0.0])
    close(apply_method("slerp", g, {"t": 1.0}), [0.0, 1.0])


def test_model_stock_hand_computed():
    base = torch.tensor([0.5, 0.5])
    g = group(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), base=base)
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    close(apply_method("model_stock", g, {}), base + t * torch.tensor([1.0, 0.5]))


def test_passthrough_copies_one_source():
    g = group(D1, D2)
    close(apply_method("passthrough", g, {"source": 0}), BASE)
    close(apply_method("passthrough", g, {"source": 2}), BASE + D2)


def test_dare_keeps_rescaled_entries_only():
    torch.manual_seed(0)
    delta = torch.randn(4000)
    g = group(delta, base=torch.zeros(4000))
    out = apply_method("dare_linear", g, {"weight": [1.0], "density": [0.25], "seed": 3})
    kept = out != 0
    close(out[kept], delta[kept] / 0.25)
    assert abs(kept.float().mean().item() - 0.25) < 0.03


# ------------------------------------------------------------------ properties


@given(
    w=st.floats(0.1, 2.0),
    values=st.lists(st.floats(-5, 5, allow_nan=False).filter(lambda v: abs(v) > 1e-3), min_size=1, max_size=12),
)
@settings(max_examples=40, deadline=None)
def test_ties_density_one_single_model_is_task_arithmetic(w, values):
    g = group(torch.tensor(values), base=torch.zeros(len(values)))
    ta = apply_method("task_arithmetic", g, {"weight": [w]})
    close(apply_method("ties", g, {"weight": [w], "density": [1.0], "normalize": 0}), ta)
    # with normalisation the weight cancels out; it equals task arithmetic at w = 1
    close(apply_method("ties", g, {"weight": [1.0], "density": [1.0]}), apply_method("task_arithmetic", g, {"weight": [1.0]}))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_density_one_is_task_arithmetic(method):
    torch.manual_seed(1)
    g = group(torch.randn(50), base=torch.randn(50))  # one expert: no sign conflicts
    params = {"weight": [1.0], "density": [1.0], "seed": 7}
    close(apply_method(method, g, params), apply_method("task_arithmetic", g, {"weight": [1.0]}))


def test_dare_seeds_reproducible_and_distinct():
    torch.manual_seed(2)
    g = group(torch.randn(200), torch.randn(200), base=torch.zeros(200))
    p = {"weight": [0.7, 0.4], "density": [0.3, 0.6]}
    a = apply_method("dare_ties", g, {**p, "seed": 5})
    b = apply_method("dare_ties", g, {**p, "seed": 5})
    c = apply_method("dare_ties", g, {**p, "seed": 6})
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_della_without_spread_is_dare_ties():
    torch.manual_seed(3)
    g = group(torch.randn(300), torch.randn(300), base=torch.zeros(300))
    p = {"weight": [0.7, 0.4], "density": [0.3, 0.6], "seed": 11}
    close(apply_method("della", g, {**p, "epsilon": 0.0}), apply_method("dare_ties", g, p))


def test_della_keeps_large_entries_more_often():
    torch.manual_seed(4)
    delta = torch.randn(20000)
    g = group(delta, base=torch.zeros(20000))
    out = apply_method("della", g, {"weight": [1.0], "density": [0.5], "epsilon": 0.4, "seed": 0})
    big = delta.abs() > delta.abs().median()
    assert (out[big] != 0).float().mean() > (out[~big] != 0).float().mean() + 0.2


def test_multi_segment_group_equals_per_tensor_merges():
    torch.manual_seed(5)
    a_base, b_base = torch.randn(7), torch.randn(12)
    a_d, b_d = torch.randn(2, 7), torch.randn(2, 12)
    joint = DeltaGroup(torch.cat([a_base, b_base]), torch.cat([a_d, b_d], dim=1), segments=(7, 12))
    params = {"weight": [0.8, 0.6], "density": [0.4, 0.7]}
    for method, p in [("ties", params), ("breadcrumbs", {**params, "gamma": 0.1}), ("slerp", {"t": 0.3}), ("model_stock", {})]:
        merged = apply_method(method, joint, p)
        alone = torch.cat(
            [apply_method(method, DeltaGroup(a_base, a_d, (7,)), p), apply_method(method, DeltaGroup(b_base, b_d, (12,)), p)]
        )
        close(merged, alone)


def mergekit_count(density: float, n: int) -> int:
    """mergekit's kept count for TIES: int(d * n), at least one, all at d >= 1."""
    if density >= 1:
        return n
    return 0 if density <= 0 else max(1, int(density * n))


@given(density=st.floats(0.0, 1.0), n=st.integers(1, 3000))
@settings(max_examples=40, deadline=None)
def test_magnitude_table_keeps_about_density(density, n):
    torch.manual_seed(n)
    deltas = torch.randn(1, n)
    table = MagnitudeTable(deltas, (n,), table_size=256)
    kept = int((deltas.abs() >= table.threshold(torch.tensor([density], dtype=torch.float64))).sum())
    target = mergekit_count(density, n)
    assert abs(kept - target) <= max(1, math.ceil(n / 256))
    if n <= 256 or density in (0.0, 1.0):
        assert kept == target  # exact for small tensors, and for all / nothing


@pytest.mark.parametrize("density, n, expected", [(0.7, 10, 7), (0.3, 10, 3), (0.29, 100, 28), (0.001, 10, 1), (0.999, 5, 4)])
def test_kept_count_is_floor_with_at_least_one(density, n, expected):
    # float32(0.7) * 10 = 6.99999988 would floor to 6; the count uses the float64 value,
    # exactly like mergekit's int(d * n) (which gives 28 for 0.29 * 100 = 28.999999999999996)
    assert keep_counts(torch.tensor([density], dtype=torch.float64), torch.tensor([n]))[0, 0] == expected
    g = group(torch.arange(1.0, n + 1), base=torch.zeros(n))
    out = apply_method("ties", g, {"weight": [1.0], "density": [density]})
    assert int((out != 0).sum()) == expected


SIZES = st.sampled_from([1, 2, 3, 7, 255, 4095, 4096, 4097, 5001, 8193, 12289])


def _deltas(k: int, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(k, n, generator=gen)
    d[:, ::7] = 0.0  # exact zeros and repeated magnitudes must be kept too
    d[:, 1::11] = 0.5
    return d


@given(n=SIZES, k=st.integers(1, 3), seed=st.integers(0, 2**16), extra=st.integers(0, 2))
@settings(max_examples=30, deadline=None)
def test_density_one_trimming_is_exactly_a_no_op(n, k, seed, extra):
    """At density 1 TIES / breadcrumbs / DARE / DELLA keep every entry bit for bit, on
    tensors of every size (the approximate table starts above 4096 elements)."""
    deltas = _deltas(k, n, seed)
    sizes = (n,) if not extra else (n, 3 + extra * 1000)  # multi-segment groups too
    if extra:
        deltas = torch.cat([deltas, _deltas(k, sizes[1], seed + 1)], dim=1)
    g = DeltaGroup(torch.zeros(deltas.shape[1]), deltas, segments=sizes)
    ones, w = torch.ones(k, dtype=torch.float64), torch.ones(k)
    assert torch.equal(trim_by_magnitude(g, ones, w), deltas)
    assert torch.equal(random_keep(g, ones[:, None], seed), deltas)
    # whole methods with one expert and weight 1: exactly base + delta
    single = DeltaGroup(torch.zeros(deltas.shape[1]), deltas[:1], segments=sizes)
    expected = deltas[0]
    for method, params in [
        ("ties", {"normalize": 0}),
        ("breadcrumbs", {"gamma": 0.3}),
        ("dare_linear", {"seed": seed}),
        ("dare_ties", {"normalize": 0, "seed": seed}),
        ("della", {"epsilon": 0.4, "normalize": 0, "seed": seed}),
    ]:
        out = apply_method(method, single, {"weight": [1.0], "density": [1.0], **params}, chunk_size=1000)
        assert torch.equal(out, expected), method


@given(n=SIZES, seed=st.integers(0, 2**16))
@settings(max_examples=20, deadline=None)
def test_density_zero_keeps_nothing(n, seed):
    g = DeltaGroup(torch.zeros(n), _deltas(2, n, seed), segments=(n,))
    zero = torch.zeros(2, dtype=torch.float64)
    assert not trim_by_magnitude(g, zero, torch.ones(2)).any()
    assert not random_keep(g, zero[:, None], seed).any()


def test_out_buffer_is_written_in_place():
    g = group(D1, D2)
    out = torch.empty(4)
    for name in REGISTRY:
        method = get_method(name)
        if method.min_models > 2:
            continue
        result = apply_method(name, g, {}, out=out)
        assert torch.equal(out, result)


# ------------------------------------------------------------------ bad input


def test_unknown_method_is_a_clear_error():
    with pytest.raises(MergeError, match="unknown merge method 'tiez'.*ties"):
        apply_method("tiez", group(D1), {})


@pytest.mark.parametrize(
    "params, message",
    [
        ({"weight": [5.0, 1.0]}, r"weight' = 5.0 is out of bounds"),
        ({"weight": [1.0]}, "one value per expert model"),
        ({"weight": [1.0, "x"]}, "must be a number"),
        ({"wieght": [1.0, 1.0]}, "has no parameter 'wieght'"),
        ({"weight": [1.0, float("nan")]}, "out of bounds"),
    ],
)
def test_bad_parameters_are_clear_errors(params, message):
    with pytest.raises(MergeError, match=message):
        apply_method("task_arithmetic", group(D1, D2), params)


def test_slerp_refuses_three_models():
    with pytest.raises(MergeError, match="slerp' needs 1..2 expert models, got 3"):
        apply_method("slerp", group(D1, D2, D1), {})


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_merge_equals_whole_merge(chunk):
    torch.manual_seed(6)
    g = DeltaGroup(torch.randn(30), torch.randn(3, 30), segments=(7, 12, 11))
    p = {"weight": [0.8, 0.6, 0.3], "density": [0.4, 0.7, 0.5]}
    for method, params in [("task_arithmetic", p | {}), ("ties", p), ("breadcrumbs", {**p, "gamma": 0.1}), ("linear", {"weight": p["weight"]}), ("slerp", {"t": 0.3})]:
        if method == "slerp":
            g2 = DeltaGroup(g.base, g.deltas[:2], g.segments)
            close(apply_method(method, g2, params, chunk_size=chunk), apply_method(method, g2, params))
            continue
        params = {k: v for k, v in params.items() if method != "task_arithmetic" or k == "weight"}
        close(apply_method(method, g, params, chunk_size=chunk), apply_method(method, g, params))


def test_chunked_random_merges_are_reproducible():
    torch.manual_seed(7)
    g = DeltaGroup(torch.randn(100), torch.randn(2, 100), segments=(40, 60))
    p = {"weight": [0.5, 0.5], "density": [0.5, 0.5], "seed": 1}
    for method in ("dare_ties", "della"):
        a = apply_method(method, g, p, chunk_size=16)
        assert torch.equal(a, apply_method(method, g, p, chunk_size=16))
        kept = (a - g.base) != 0
        assert 0.3 < kept.float().mean() < 0.9


# ------------------------------------------------------------------ fused kernels, common random numbers

ELEMENTWISE = [
    ("ties", {"density": [0.4, 0.7, 1.0], "normalize": 1}),
    ("ties", {"density": [0.2, 0.5, 0.9], "normalize": 0, "lambda": 1.3}),
    ("breadcrumbs", {"density": [0.5, 0.8, 1.0], "gamma": 0.1}),
    ("dare_linear", {"density": [0.3, 0.6, 1.0], "seed": 4}),
    ("dare_ties", {"density": [0.3, 0.6, 0.9], "seed": 4}),
    ("della", {"density": [0.4, 0.6, 1.0], "epsilon": 0.2, "seed": 9}),
]


def _unit():
    torch.manual_seed(10)
    # segments above and below the table size; an odd-sized one
    return DeltaGroup(torch.randn(6001), torch.randn(3, 6001), segments=(5000, 1000, 1))


@pytest.mark.parametrize("method, params", ELEMENTWISE)
def test_fused_kernel_equals_torch_path(method, params, monkeypatch):
    from evomerge.merge import kernels

    if not kernels.available(torch.zeros(1)):
        pytest.skip("numba kernels unavailable")
    p = {"weight": [0.8, -0.3, 0.6], **params}
    fused = apply_method(method, _unit(), p)
    monkeypatch.setattr(kernels, "available", lambda *t: False)
    plain = apply_method(method, _unit(), p)
    close(fused, plain)
    assert torch.equal(fused == _unit().base, plain == _unit().base)  # same entries dropped


THREADS_PROBE = """
import sys, torch
if sys.argv[1] == "set":
    torch.set_num_threads(1)
from evomerge.merge import kernels
from evomerge.merge.methods import apply_method
from evomerge.merge.groups import DeltaGroup
assert kernels.available(torch.zeros(1))
before = torch.get_num_threads()
torch.manual_seed(0)
unit = DeltaGroup(torch.randn(50_000), torch.randn(2, 50_000), segments=(50_000,))
one = apply_method("ties", unit, {"weight": [1.0, 1.0], "density": [0.5, 0.5]})
print(before, torch.get_num_threads(), float(one.sum()))
"""


@pytest.mark.parametrize("how", ["env", "set"])
def test_fused_kernels_leave_torch_on_its_thread_count(how, tmp_path):
    """numba's OpenMP pool (4 threads here) shares torch's libgomp: its launch must not move
    torch off the one thread it was told to use (by OMP_NUM_THREADS or set_num_threads)."""
    import os
    import subprocess
    import sys

    from evomerge.merge import kernels

    if not kernels.available(torch.zeros(1)):
        pytest.skip("numba kernels unavailable")
    env = {**os.environ, "NUMBA_NUM_THREADS": "4", "NUMBA_CACHE_DIR": str(tmp_path)}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("MKL_NUM_THREADS", None)
    if how == "env":
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", THREADS_PROBE, how], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, _ = out.stdout.split()
    assert (before, after) == ("1", "1")


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "della"])
def test_random_merges_do_not_depend_on_chunk_size(method, monkeypatch):
    """The noise is drawn once per unit and seed, so chunked merges (any size, fused or
    torch path) drop exactly the same entries as the whole-unit merge."""
    from evomerge.merge import kernels

    p = {"weight": [0.5, 0.9, 0.4], "density": [0.3, 0.6, 0.8], "seed": 3}
    if method == "della":
        p["epsilon"] = 0.15
    g = _unit()
    whole = apply_method(method, g, p)  # the fused kernel where available (whole unit)
    monkeypatch.setattr(kernels, "available", lambda *t: False)  # the torch path, chunked
    plain = apply_method(method, g, p)
    torch.testing.assert_close(plain, whole, rtol=1e-5, atol=1e-6)
    for chunk in (7, 999, 1000, 4096):
        assert torch.equal(apply_method(method, g, p, chunk_size=chunk), plain), chunk
    # common random numbers: a higher density keeps a superset of the entries
    denser = apply_method(method, g, {**p, "density": [0.5, 0.7, 0.9]})
    assert bool(((whole - g.base != 0) <= (denser - g.base != 0)).all())


def test_noise_is_resident_compact_and_seeded():
    g = _unit()
    a = g.noise(5)
    assert a.dtype == torch.int16 and a.shape == g.deltas.shape
    assert g.noise(5) is a  # drawn once
    assert not torch.equal(g.noise(6), a)
    assert torch.equal(DeltaGroup(g.base, g.deltas, g.segments).noise(5), a)  # reproducible
    u = (a.float() + 32768) / 65536
    assert abs(u.mean().item() - 0.5) < 0.01 and u.min() >= 0 and u.max() < 1
