"""Parity with real mergekit (0.1.5) on bfloat16 models, whose task vectors have few
distinct magnitudes: the "top d" methods must choose the same entries among ties. Exact
merges (``table_size=None``, or the default sampled table inside ``exact_thresholds``,
as exports and the test re-score run) on the fused-kernel path and the torch path; and
``verify_export`` (``evomerge export ... verify=true``) on a layer-wise TIES export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.merge import kernels
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Group, Recipe
from evomerge.pool import ModelPool

from conftest import make_llama
from test_mergekit_parity import assert_same_weights, mergekit_merge

pytest.importorskip("mergekit", reason="mergekit is not installed; parity tests skipped")

from evomerge.verify import verify_export  # noqa: E402


def make_bf16_expert(folder: Path, base: Path, seed: int) -> Path:
    """base + a perturbation on a coarse grid, saved in bfloat16: heavily tied |task vector|."""
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.build import build_tokenizer

    build_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((torch.randint(-3, 4, p.shape, generator=gen).float() * 2**-5).to(p.dtype))
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory) -> dict[str, Path]:
    """MLP tensors 32 x 160 = 5120 entries: above the default table's exact size."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("parity_bf16")
    f32 = make_llama(root / "base32", seed=0, intermediate_size=160)
    base = root / "base"
    from evomerge.zoo.build import build_tokenizer

    build_tokenizer(base)
    AutoModelForCausalLM.from_pretrained(str(f32), torch_dtype=torch.bfloat16).save_pretrained(str(base))
    return {"base": base, **{n: make_bf16_expert(root / n, base, s) for n, s in (("a", 1), ("b", 2))}}


def uniform(method: str, params: dict) -> Recipe:
    return Recipe.uniform(method, params, 2)


W, D = [1.0, 0.6], [0.3, 0.55]
CASES = {
    "ties": uniform("ties", {"weight": W, "density": D}),
    "ties_low_density": uniform("ties", {"weight": W, "density": [0.1, 0.05], "normalize": 0}),
    "breadcrumbs": uniform("breadcrumbs", {"weight": W, "density": D, "gamma": 0.1}),
    "breadcrumbs_ties": uniform("breadcrumbs_ties", {"weight": W, "density": [0.5, 0.3], "gamma": 0.05}),
    "task_arithmetic_trim": uniform("task_arithmetic_trim", {"weight": W, "density": [0.4, 0.2]}),
    "sce": uniform("sce", {"select_topk": 0.3}),
}
LAYERWISE_TIES = Recipe(
    groups=[
        Group("embed", "embed", "ties", {"weight": [0.5, 0.5], "density": [0.3, 0.3], "lambda": 0.7}),
        Group("l0-attn", "layers", "ties", {"weight": [1.0, 0.2], "density": [0.6, 0.2], "lambda": 1.4}, layers=(0, 0), component="attn"),
        Group("l0-mlp", "layers", "ties", {"weight": [0.3, 1.1], "density": [0.25, 0.8], "normalize": 0}, layers=(0, 0), component="mlp"),
        Group("l1", "layers", "ties", {"weight": [0.8, 0.8], "density": [0.5, 0.45]}, layers=(1, 1)),
        Group("head", "head", "ties", {"weight": [1.2, 0.1], "density": [0.9, 0.1], "lambda": 2.0}),
    ]
)

_MERGERS: dict[object, Merger] = {}


def merger_for(models, table_size) -> Merger:
    if table_size not in _MERGERS:
        # float32 merges of the bfloat16 models, as mergekit does with the exported dtype: float32
        _MERGERS[table_size] = Merger(ModelPool(models["base"], {e: models[e] for e in ("a", "b")}), device="cpu", table_size=table_size)
    return _MERGERS[table_size]


def merged(merger: Merger, recipe: Recipe) -> dict[str, torch.Tensor]:
    merger.apply(recipe)
    return {k: v.detach().clone() for k, v in merger.model.state_dict().items()}


@pytest.fixture(scope="module")
def theirs(bf16_models, tmp_path_factory) -> dict[str, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("mergekit_bf16")
    cases = {**CASES, "layerwise_ties": LAYERWISE_TIES}
    return {name: mergekit_merge(bf16_models, recipe, ("a", "b"), out / name) for name, recipe in cases.items()}


def test_bf16_task_vectors_are_heavily_tied(bf16_models):
    g = merger_for(bf16_models, None)._units[1].group  # a layer's attention unit
    assert len(g.deltas[0].abs().unique()) < g.deltas.shape[1] // 10  # ~20 entries per magnitude


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("table", ["exact", "default_in_exact_block"])
def test_mergekit_chooses_the_same_entries_among_ties(bf16_models, theirs, case, path, table, monkeypatch):
    if path == "torch":
        monkeypatch.setattr(kernels, "available", lambda *t: False)
    if table == "exact":
        ours = merged(merger_for(bf16_models, None), CASES[case])
    else:
        merger = merger_for(bf16_models, 4096)
        with merger.exact_thresholds():
            ours = merged(merger, CASES[case])
    assert_same_weights(ours, theirs[case])


def test_verify_layerwise_ties_export(bf16_models, theirs, tmp_path):
    merger = merger_for(bf16_models, 4096)
    with merger.exact_thresholds():
        merger.apply(LAYERWISE_TIES)
        merger.save(tmp_path / "exact")
    experts = [str(bf16_models["a"]), str(bf16_models["b"])]
    result = verify_export(tmp_path / "exact", LAYERWISE_TIES, str(bf16_models["base"]), experts)
    assert result.same and result.beyond == 0 and result.tensors > 10, result.line()
    assert "same weights as mergekit" in result.line()
    # the search's sampled table: ties by index (not mergekit's sort), MLP tensors (5120) sampled
    merger.apply(LAYERWISE_TIES)
    merger.save(tmp_path / "sampled")
    sampled = verify_export(tmp_path / "sampled", LAYERWISE_TIES, str(bf16_models["base"]), experts)
    assert not sampled.same and "DIFFERS" in sampled.line() and sampled.max_abs_diff > 0


def test_test_rescore_scores_the_exact_merge_and_records_the_searched_one_where_they_differ(bf16_models, theirs):
    from types import SimpleNamespace

    from evomerge.run import exact_rescore

    merger = merger_for(bf16_models, 4096)
    embed = "model.embed_tokens.weight"

    def test():  # a "score" that tells the merges apart: one merged weight's sum
        return {"s": float(merger.model.state_dict()[embed].double().sum())}

    targets = {
        "knee": SimpleNamespace(id=7, recipe=CASES["ties"].to_dict()),
        "base": SimpleNamespace(id=0, recipe=uniform("task_arithmetic", {"weight": [0.0, 0.0]}).to_dict()),
    }
    out = exact_rescore(merger, targets, test)
    assert out["knee"]["scores"]["s"] == pytest.approx(float(theirs["ties"][embed].double().sum()), rel=1e-6)  # mergekit's merge
    assert out["knee"]["exact_differs"] is True and out["knee"]["searched_scores"] != out["knee"]["scores"]
    assert "exact_differs" not in out["base"] and out["base"]["id"] == 0  # no magnitude trim: the same merge


def test_test_rescore_can_skip_scoring_the_searched_merge(bf16_models, theirs):
    """fitness.test_rescore_searched=false: the differing point is still marked, its searched
    merge is not scored (one test score per point instead of two)."""
    from types import SimpleNamespace

    from evomerge.run import exact_rescore

    merger = merger_for(bf16_models, 4096)
    calls = []

    def test():
        calls.append(1)
        return {"s": float(merger.model.state_dict()["model.embed_tokens.weight"].double().sum())}

    targets = {"knee": SimpleNamespace(id=7, recipe=CASES["ties"].to_dict())}
    out = exact_rescore(merger, targets, test, score_searched=False)
    assert out["knee"]["exact_differs"] is True and "searched_scores" not in out["knee"]
    assert out["knee"]["scores"]["s"] == pytest.approx(float(theirs["ties"]["model.embed_tokens.weight"].double().sum()), rel=1e-6)
    assert len(calls) == 1
    exact_rescore(merger, targets, test)  # the default scores both merges
    assert len(calls) == 3
