"""Genome support for the new methods and LiNeS depth scaling."""

import numpy as np
import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.merge.groups import DeltaGroup
from evomerge.merge.methods import apply_method
from evomerge.merge.recipe import Unit
from evomerge.search.genome import DEFAULT_RANGES, GenomeSpace

NEW = ["task_arithmetic_trim", "breadcrumbs_ties", "della_linear", "sce", "karcher", "multislerp", "nuslerp", "tsv_m", "iso_c", "iso_cts"]


def units(n_layers):
    return [Unit("embed")] + [Unit("layers", i, c) for i in range(n_layers) for c in ("attn", "mlp")] + [Unit("head")]


@pytest.mark.parametrize("method", NEW)
def test_every_new_method_decodes_and_merges(method):
    space = GenomeSpace(n_experts=2, n_layers=4, methods=(method,), layer_groups=2, search_lambda=True)
    recipe = space.decode(np.random.default_rng(0).random(space.n_var))
    plan = recipe.assign(units(4), 2)  # validates every group's parameters
    torch.manual_seed(0)
    g = DeltaGroup(torch.randn(12), torch.randn(2, 12), segments=(12,))
    out = apply_method(method, g, plan[1][1].params)
    assert torch.isfinite(out).all()


def test_new_shared_parameters_get_genes():
    space = GenomeSpace(n_experts=2, n_layers=2, methods=("sce", "tsv_m", "iso_cts", "iso_c"))
    assert space.genes_per_slot() == ["method", "weight.expert0", "weight.expert1", "select_topk", "rank", "common"]
    # iso_c's weights are fixed (new weights would mean new SVDs): its groups get none
    x = np.full(space.n_var, 0.0)
    x[0] = 0.99  # method gene -> iso_c
    assert space.decode(x).groups[0].params == {}


def test_existing_genomes_unchanged_without_lines():
    space = GenomeSpace(n_experts=2, n_layers=4, methods=("task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp"), layer_groups=2)
    assert space.genes_per_slot() == ["method", "weight.expert0", "weight.expert1", "density.expert0", "density.expert1", "t", "gamma", "epsilon"]


def test_lines_scales_lambda_linearly_with_depth():
    # 5 layers, one group: alpha = 0.2, beta = 0.8 (ranges [0, 1]) -> lambda_l = 1.0 * (0.2 + 0.8 l / 4)
    space = GenomeSpace(n_experts=2, n_layers=5, methods=("task_arithmetic",), lines=True, separate_embed_head=False)
    assert space.genes_per_slot() == ["weight.expert0", "weight.expert1", "lines_alpha", "lines_beta"]
    recipe = space.decode(np.array([0.5, 0.5, 0.2, 0.8]))
    lambdas = {g.name: g.params["lambda"] for g in recipe.groups}
    assert lambdas == {"embed": 0.2, "layers.0": 0.2, "layers.1": 0.4, "layers.2": 0.6, "layers.3": 0.8, "layers.4": 1.0, "head": 1.0}
    assert [g.layers for g in recipe.groups if g.part == "layers"] == [(i, i) for i in range(5)]
    recipe.assign([Unit("embed")] + [Unit("layers", i, "attn") for i in range(5)] + [Unit("head")], 2)


def test_lines_multiplies_searched_lambda_and_skips_methods_without_lambda():
    space = GenomeSpace(
        n_experts=2, n_layers=3, methods=("task_arithmetic", "karcher"), lines=True, search_lambda=True, layer_groups=1,
        ranges={"lambda": [1.0, 2.0], "lines_alpha": [0.5, 0.5], "lines_beta": [1.0, 1.0]},
    )
    per = space.genes_per_slot()
    x = np.zeros(space.n_var)
    blocks = x.reshape(3, len(per))
    blocks[:, per.index("lambda")] = 1.0  # lambda 2
    blocks[1, 0] = 0.99  # layers slot -> karcher: no lambda, one group
    recipe = space.decode(blocks.reshape(-1))
    names = [(g.name, g.method, g.params.get("lambda")) for g in recipe.groups]
    assert names == [("embed", "task_arithmetic", 1.0), ("layers.0-2", "karcher", None), ("head", "task_arithmetic", 3.0)]


def test_lines_reference_genomes_are_plain_experts():
    space = GenomeSpace(n_experts=2, n_layers=4, methods=("task_arithmetic",), lines=True, layer_groups=2)
    made = space.hand_made_genomes()  # base, experts, uniform task arithmetic: all with LiNeS off
    assert list(made)[:3] == ["base", "expert:expert0", "expert:expert1"] and len(made) == 7
    recipe = space.decode(made["expert:expert1"])
    assert {g.params["lambda"] for g in recipe.groups} == {1.0}
    assert all(g.params["weight"] == [0.0, 1.0] for g in recipe.groups)
    ta = space.decode(made["task_arithmetic:0.5"])
    assert {g.params["lambda"] for g in ta.groups} == {1.0} and all(g.params["weight"] == [0.5, 0.5] for g in ta.groups)


def test_lines_needs_a_method_with_lambda():
    with pytest.raises(ConfigError, match="lines"):
        GenomeSpace(n_experts=2, n_layers=2, methods=("karcher", "sce"), lines=True)


def test_default_ranges_cover_new_parameters():
    for name in ("select_topk", "rank", "common", "lines_alpha", "lines_beta"):
        assert name in DEFAULT_RANGES


def test_extended_preset_builds():
    import yaml
    from pathlib import Path

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs/genome/layerwise_extended.yaml").read_text())
    space = GenomeSpace(n_experts=3, n_layers=6, **cfg)
    recipe = space.decode(np.random.default_rng(1).random(space.n_var))
    recipe.assign(units(6), 3)
    for g in recipe.groups:
        if g.part == "layers":  # LiNeS gives every layer its own lambda; methods without one keep the slot
            assert (g.layers[1] - g.layers[0]) == (0 if "lambda" in g.params else 2)
