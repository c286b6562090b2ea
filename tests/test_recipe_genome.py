"""Recipes (YAML, mergekit export) and genome decoding (bounds, categorical mapping)."""

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError, MergeError
from evomerge.merge.merger import unit_of
from evomerge.merge.methods import get_method
from evomerge.merge.recipe import Group, Recipe, Unit
from evomerge.search.genome import GenomeSpace

ALL_METHODS = ["task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp"]


def space(**kw):
    defaults = dict(n_experts=2, n_layers=8, expert_names=["math", "lang"], methods=ALL_METHODS, layer_groups=4)
    return GenomeSpace(**{**defaults, **kw})


def test_recipe_yaml_round_trip():
    s = space(split_attn_mlp=True)
    recipe = s.decode(np.random.default_rng(0).random(s.n_var))
    recipe.base, recipe.experts = "/m/base", ["/m/a", "/m/b"]
    again = Recipe.from_yaml(recipe.to_yaml())
    assert again.to_dict() == recipe.to_dict()


def test_recipe_from_bad_yaml():
    with pytest.raises(MergeError, match="not an evomerge recipe"):
        Recipe.from_yaml("just: text")
    with pytest.raises(MergeError, match="invalid recipe group"):
        Recipe.from_yaml("groups: [{part: legs, method: ties}]")


def test_mergekit_export_single_method():
    s = space(methods=["ties"], layer_groups=2, split_attn_mlp=True)
    x = np.linspace(0.1, 0.9, s.n_var)  # distinct values per group: filters are needed
    cfg = s.decode(x).to_mergekit(base="/m/base", experts=["/m/a", "/m/b"])
    assert cfg["merge_method"] == "ties" and cfg["base_model"] == "/m/base"
    assert [sl["sources"][1]["layer_range"] for sl in cfg["slices"]] == [[0, 4], [4, 8]]
    weight = cfg["slices"][0]["sources"][1]["parameters"]["weight"]
    filters = [c.get("filter") for c in weight]
    assert "embed_tokens" in filters and "mlp" in filters and "self_attn" in filters
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg
    # equal values everywhere collapse to one plain value per parameter
    same = s.decode(np.full(s.n_var, 0.5)).to_mergekit(base="/m/base", experts=["/m/a", "/m/b"])
    assert isinstance(same["slices"][0]["sources"][1]["parameters"]["weight"], float)


def test_mergekit_export_refuses_mixed_methods():
    recipe = Recipe(groups=[Group("e", "embed", "ties", {}), Group("l", "layers", "slerp", {}, layers=(0, 1)), Group("h", "head", "ties", {})])
    with pytest.raises(MergeError, match="mixing methods"):
        recipe.to_mergekit(base="b", experts=["x", "y"])


def test_units_of_llama_parameter_names():
    assert unit_of("model.embed_tokens.weight") == Unit("embed")
    assert unit_of("model.layers.3.self_attn.q_proj.weight") == Unit("layers", 3, "attn")
    assert unit_of("model.layers.3.input_layernorm.weight") == Unit("layers", 3, "attn")
    assert unit_of("model.layers.12.mlp.down_proj.weight") == Unit("layers", 12, "mlp")
    assert unit_of("model.norm.weight") == Unit("head")
    assert unit_of("lm_head.weight") == Unit("head")


# ------------------------------------------------------------------ genome


def test_layout_and_gene_count():
    s = space(split_attn_mlp=True)
    assert [sl.name for sl in s.slots][:3] == ["embed", "layers.0-1.attn", "layers.0-1.mlp"]
    assert len(s.slots) == 2 + 4 * 2
    # method + 2 weights + 2 densities + t + gamma + epsilon
    assert s.n_var == len(s.slots) * 8
    assert len(s.gene_names) == s.n_var


def test_layer_groups_partition_all_layers():
    for n_layers, groups in [(8, 3), (5, 5), (30, 4), (2, 1)]:
        s = space(n_layers=n_layers, layer_groups=groups)
        covered = [layer for sl in s.slots if sl.layers for layer in range(sl.layers[0], sl.layers[1] + 1)]
        assert covered == list(range(n_layers))


def test_method_gene_maps_bins_to_methods():
    s = space(layer_groups=1, separate_embed_head=False)
    idx = s.gene_names.index("layers.0-7.method")
    for i, method in enumerate(ALL_METHODS):
        for u in (i / 6 + 1e-9, (i + 0.5) / 6, (i + 1) / 6 - 1e-9):
            x = np.full(s.n_var, 0.5)
            x[idx] = u
            assert s.decode(x).groups[1].method == method
    x = np.full(s.n_var, 0.5)
    x[idx] = 1.0  # the closed upper end maps to the last method
    assert s.decode(x).groups[1].method == ALL_METHODS[-1]


@given(x=st.lists(st.floats(-0.5, 1.5, allow_nan=False), min_size=80, max_size=80))
@settings(max_examples=60, deadline=None)
def test_decode_respects_ranges_and_method_bounds(x):
    s = space(layer_groups=4, separate_embed_head=True, ranges={"weight": [0.2, 0.8], "density": [0.3, 0.9]})
    assert s.n_var == 6 * 8 and len(x) >= s.n_var
    recipe = s.decode(np.array(x[: s.n_var]))
    for g in recipe.groups:
        get_method(g.method).validate(g.params, 2)  # always valid for the method
        for w in g.params.get("weight", []):
            assert 0.2 <= w <= 0.8
        for d in g.params.get("density", []):
            assert 0.3 <= d <= 0.9


def test_modelwise_genome_embed_and_head_follow_layers():
    s = space(methods=["ties"], layer_groups=1, separate_embed_head=False)
    assert s.n_var == 4
    recipe = s.decode(np.array([0.0, 1.0, 0.5, 0.5]))
    assert [g.part for g in recipe.groups] == ["embed", "layers", "head"]
    assert all(g.params["weight"] == [0.0, 1.0] for g in recipe.groups)


def test_mixed_variable_round_trip():
    s = space(layer_groups=2)
    vars_ = s.mixed_variables()
    assert sum(name.endswith(".method") for name in vars_) == len(s.slots)
    values = {n: (3 if n.endswith(".method") else 0.25) for n in vars_}
    recipe = s.decode(s.from_mixed(values))
    assert all(g.method == ALL_METHODS[3] for g in recipe.groups)


def test_encode_reference_decodes_to_expert():
    s = space(methods=["task_arithmetic"], layer_groups=2)
    recipe = s.decode(s.encode_reference("task_arithmetic", [1.0, 0.0]))
    assert all(g.params["weight"] == [1.0, 0.0] for g in recipe.groups)


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(layer_groups=0), "layer_groups must be between 1"),
        (dict(layer_groups=9), "layer_groups must be between 1"),
        (dict(methods=["tiez"]), "unknown merge method 'tiez'"),
        (dict(methods=["model_stock"], n_experts=1, expert_names=["a"]), "cannot merge these 1 experts"),
        (dict(ranges={"wieght": [0, 1]}), "unknown parameter 'wieght'"),
        (dict(ranges={"weight": [1, 0]}), "low <= high"),
    ],
)
def test_bad_genome_configs(kw, message):
    with pytest.raises((ConfigError, MergeError), match=message):
        space(**kw)


def test_hand_made_genomes_decode_to_the_recipes_users_make():
    from evomerge.search.genome import GenomeSpace

    space = GenomeSpace(n_experts=2, n_layers=4, expert_names=["m", "l"], methods=("task_arithmetic", "ties", "slerp"), layer_groups=2)
    made = space.hand_made_genomes()
    assert list(made) == ["base", "expert:m", "expert:l", "task_arithmetic:0.3", "task_arithmetic:0.5", "task_arithmetic:0.7", "task_arithmetic:1", "ties:default"]
    for label, x in made.items():
        groups = space.decode(x).groups
        assert len(groups) == 4 and len({g.method for g in groups}) == 1, label
        p = groups[1].params
        if label.startswith("task_arithmetic:"):
            w = float(label.split(":")[1])
            assert groups[1].method == "task_arithmetic" and p["weight"] == [w, w]
        elif label == "ties:default":
            assert groups[1].method == "ties" and p["weight"] == [1.0, 1.0] and p["density"] == [0.5, 0.5]
        elif label == "expert:l":
            assert p["weight"] == [0.0, 1.0]
    # a TIES-only space expresses base/experts exactly (density 1) but not task arithmetic
    ties_only = GenomeSpace(n_experts=2, n_layers=4, methods=("ties",))
    assert list(ties_only.hand_made_genomes()) == ["base", "expert:expert0", "expert:expert1", "ties:default"]
    # out-of-range values are left out, never clipped into a different recipe
    narrow = GenomeSpace(n_experts=2, n_layers=4, methods=("task_arithmetic",), ranges={"weight": [0.2, 0.6]})
    assert list(narrow.hand_made_genomes()) == ["task_arithmetic:0.3", "task_arithmetic:0.5"]


def test_hand_made_strategy_evaluates_only_the_named_points():
    from evomerge.errors import ConfigError
    from evomerge.search.algorithms import hand_made
    from evomerge.search.genome import GenomeSpace

    space = GenomeSpace(n_experts=2, n_layers=4, methods=("ties",))
    strategy = hand_made(space, ["ties:default", "base"])
    strategy.setup(space.n_var, 2, 10, 0)
    X = strategy.ask()
    assert space.decode(X[0]).groups[1].params["density"] == [0.5, 0.5]
    strategy.tell(X, np.zeros((2, 2)))
    assert not strategy.has_next()
    with pytest.raises(ConfigError, match="task_arithmetic:0.5"):
        hand_made(space, ["task_arithmetic:0.5"])
