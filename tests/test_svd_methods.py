"""SVD-family merges (TSV-M, Iso-C, Iso-CTS) on small matrices with known SVDs."""

import math

import numpy as np
import pytest
import torch

from evomerge.errors import MergeError
from evomerge.merge import svd
from evomerge.merge.groups import DeltaGroup
from evomerge.merge.merger import Merger
from evomerge.merge.methods import REGISTRY, apply_method
from evomerge.merge.recipe import Recipe
from evomerge.merge.svd import attach_shapes, cts_split, tsv_rank
from evomerge.pool import ModelPool

R = 1 / math.sqrt(2)


def mats(*matrices, base=None, extra_1d=None):
    """Group of 2-D task matrices (plus an optional 1-D segment per expert)."""
    shape = matrices[0].shape
    deltas = torch.stack([m.reshape(-1) for m in matrices])
    shapes, segments = [tuple(shape)], (deltas.shape[1],)
    if extra_1d is not None:
        deltas = torch.cat([deltas, torch.stack(extra_1d)], dim=1)
        shapes.append((extra_1d[0].numel(),))
        segments += (extra_1d[0].numel(),)
    b = torch.zeros(deltas.shape[1]) if base is None else base
    return attach_shapes(DeltaGroup(b, deltas, segments=segments), shapes)


def close(a, b, atol=1e-5):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype).reshape(a.shape), rtol=1e-5, atol=atol)


def test_registered_non_elementwise():
    for name in ("tsv_m", "iso_c", "iso_cts"):
        assert not REGISTRY[name].elementwise


def test_attach_shapes_checks_sizes():
    g = DeltaGroup(torch.zeros(6), torch.zeros(1, 6), segments=(6,))
    with pytest.raises(MergeError, match="do not match"):
        attach_shapes(g, [(2, 2)])


# ------------------------------------------------------------------ TSV-M


def test_tsv_rank_counts():
    assert tsv_rank((4, 6), 2, 1.0) == 2  # r = 4 split over 2 tasks
    assert tsv_rank((4, 6), 2, 0.52) == 1  # snapped to 0.5
    assert tsv_rank((4, 6), 3, 0.1) == 1  # at least one direction


def test_tsv_m_keeps_each_tasks_top_direction():
    # diag(3, 1) and diag(0, 2); rank 1 per task keeps (3, e1) and (2, e2): diag(3, 2).
    # Task arithmetic would give diag(3, 3).
    g = mats(torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([0.0, 2.0])))
    close(apply_method("tsv_m", g, {}), torch.diag(torch.tensor([3.0, 2.0])))
    close(apply_method("tsv_m", g, {"weight": [0.5, 2.0], "lambda": 2.0}), 2 * torch.diag(torch.tensor([1.5, 4.0])))


def test_tsv_m_orthogonalises_overlapping_directions():
    # 2 e1 e1^T and 2 u u^T with u at 45 degrees: the orthogonalised bases U = V form an
    # orthogonal 2x2 matrix Q, so the merge is Q diag(2, 2) Q^T = 2 I (TA: [[3, 1], [1, 1]]).
    e1 = torch.tensor([[1.0], [0.0]])
    u = torch.tensor([[R], [R]])
    g = mats(2 * e1 @ e1.t(), 2 * u @ u.t())
    close(apply_method("tsv_m", g, {}), 2 * torch.eye(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tsv_m_one_expert_full_rank_is_task_arithmetic(seed):
    torch.manual_seed(seed)
    g = mats(torch.randn(5, 7), base=torch.randn(35))
    p = {"weight": [0.7], "lambda": 1.3}
    close(apply_method("tsv_m", g, p), apply_method("task_arithmetic", g, p), atol=1e-4)


def test_tsv_m_one_d_segments_use_the_mean():
    g = mats(torch.eye(2), 2 * torch.eye(2), extra_1d=[torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])])
    out = apply_method("tsv_m", g, {"weight": [1.0, 0.5]})
    close(out[4:], [(1 + 1.5) / 2, (3 + 0.5) / 2])


def test_tsv_m_task_svds_are_cached(monkeypatch):
    torch.manual_seed(3)
    g = mats(torch.randn(6, 4), torch.randn(6, 4))
    apply_method("tsv_m", g, {"weight": [1.0, 1.0]})
    calls = []
    real = svd._svd
    monkeypatch.setattr(svd, "_svd", lambda m: calls.append(m.shape) or real(m))
    apply_method("tsv_m", g, {"weight": [0.3, 0.9], "lambda": 0.7})
    assert calls == []  # new weights: reconstruction only
    apply_method("tsv_m", g, {"weight": [0.3, 0.9], "rank": 0.5})
    assert len(calls) == 2  # new rank: the two orthogonalisations, not the task SVDs


# ------------------------------------------------------------------ Iso-C


def test_iso_c_flattens_the_spectrum():
    # sum diag(3, 1): singular values (3, 1) -> mean 2 -> 2 I
    g = mats(torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0])))
    close(apply_method("iso_c", g, {}), 2 * torch.eye(2))
    close(apply_method("iso_c", g, {"lambda": 0.5}), torch.eye(2))
    # one expert: U S V^T -> mean(S) U V^T; a rotation keeps U V^T = Q
    q = torch.tensor([[R, -R], [R, R]])
    close(apply_method("iso_c", mats(q @ torch.diag(torch.tensor([4.0, 2.0]))), {}), 3 * q)


def test_iso_c_of_isotropic_sum_is_task_arithmetic():
    q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0))).Q
    g = mats(0.5 * q, 1.5 * q, base=torch.ones(16))
    close(apply_method("iso_c", g, {}), apply_method("task_arithmetic", g, {"weight": [1.0, 1.0]}))


def test_iso_c_fixed_weights_and_cache(monkeypatch):
    g = mats(torch.diag(torch.tensor([3.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0])), extra_1d=[torch.ones(3), 3 * torch.ones(3)])
    apply_method("iso_c", g, {})
    calls = []
    monkeypatch.setattr(svd, "_svd", lambda m: calls.append(1))
    out = apply_method("iso_c", g, {"lambda": 2.0})
    assert calls == []  # lambda changes only the final scaling
    close(out[4:], 2 * 2 * torch.ones(3))  # 1-D: lambda * mean
    assert not REGISTRY["iso_c"].spec("weight").searchable


# ------------------------------------------------------------------ Iso-CTS


def test_cts_split_matches_reference_rounding():
    assert cts_split(2, 2, 0.8) == (2, 0)  # (2 - 1) / 2 rounds to 0: all common
    assert cts_split(2, 2, 0.0) == (0, 1)
    assert cts_split(5, 2, 0.5) == (1, 2)  # k = 2, (5 - 2) / 2 = 1.5 -> 2 per task, common takes the rest
    assert cts_split(3, 2, 0.0) == (1, 1)  # 4 task directions would not fit in 3


def test_iso_cts_hand_computed():
    # sum diag(5, 1.1, 0.6): common = e1 (5); task residuals diag(0, 1, 0.1) -> (1, e2) and
    # diag(0, 0.1, 0.5) -> (0.5, e3); isotropic value (5 + 1 + 0.5) / 3. Iso-C: 6.7 / 3.
    g = mats(torch.diag(torch.tensor([3.0, 1.0, 0.1])), torch.diag(torch.tensor([2.0, 0.1, 0.5])))
    close(apply_method("iso_cts", g, {"common": 0.35}), 6.5 / 3 * torch.eye(3))
    close(apply_method("iso_c", g, {}), 6.7 / 3 * torch.eye(3))


def test_iso_cts_all_common_is_iso_c():
    torch.manual_seed(4)
    g = mats(torch.randn(4, 6), torch.randn(4, 6), base=torch.randn(24))
    close(apply_method("iso_cts", g, {"common": 1.0, "lambda": 1.4}), apply_method("iso_c", g, {"lambda": 1.4}), atol=1e-4)


@pytest.mark.parametrize("method,params", [("tsv_m", {"weight": [0.6, 1.1], "rank": 0.5}), ("iso_c", {}), ("iso_cts", {"common": 0.4})])
def test_svd_methods_are_rotation_equivariant(method, params):
    # merging Q A_i P^T gives Q merge(A_i) P^T for orthogonal Q, P
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    q = torch.linalg.qr(torch.randn(5, 5, generator=gen)).Q
    p = torch.linalg.qr(torch.randn(4, 4, generator=gen)).Q
    plain = apply_method(method, mats(a, b), params).view(5, 4)
    rotated = apply_method(method, mats(q @ a @ p.t(), q @ b @ p.t()), params).view(5, 4)
    close(rotated, q @ plain @ p.t(), atol=1e-4)


def test_group_without_shapes_falls_back_to_mean_task_arithmetic():
    g = DeltaGroup(torch.zeros(4), torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.0, 2.0, 1.0, 0.0]]), segments=(4,))
    for method in ("tsv_m", "iso_c", "iso_cts"):
        close(apply_method(method, g, {}), [2.0, 2.0, 2.0, 2.0])


# ------------------------------------------------------------------ merger wiring


def test_merger_gives_groups_their_matrix_shapes(tiny_models):
    merger = Merger(ModelPool(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]}), device="cpu")
    base = {k: v.detach().clone() for k, v in merger.model.named_parameters()}
    merger.apply(Recipe.uniform("iso_c", {"lambda": 1.0}, merger.n_layers))
    name = "model.layers.0.self_attn.q_proj.weight"
    unit, start, size = merger._param_slices[name]
    group = merger._units[unit].group
    deltas = group.deltas[:, start : start + size].view(2, *base[name].shape)
    u, s, vh = torch.linalg.svd(deltas.sum(0))
    expected = base[name] + s.mean() * (u @ vh)
    close(dict(merger.model.named_parameters())[name].detach(), expected, atol=1e-5)
    norm = "model.layers.0.input_layernorm.weight"
    unit, start, size = merger._param_slices[norm]
    close(dict(merger.model.named_parameters())[norm].detach(), base[norm] + merger._units[unit].group.deltas[:, start : start + size].mean(0))
    assert np.isfinite(float(merger.model.lm_head.weight.sum()))
