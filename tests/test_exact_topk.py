"""Exactly k kept entries among tied magnitudes (bfloat16 / float16 task vectors have few
distinct magnitudes): every "top d" method keeps floor(d * n) entries per tensor and
expert, on the fused-kernel path and the torch path, with the sampled table (ties broken
by index) and exact (mergekit's own sort order)."""

from __future__ import annotations

import math

import pytest
import torch

from evomerge.merge import kernels
from evomerge.merge.groups import DeltaGroup
from evomerge.merge.methods import apply_method
from evomerge.merge.methods_extra import sce_selection

DENSITIES = (0.0, 0.1, 0.3, 0.5, 0.77, 1.0)


def tied_deltas(k: int, n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Non-zero task vectors with only 6 distinct magnitudes (massive ties)."""
    gen = torch.Generator().manual_seed(seed)
    mags = torch.randint(1, 7, (k, n), generator=gen).to(torch.float32) * 0.125
    signs = torch.where(torch.rand(k, n, generator=gen) < 0.5, -1.0, 1.0)
    return (mags * signs).to(dtype)


def ties_count(d: float, n: int) -> int:
    return n if d >= 1 else 0 if d <= 0 else max(1, int(d * n))  # mergekit's TIES


def trim_count(d: float, n: int) -> int:
    return n if d >= 1 else int(max(d, 0.0) * n)  # mergekit's breadcrumbs (no "at least one")


METHODS = {
    "ties": ({}, ties_count),
    "task_arithmetic_trim": ({}, trim_count),
    "breadcrumbs": ({"gamma": 0.05}, trim_count),
    "breadcrumbs_ties": ({"gamma": 0.05}, trim_count),
}


def kept_per_expert(method: str, params: dict, deltas: torch.Tensor, table_size, torch_path: bool, monkeypatch) -> list[int]:
    """Number of entries each expert keeps, merging it alone (weight 1, base 0)."""
    if torch_path:
        monkeypatch.setattr(kernels, "available", lambda *t: False)
    out = []
    for row in deltas:
        n = row.numel()
        g = DeltaGroup(base=torch.zeros(n, dtype=row.dtype), deltas=row[None].clone(), segments=(n,), table_size=table_size)
        merged = apply_method(method, g, {"weight": [1.0], **params}, chunk_size=1000)
        out.append(int((merged != 0).sum()))
    monkeypatch.undo()
    return out


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize(
    "dtype, torch_path",
    [(torch.bfloat16, True), (torch.float16, True), (torch.float32, False), (torch.float32, True)],
    ids=["bf16-torch", "fp16-torch", "bf16values-f32-kernel", "bf16values-f32-torch"],
)
@pytest.mark.parametrize("table_size", [4096, None], ids=["table", "exact"])
def test_top_d_methods_keep_exactly_floor_d_n_among_ties(method, dtype, torch_path, table_size, monkeypatch):
    n = 3001  # below the table's sampling size: the sampled table is exact here too
    deltas = tied_deltas(2, n, torch.bfloat16).to(dtype)
    assert len(deltas.abs().unique()) == 6
    extra, count = METHODS[method]
    for d in DENSITIES:
        kept = kept_per_expert(method, {"density": [d], **extra}, deltas, table_size, torch_path, monkeypatch)
        assert kept == [count(d, n)] * 2, (method, d)


@pytest.mark.parametrize("n", [4097, 12289])
@pytest.mark.parametrize("torch_path", [False, True], ids=["kernel", "torch"])
def test_default_table_above_its_size_is_off_by_the_sampling_only_and_exact_mode_is_exact(n, torch_path, monkeypatch):
    deltas = tied_deltas(2, n, torch.float32, seed=n)
    for method in ("ties", "breadcrumbs"):
        extra, count = METHODS[method]
        for d in (0.1, 0.3, 0.5):
            sampled = kept_per_expert(method, {"density": [d], **extra}, deltas, 4096, torch_path, monkeypatch)
            # ties no longer inflate the count (before: every entry tied with the k-th was kept)
            assert all(abs(c - count(d, n)) <= 2 * math.ceil(n / 4096) for c in sampled), (method, d, sampled)
            exact = kept_per_expert(method, {"density": [d], **extra}, deltas, None, torch_path, monkeypatch)
            assert exact == [count(d, n)] * 2, (method, d, exact)


def test_tie_break_is_by_index_in_the_sampled_table_and_mergekits_sort_when_exact():
    row = torch.tensor([1.0, 2.0, 1.0, 1.0, 2.0, 1.0])
    g = DeltaGroup(base=torch.zeros(6), deltas=row[None].clone(), segments=(6,))
    counts = torch.tensor([[4.0]], dtype=torch.float64)
    assert g.top_mask(counts)[0].tolist() == [True, True, True, False, True, False]  # the two 2s, then 1s by index
    g.table_size = None
    expected = torch.zeros(6, dtype=torch.bool)
    expected[torch.argsort(row.abs(), descending=True)[:4]] = True  # mergekit's magnitude()
    assert g.top_mask(counts)[0].tolist() == expected.tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("exact", [False, True])
def test_sce_selects_exactly_int_nonzero_times_topk(dtype, exact):
    n = 5000
    deltas = tied_deltas(3, n, torch.bfloat16, seed=7).to(dtype)
    deltas[:, :100] = 0  # zero variance: not counted
    g = DeltaGroup(base=torch.zeros(n, dtype=dtype), deltas=deltas, segments=(n,), table_size=None if exact else 4096)
    var = deltas.var(0, unbiased=False)
    nonzero = int(torch.count_nonzero(var))
    assert len(var.unique()) < 50  # heavily tied variances
    for topk in (0.1, 0.33, 0.5, 0.9):
        sel = sce_selection(g, 0, n, topk)
        if isinstance(sel, torch.Tensor):
            chosen = int(sel.sum())
        else:
            threshold, cut = sel
            v = var.float()
            chosen = int(((v > threshold) | ((v == threshold) & (torch.arange(n) < cut))).sum())
        assert chosen == int(nonzero * topk)


def test_fused_kernel_and_torch_path_agree_on_tied_two_expert_merges(monkeypatch):
    n = 6000
    deltas = tied_deltas(2, n, torch.float32, seed=3)
    base = torch.randn(n)
    for method, params in [
        ("ties", {"weight": [1.0, 0.6], "density": [0.3, 0.55]}),
        ("breadcrumbs_ties", {"weight": [1.0, 0.6], "density": [0.3, 0.55], "gamma": 0.1}),
        ("task_arithmetic_trim", {"weight": [1.0, 0.6], "density": [0.3, 0.55]}),
    ]:
        for table_size in (4096, None):
            g = DeltaGroup(base=base.clone(), deltas=deltas.clone(), segments=(2500, 3500), table_size=table_size)
            fused = apply_method(method, g, params)
            monkeypatch.setattr(kernels, "available", lambda *t: False)
            g2 = DeltaGroup(base=base.clone(), deltas=deltas.clone(), segments=(2500, 3500), table_size=table_size)
            plain = apply_method(method, g2, params, chunk_size=1024)
            monkeypatch.undo()
            torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
