"""mergekit's extra methods (methods_extra.py) against hand-computed tensors, plus properties."""

import math

import pytest
import torch

from evomerge.errors import MergeError
from evomerge.merge.groups import DeltaGroup
from evomerge.merge.methods import REGISTRY, apply_method
from evomerge.merge.methods_extra import row_rank_fraction
from evomerge.merge.segments import attach_shapes

BASE = torch.tensor([1.0, 1.0, 1.0, 1.0])
D1 = torch.tensor([1.0, -2.0, 3.0, -4.0])
D2 = torch.tensor([-1.0, 1.5, 0.5, 2.0])
R = 1 / math.sqrt(2)
NEW = ["task_arithmetic_trim", "breadcrumbs_ties", "della_linear", "sce", "karcher", "multislerp", "nuslerp"]


def group(*deltas, base=BASE, shapes=None):
    g = DeltaGroup(base=base.clone(), deltas=torch.stack(list(deltas)), segments=(base.numel(),))
    return attach_shapes(g, shapes) if shapes else g


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=1e-5, atol=atol)


def test_all_registered_with_flags():
    for name in NEW:
        assert name in REGISTRY
    assert REGISTRY["task_arithmetic_trim"].elementwise and REGISTRY["breadcrumbs_ties"].elementwise
    for name in ("della_linear", "sce", "karcher", "multislerp", "nuslerp"):
        assert not REGISTRY[name].elementwise  # per-tensor statistics / norms


# ------------------------------------------------------------------ trimming


def test_task_arithmetic_trim_hand_computed():
    # top 50%: D1 -> [0, 0, 3, -4], D2 -> [0, 1.5, 0, 2]; weights 1, 0.5
    out = apply_method("task_arithmetic_trim", group(D1, D2), {"weight": [1.0, 0.5], "density": [0.5, 0.5]})
    close(out, BASE + torch.tensor([0.0, 0.75, 3.0, -3.0]))
    out = apply_method("task_arithmetic_trim", group(D1, D2), {"weight": [1.0, 0.5], "density": [0.5, 0.5], "lambda": 2.0})
    close(out, BASE + torch.tensor([0.0, 1.5, 6.0, -6.0]))


def test_task_arithmetic_trim_density_one_is_task_arithmetic():
    g = group(D1, D2)
    p = {"weight": [0.3, 0.8], "lambda": 1.2}
    close(apply_method("task_arithmetic_trim", g, {**p, "density": [1.0, 1.0]}), apply_method("task_arithmetic", g, p))


def test_task_arithmetic_trim_chunked_equals_whole():
    torch.manual_seed(0)
    g = DeltaGroup(torch.randn(50), torch.randn(2, 50), segments=(20, 30))
    p = {"weight": [0.6, 0.9], "density": [0.3, 0.7]}
    close(apply_method("task_arithmetic_trim", g, p, chunk_size=7), apply_method("task_arithmetic_trim", g, p))


def test_breadcrumbs_ties_hand_computed():
    # gamma 0.25 drops the largest, density 0.5 keeps the next two:
    # D1 -> [0, -2, 3, 0], D2 -> [-1, 1.5, 0, 0]; weighted (2, 1): [0, -4, 6, 0] + [-1, 1.5, 0, 0]
    # sums [-1, -2.5, 6, 0] -> signs [-, -, +, +]; agreeing: -1 (w 1), -4 (w 2), 6 (w 2), none
    g = group(D1, D2)
    p = {"weight": [2.0, 1.0], "density": [0.5, 0.5], "gamma": 0.25}
    close(apply_method("breadcrumbs_ties", g, p), BASE + torch.tensor([-1.0, -4.0, 6.0, 0.0]))  # normalize off (mergekit default)
    close(apply_method("breadcrumbs_ties", g, {**p, "normalize": 1}), BASE + torch.tensor([-1.0, -2.0, 3.0, 0.0]))


def test_breadcrumbs_ties_outlier_cut_shrinks_to_fit_density():
    # density 0.75 + gamma 0.5 > 1: mergekit drops only the top 25% (keeps the 3 smallest)
    out = apply_method("breadcrumbs_ties", group(D1), {"weight": [1.0], "density": [0.75], "gamma": 0.5})
    close(out, BASE + torch.tensor([1.0, -2.0, 3.0, 0.0]))


# ------------------------------------------------------------------ DELLA (linear)


def test_della_row_ranks_hand_computed():
    d = torch.tensor([1.0, -3.0, 2.0, 0.5, -0.1, 4.0])
    g = group(d, base=torch.zeros(6), shapes=[(2, 3)])
    # row 0: |1| < |2| < |3| -> ranks 0, 1, 0.5; row 1: |0.1| < |0.5| < |4| -> 0.5, 0, 1
    close(row_rank_fraction(g)[0].float(), [0.0, 1.0, 0.5, 0.5, 0.0, 1.0], atol=1e-3)
    flat = group(d, base=torch.zeros(6))  # no shapes: one row
    close(row_rank_fraction(flat)[0].float(), [0.4, 0.8, 0.6, 0.2, 0.0, 1.0], atol=1e-3)


def test_della_linear_hand_computed_per_row():
    # density 0.5, epsilon 0.5: keep probability = row rank, so each row of a 2x2 matrix keeps
    # exactly its larger entry. L1 rescale: 4.6 / 3.5.
    d = torch.tensor([1.0, -3.0, 0.5, -0.1])
    g = group(d, base=torch.zeros(4), shapes=[(2, 2)])
    p = {"weight": [1.0], "density": [0.5], "epsilon": 0.5, "seed": 3}
    close(apply_method("della_linear", g, {**p, "rescale": 0}), [0.0, -3.0, 0.5, 0.0])
    close(apply_method("della_linear", g, p), torch.tensor([0.0, -3.0, 0.5, 0.0]) * (4.6 / 3.5))
    close(apply_method("della_linear", g, {**p, "weight": [2.0], "lambda": 0.5, "normalize": 1}), torch.tensor([0.0, -3.0, 0.5, 0.0]) * (4.6 / 3.5) / 2)


def test_della_linear_density_one_is_task_arithmetic():
    torch.manual_seed(1)
    g = group(torch.randn(30), torch.randn(30), base=torch.randn(30), shapes=[(5, 6)])
    p = {"weight": [0.4, 0.7], "lambda": 1.5}
    close(apply_method("della_linear", g, {**p, "density": [1.0, 1.0], "epsilon": 0.2}), apply_method("task_arithmetic", g, p))


def test_della_linear_keeps_density_fraction_and_l1_norm():
    torch.manual_seed(2)
    d = torch.randn(40000)
    g = group(d, base=torch.zeros(40000), shapes=[(200, 200)])
    out = apply_method("della_linear", g, {"weight": [1.0], "density": [0.3], "epsilon": 0.1, "seed": 0})
    assert abs((out != 0).float().mean().item() - 0.3) < 0.01
    assert abs(out.abs().sum().item() / d.abs().sum().item() - 1) < 1e-4
    big = d.abs() > d.abs().median()
    assert (out[big] != 0).float().mean() > (out[~big] != 0).float().mean() + 0.05


# ------------------------------------------------------------------ SCE


def test_sce_hand_computed():
    # mean squares 7.5 and 1.875 -> weights 0.8, 0.2; signs of the sum [+, -, +, -]
    close(apply_method("sce", group(D1, D2), {}), BASE + torch.tensor([1.0, -2.0, 2.5, -4.0]))
    # variances [1, 3.0625, 1.5625, 9]: top 50% keeps elements 1 and 3
    close(apply_method("sce", group(D1, D2), {"select_topk": 0.5}), BASE + torch.tensor([0.0, -2.0, 0.0, -4.0]))


def test_sce_single_expert_is_the_expert():
    close(apply_method("sce", group(D1), {}), BASE + D1)


# ------------------------------------------------------------------ spherical


def test_karcher_hand_computed():
    base = torch.zeros(2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(apply_method("karcher", group(e1, e2, base=base), {}), [R, R])
    # weights 1 : 3 -> 3/4 of the way along the arc (67.5 degrees)
    a = math.radians(67.5)
    close(apply_method("karcher", group(e1, e2, base=base), {"weight": [0.5, 1.5]}), [math.cos(a), math.sin(a)])
    # norms 2 and 4: direction of the midpoint, weighted mean norm 3
    close(apply_method("karcher", group(2 * e1, 4 * e2, base=base), {}), [3 * R, 3 * R])
    # three orthogonal unit vectors: the symmetric point
    eye = torch.eye(3)
    s = 1 / math.sqrt(3)
    close(apply_method("karcher", group(eye[0], eye[1], eye[2], base=torch.zeros(3)), {}), [s, s, s])


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_karcher_of_two_equal_norm_points_is_slerp(t):
    torch.manual_seed(3)
    a, b = torch.randn(16), torch.randn(16)
    b = b / b.norm() * a.norm()
    g = group(a, b, base=torch.zeros(16))  # base 0: slerp's endpoints are the experts
    close(apply_method("karcher", g, {"weight": [1 - t, t], "max_iter": 100, "tol": 1e-7}), apply_method("slerp", g, {"t": t}), atol=1e-4)


def test_multislerp_hand_computed():
    base = torch.zeros(2)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    close(apply_method("multislerp", group(2 * e1, 4 * e2, base=base), {}), [3 * R, 3 * R])
    # mergekit's multislerp of two points is normalised linear interpolation (not slerp):
    # weights 1 : 3 -> direction (1, 3) / sqrt(10)
    close(apply_method("multislerp", group(e1, e2, base=base), {"weight": [0.5, 1.5]}), torch.tensor([1.0, 3.0]) / math.sqrt(10))
    eye = torch.eye(3)
    s = 1 / math.sqrt(3)
    out = apply_method("multislerp", group(eye[0], eye[1], eye[2], base=torch.ones(3)), {})
    close(out, [1 + s, 1 + s, 1 + s])


def test_multislerp_of_two_equal_weights_is_slerp_midpoint():
    torch.manual_seed(4)
    a, b = torch.randn(16), torch.randn(16)
    b = b / b.norm() * a.norm()
    g = group(a, b, base=torch.zeros(16))
    close(apply_method("multislerp", g, {}), apply_method("slerp", g, {"t": 0.5}), atol=1e-5)


def test_multislerp_antipodal_falls_back_to_weighted_sum():
    out = apply_method("multislerp", group(D1, -D1, D2), {"weight": [1.0, 1.0, 0.0]})
    close(out, BASE)  # mean direction vanishes: (D1 - D1) / 2


@pytest.mark.parametrize("t", [0.25, 0.5])
def test_nuslerp_is_slerp_of_task_vectors(t):
    torch.manual_seed(5)
    a, b = torch.randn(12), torch.randn(12)
    g0 = group(a, b, base=torch.zeros(12))
    close(apply_method("nuslerp", g0, {"weight": [1 - t, t]}), apply_method("slerp", g0, {"t": t}))
    base = torch.randn(12)
    g = group(a, b, base=base)
    close(apply_method("nuslerp", g, {"weight": [1 - t, t]}), base + apply_method("slerp", g0, {"t": t}))


def test_nuslerp_rows_and_columns_hand_computed():
    a = torch.tensor([1.0, 0.0, 0.0, 1.0])  # [[1, 0], [0, 1]]
    b = torch.tensor([0.0, 1.0, 0.0, 1.0])  # [[0, 1], [0, 1]]
    g = group(a, b, base=torch.zeros(4), shapes=[(2, 2)])
    # whole tensor: cos 1/2 -> theta 60 degrees, t = 1/2: (a + b) sin 30 / sin 60
    c = 0.5 / math.sin(math.radians(60))
    close(apply_method("nuslerp", g, {}), (a + b) * c)
    # row by row: row 0 e1 -> e2 (90 degrees), row 1 identical
    close(apply_method("nuslerp", g, {"flatten": 0}), [R, R, 0.0, 1.0])
    # column by column: col 0 (1, 0) vs (0, 0); col 1 (0, 1) vs (1, 1) at 45 degrees
    k = math.sin(math.radians(22.5)) / math.sin(math.radians(45))
    close(apply_method("nuslerp", g, {"flatten": 0, "row_wise": 1}), [R, k, 0.0, 2 * k])


def test_nuslerp_needs_two_experts():
    with pytest.raises(MergeError, match="needs 2..2"):
        apply_method("nuslerp", group(D1), {})


# della_linear is left out: its random draws follow one stream over the whole group
@pytest.mark.parametrize("method", [m for m in NEW if m != "della_linear"])
def test_multi_segment_group_equals_per_tensor(method):
    torch.manual_seed(6)
    a_base, b_base = torch.randn(6), torch.randn(12)
    a_d, b_d = torch.randn(2, 6), torch.randn(2, 12)
    joint = attach_shapes(DeltaGroup(torch.cat([a_base, b_base]), torch.cat([a_d, b_d], dim=1), segments=(6, 12)), [(6,), (3, 4)])
    p = {"weight": [0.8, 0.6]}
    if method in ("task_arithmetic_trim", "breadcrumbs_ties"):
        p["density"] = [0.5, 0.75]
    if method == "sce":
        p = {"select_topk": 0.5}
    parts = [
        apply_method(method, attach_shapes(DeltaGroup(a_base, a_d, segments=(6,)), [(6,)]), p),
        apply_method(method, attach_shapes(DeltaGroup(b_base, b_d, segments=(12,)), [(3, 4)]), p),
    ]
    close(apply_method(method, joint, p), torch.cat(parts))


# ------------------------------------------------------------------ chunked DELLA-linear / SCE


def _fresh(base, deltas, segments, shapes):
    # a new group per run, so the cached statistics (ranks, L1 norms, variances) are rebuilt too
    return attach_shapes(DeltaGroup(base=base.clone(), deltas=deltas.clone(), segments=segments), shapes)


CHUNK_CASES = [
    # (segments, shapes): sizes just below, at and above multiples of the chunk (8) and block (4)
    ((7,), [(7,)]),
    ((8,), [(2, 4)]),
    ((9,), [(3, 3)]),
    ((16,), [(4, 4)]),
    ((17,), [(17,)]),
    ((15, 9, 16, 25), [(3, 5), (9,), (4, 4), (5, 5)]),
]
CHUNK_PARAMS = {
    "della_linear": [
        {"weight": [0.7, -0.4, 1.1], "density": [0.5, 0.3, 0.8], "epsilon": 0.15, "seed": 4},
        {"weight": [0.7, 0.4, 1.1], "density": [0.2, 1.0, 0.0], "epsilon": 0.1, "normalize": 1, "lambda": 1.3},
        {"weight": [0.7, 0.4, 1.1], "density": [0.6, 0.6, 0.6], "rescale": 0},
    ],
    "sce": [{}, {"select_topk": 0.4}, {"select_topk": 0.0}],
}


@pytest.mark.parametrize("method", sorted(CHUNK_PARAMS))
@pytest.mark.parametrize("segments, shapes", CHUNK_CASES)
def test_della_linear_and_sce_chunked_equal_whole_bit_for_bit(monkeypatch, method, segments, shapes):
    import evomerge.merge.methods_extra as mx

    torch.manual_seed(sum(segments))
    n = sum(segments)
    base, deltas = torch.randn(n), torch.randn(3, n)
    monkeypatch.setattr(mx, "SUM_BLOCK", 4)
    for p in CHUNK_PARAMS[method]:
        monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 1 << 30)
        whole = apply_method(method, _fresh(base, deltas, segments, shapes), p)
        monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 8)
        assert len(mx.chunk_spans(max(segments))) == -(-max(segments) // 8)  # really cut into chunks of 8
        chunked = apply_method(method, _fresh(base, deltas, segments, shapes), p)
        assert torch.equal(chunked, whole), (p, (chunked - whole).abs().max())


@pytest.mark.parametrize("method", sorted(CHUNK_PARAMS))
def test_della_linear_and_sce_chunked_bit_for_bit_at_default_block(monkeypatch, method):
    """Real block size (1024), chunks of 2048, tensors around the chunk boundaries."""
    import evomerge.merge.methods_extra as mx

    segments, shapes = (2047, 2048, 2049, 4100), [(23, 89), (32, 64), (2049,), (41, 100)]
    n = sum(segments)
    torch.manual_seed(5)
    base, deltas = torch.randn(n), torch.randn(3, n)
    for p in CHUNK_PARAMS[method][:2]:
        monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 1 << 30)
        whole = apply_method(method, _fresh(base, deltas, segments, shapes), p)
        monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 2048)
        assert torch.equal(apply_method(method, _fresh(base, deltas, segments, shapes), p), whole)


def test_chunk_spans_and_block_sums(monkeypatch):
    import evomerge.merge.methods_extra as mx

    monkeypatch.setattr(mx, "SUM_BLOCK", 4)
    monkeypatch.setattr(mx, "CHUNK_ELEMENTS", 10)  # rounded down to whole blocks: 8
    assert mx.chunk_spans(17) == [(0, 8), (8, 16), (16, 17)]
    assert mx.chunk_spans(3) == [(0, 3)]
    x = torch.arange(10.0)[None, :].expand(2, 10)
    # 0+1+2+3, 4+5+6+7, 8+9 (the last block is partial)
    assert mx.block_sums(x).tolist() == [[6.0, 22.0, 17.0], [6.0, 22.0, 17.0]]
