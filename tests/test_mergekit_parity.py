"""Parity with real mergekit (0.1.5): each method's export, run by mergekit on tiny models
built here, gives the weights evomerge's merger gives, tensor by tensor.

Deterministic methods must agree to float rounding for every setting, layer-wise recipes
with attention/MLP splits and per-group lambda included; random methods (DARE, DELLA,
DELLA-linear) draw different masks in the two tools, so they are compared at density 1 only.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import MergeError
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Group, Recipe
from evomerge.pool import ModelPool

from conftest import make_llama
from test_merger import LAYERWISE_PASSTHROUGH

pytest.importorskip("mergekit", reason="mergekit is not installed (pip install -e '.[dev]' pins mergekit==0.1.5); parity tests skipped")

from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Base + three experts; the MLP tensors (32 x 160) are above the 4096-entry size
    where the default magnitude table starts to sample, the others below it."""
    root = tmp_path_factory.mktemp("parity")
    base = make_llama(root / "base", seed=0, intermediate_size=160)
    return {"base": base, **{n: make_llama(root / n, seed=s, perturb_from=base) for n, s in (("a", 1), ("b", 2), ("c", 3))}}


_MERGERS: dict[tuple, Merger] = {}


def evomerge_merge(models, recipe: Recipe, experts: tuple[str, ...], table_size) -> dict[str, torch.Tensor]:
    key = (experts, table_size)
    if key not in _MERGERS:
        pool = ModelPool(models["base"], {e: models[e] for e in experts})
        _MERGERS[key] = Merger(pool, device="cpu", table_size=table_size)
    merger = _MERGERS[key]
    merger.apply(recipe)
    return {k: v.detach().clone() for k, v in merger.model.state_dict().items()}


def mergekit_merge(models, recipe: Recipe, experts: tuple[str, ...], out: Path) -> dict[str, torch.Tensor]:
    cfg = recipe.to_mergekit(base=str(models["base"]), experts=[str(models[e]) for e in experts])
    config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(cfg)))  # as mergekit-yaml reads it
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def assert_same_weights(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name].to(value.dtype), value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def uniform(method: str, params: dict, n_layers: int = 2) -> Recipe:
    return Recipe.uniform(method, params, n_layers)


W2, D2 = [1.0, 0.6], [0.4, 0.7]
CASES = {
    "linear": (uniform("linear", {"weight": [0.3, 0.9]}), ("a", "b")),
    "linear_unnormalized": (uniform("linear", {"weight": [0.5, 0.7], "normalize": 0}), ("a", "b")),
    "task_arithmetic": (uniform("task_arithmetic", {"weight": [0.3, 0.9], "lambda": 1.3}), ("a", "b")),
    "ties": (uniform("ties", {"weight": W2, "density": D2}), ("a", "b")),
    "ties_unnormalized_lambda": (uniform("ties", {"weight": W2, "density": [0.29, 0.5], "normalize": 0, "lambda": 0.8}), ("a", "b")),
    "ties_density_1": (uniform("ties", {"weight": W2, "density": [1.0, 1.0]}), ("a", "b")),
    "ties_3_experts": (uniform("ties", {"weight": [0.9, -0.4, 0.5], "density": [0.2, 0.55, 0.9]}), ("a", "b", "c")),
    "breadcrumbs": (uniform("breadcrumbs", {"weight": W2, "density": [0.5, 0.8], "gamma": 0.1}), ("a", "b")),
    "breadcrumbs_density_plus_gamma_over_1": (uniform("breadcrumbs", {"weight": W2, "density": [0.95, 0.9], "gamma": 0.2}), ("a", "b")),
    "breadcrumbs_density_1": (uniform("breadcrumbs", {"weight": W2, "density": [1.0, 1.0], "gamma": 0.3}), ("a", "b")),
    "slerp": (uniform("slerp", {"t": 0.3}), ("a", "b")),
    "slerp_one_expert": (uniform("slerp", {"t": 0.7}), ("a",)),
    "model_stock": (uniform("model_stock", {}), ("a", "b")),
    "model_stock_3_experts": (uniform("model_stock", {}), ("a", "b", "c")),
    # random methods: equal only where nothing is dropped
    "dare_linear_density_1": (uniform("dare_linear", {"weight": W2, "density": [1.0, 1.0], "lambda": 1.2}), ("a", "b")),
    "dare_ties_density_1": (uniform("dare_ties", {"weight": W2, "density": [1.0, 1.0]}), ("a", "b")),
    "dare_ties_density_1_unnormalized": (uniform("dare_ties", {"weight": W2, "density": [1.0, 1.0], "normalize": 0}), ("a", "b")),
    "della_density_1": (uniform("della", {"weight": W2, "density": [1.0, 1.0], "epsilon": 0.3}), ("a", "b")),
    "passthrough_layerwise": (LAYERWISE_PASSTHROUGH, ("a", "b")),
    "ties_layerwise_split_per_group_lambda": (
        Recipe(
            groups=[
                Group("embed", "embed", "ties", {"weight": [0.5, 0.5], "density": [0.3, 0.3], "lambda": 0.7}),
                Group("l0-attn", "layers", "ties", {"weight": [1.0, 0.2], "density": [0.6, 0.2], "lambda": 1.4}, layers=(0, 0), component="attn"),
                Group("l0-mlp", "layers", "ties", {"weight": [0.3, 1.1], "density": [0.25, 0.8], "lambda": 0.9, "normalize": 0}, layers=(0, 0), component="mlp"),
                Group("l1", "layers", "ties", {"weight": [0.8, 0.8], "density": [0.5, 0.45]}, layers=(1, 1)),
                Group("head", "head", "ties", {"weight": [1.2, 0.1], "density": [0.9, 0.1], "lambda": 2.0}),
            ]
        ),
        ("a", "b"),
    ),
    "task_arithmetic_layerwise_split": (
        Recipe(
            groups=[
                Group("embed", "embed", "task_arithmetic", {"weight": [0.1, 0.2]}),
                Group("attn", "layers", "task_arithmetic", {"weight": [1.0, 0.5], "lambda": 0.5}, layers=(0, 1), component="attn"),
                Group("mlp-0", "layers", "task_arithmetic", {"weight": [0.2, 0.9], "lambda": 1.5}, layers=(0, 0), component="mlp"),
                Group("mlp-1", "layers", "task_arithmetic", {"weight": [0.7, -0.3], "lambda": 2.5}, layers=(1, 1), component="mlp"),
                Group("head", "head", "task_arithmetic", {"weight": [0.0, 1.0], "lambda": 0.3}),
            ]
        ),
        ("a", "b"),
    ),
    # ---- mergekit's extra methods (methods_extra.py)
    "task_arithmetic_trim": (uniform("task_arithmetic_trim", {"weight": W2, "density": [0.3, 0.8], "lambda": 1.2}), ("a", "b")),
    "task_arithmetic_trim_3_experts": (uniform("task_arithmetic_trim", {"weight": [0.9, -0.4, 0.5], "density": [0.2, 0.55, 1.0]}), ("a", "b", "c")),
    "breadcrumbs_ties": (uniform("breadcrumbs_ties", {"weight": W2, "density": [0.5, 0.8], "gamma": 0.1}), ("a", "b")),
    "breadcrumbs_ties_normalized_density_plus_gamma_over_1": (
        uniform("breadcrumbs_ties", {"weight": [0.9, -0.4, 0.5], "density": [0.95, 0.9, 0.3], "gamma": 0.2, "normalize": 1, "lambda": 0.7}),
        ("a", "b", "c"),
    ),
    "sce": (uniform("sce", {}), ("a", "b", "c")),
    "sce_select_topk": (uniform("sce", {"select_topk": 0.4}), ("a", "b")),
    "karcher": (uniform("karcher", {}), ("a", "b")),
    "karcher_3_experts": (uniform("karcher", {"weight": [0.7, 0.7, 0.7], "max_iter": 20}), ("a", "b", "c")),
    "multislerp": (uniform("multislerp", {"weight": [0.3, 0.9, 0.5]}), ("a", "b", "c")),
    "multislerp_unnormalized": (uniform("multislerp", {"weight": [0.4, 0.8], "normalize_weights": 0}), ("a", "b")),
    "multislerp_one_expert": (uniform("multislerp", {"weight": [0.6]}), ("a",)),
    "nuslerp": (uniform("nuslerp", {"weight": [0.3, 0.9]}), ("a", "b")),
    "nuslerp_rows": (uniform("nuslerp", {"weight": [0.8, 0.5], "flatten": 0}), ("a", "b")),
    "nuslerp_columns": (uniform("nuslerp", {"weight": [0.8, 0.5], "flatten": 0, "row_wise": 1}), ("a", "b")),
    # DELLA-linear is random: equal only where nothing is dropped (density 1; both tools
    # then keep every entry and skip the L1 rescale)
    "della_linear_density_1": (uniform("della_linear", {"weight": W2, "density": [1.0, 1.0], "epsilon": 0.3, "lambda": 1.2}), ("a", "b")),
    "della_linear_density_1_normalized": (
        uniform("della_linear", {"weight": [0.4, 0.9], "density": [1.0, 1.0], "normalize": 1, "rescale": 0}),
        ("a", "b"),
    ),
    "breadcrumbs_ties_layerwise_split": (
        Recipe(
            groups=[
                Group("embed", "embed", "breadcrumbs_ties", {"weight": [0.5, 0.5], "density": [0.6, 0.6], "gamma": 0.05}),
                Group("attn", "layers", "breadcrumbs_ties", {"weight": [1.0, 0.4], "density": [0.3, 0.9], "gamma": 0.2, "normalize": 1}, layers=(0, 1), component="attn"),
                Group("mlp-0", "layers", "breadcrumbs_ties", {"weight": [0.6, 0.6], "density": [0.7, 0.2], "gamma": 0.0, "lambda": 1.7}, layers=(0, 0), component="mlp"),
                Group("mlp-1", "layers", "breadcrumbs_ties", {"weight": [1.1, 0.2], "density": [0.4, 0.4], "gamma": 0.1}, layers=(1, 1), component="mlp"),
                Group("head", "head", "breadcrumbs_ties", {"weight": [1.0, 1.0], "density": [1.0, 0.5], "gamma": 0.1}),
            ]
        ),
        ("a", "b"),
    ),
    "sce_layerwise": (
        Recipe(
            groups=[
                Group("embed", "embed", "sce", {"select_topk": 1.0}),
                Group("l0", "layers", "sce", {"select_topk": 0.3}, layers=(0, 0)),
                Group("l1", "layers", "sce", {"select_topk": 0.7}, layers=(1, 1)),
                Group("head", "head", "sce", {"select_topk": 0.5}),
            ]
        ),
        ("a", "b", "c"),
    ),
    "breadcrumbs_layerwise_split": (
        Recipe(
            groups=[
                Group("embed", "embed", "breadcrumbs", {"weight": [0.5, 0.5], "density": [0.6, 0.6], "gamma": 0.05}),
                Group("attn", "layers", "breadcrumbs", {"weight": [1.0, 0.4], "density": [0.3, 0.9], "gamma": 0.2}, layers=(0, 1), component="attn"),
                Group("mlp", "layers", "breadcrumbs", {"weight": [0.6, 0.6], "density": [0.7, 0.2], "gamma": 0.0, "lambda": 1.7}, layers=(0, 1), component="mlp"),
                Group("head", "head", "breadcrumbs", {"weight": [1.0, 1.0], "density": [1.0, 0.5], "gamma": 0.1}),
            ]
        ),
        ("a", "b"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mergekit_reproduces_evomerge_weights(models, tmp_path, case):
    recipe, experts = CASES[case]
    # exact magnitude tables: the MLP tensors are above the default table's exact size
    ours = evomerge_merge(models, recipe, experts, table_size=None)
    assert_same_weights(ours, mergekit_merge(models, recipe, experts, tmp_path / "merged"))


def test_default_table_is_exact_below_its_size_and_at_density_1(models, tmp_path):
    """The default (sampled) table is exact for tensors up to 4096 entries and for keeping
    everything; only the MLP tensors here (5120 entries) may differ, at density < 1."""
    recipe, experts = CASES["ties"]
    ours = evomerge_merge(models, recipe, experts, table_size=4096)
    theirs = mergekit_merge(models, recipe, experts, tmp_path / "merged")
    assert_same_weights({k: v for k, v in ours.items() if ".mlp." not in k}, {k: v for k, v in theirs.items() if ".mlp." not in k})
    recipe, experts = CASES["ties_density_1"]
    assert_same_weights(evomerge_merge(models, recipe, experts, table_size=4096), mergekit_merge(models, recipe, experts, tmp_path / "m1"))


# ------------------------------------------------------------------ export contents and refusals (no mergekit run)


def test_exports_write_every_parameter_explicitly():
    cfg = uniform("dare_ties", {"weight": [0.5, 0.5], "density": [0.4, 0.6]}).to_mergekit(base="B", experts=["X", "Y"])
    shared = cfg["slices"][0]["parameters"]
    # evomerge's DARE-TIES normalizes by default, mergekit's does not: it must be written
    assert shared["normalize"] is True and shared["rescale"] is True and shared["lambda"] == 1.0
    assert "seed" not in shared
    assert [s["model"] for s in cfg["slices"][0]["sources"]] == ["B", "X", "Y"]
    assert cfg["slices"][0]["sources"][2]["parameters"] == {"weight": 0.5, "density": 0.6}
    ta = uniform("task_arithmetic", {"weight": [0.5, 0.5]}).to_mergekit(base="B", experts=["X", "Y"])
    assert ta["slices"][0]["parameters"] == {"normalize": False, "rescale": False, "lambda": 1.0}


def test_linear_slerp_exports_name_the_right_sources():
    lin = uniform("linear", {"weight": [0.2, 0.6]}).to_mergekit(base="B", experts=["X", "Y"])
    assert "base_model" not in lin and [s["model"] for s in lin["slices"][0]["sources"]] == ["X", "Y"]
    sl = uniform("slerp", {"t": 0.3}).to_mergekit(base="B", experts=["X", "Y"])
    assert sl["base_model"] == "X" and [s["model"] for s in sl["slices"][0]["sources"]] == ["X", "Y"]


@pytest.mark.parametrize(
    "recipe, message",
    [
        (uniform("della", {"weight": [1, 1], "density": [0.5, 0.95], "epsilon": 0.1}), r"density \+- epsilon inside \(0, 1\), expert 1 has density 0.95"),
        (uniform("linear", {"weight": [0.5, -0.5]}), "weights summing to 0"),
        (
            Recipe(groups=[Group("e", "embed", "ties", {}), Group("l", "layers", "slerp", {}, layers=(0, 1)), Group("h", "head", "ties", {})]),
            r"mixing methods \(slerp, ties\)",
        ),
    ],
)
def test_export_refuses_what_mergekit_cannot_express(recipe, message):
    with pytest.raises(MergeError, match=message):
        recipe.to_mergekit(base="B", experts=["X", "Y"])


@pytest.mark.parametrize(
    "recipe, message",
    [
        (uniform("tsv_m", {}), "method 'tsv_m': mergekit 0.1.5 has no SVD-family method"),
        (uniform("iso_c", {}), "method 'iso_c': mergekit 0.1.5 has no SVD-family method"),
        (uniform("iso_cts", {}), "method 'iso_cts': mergekit 0.1.5 has no SVD-family method"),
        (
            uniform("della_linear", {"weight": [1, 1], "density": [0.1, 0.5], "epsilon": 0.15}),
            r"\(della_linear\): mergekit needs density \+- epsilon inside \(0, 1\), expert 0 has density 0.1, epsilon 0.15",
        ),
        (uniform("karcher", {"weight": [1.0, 0.5]}), "mergekit's karcher weighs the experts equally, these weights are 1, 0.5"),
        (uniform("multislerp", {"weight": [0.0, 0.0]}), "weights summing to 0 make mergekit's multislerp divide by 0"),
    ],
)
def test_export_refuses_new_methods_mergekit_lacks_or_computes_differently(recipe, message):
    with pytest.raises(MergeError, match=message) as err:
        recipe.to_mergekit(base="B", experts=["X", "Y"])
    assert "\n" not in str(err.value)


def test_new_method_exports_translate_names_and_sources():
    trim = uniform("task_arithmetic_trim", {"weight": [0.5, 0.7], "density": [0.3, 0.4]}).to_mergekit(base="B", experts=["X", "Y"])
    assert trim["merge_method"] == "breadcrumbs"
    assert trim["slices"][0]["parameters"] == {"normalize": False, "rescale": False, "gamma": 0.0, "lambda": 1.0}
    nu = uniform("nuslerp", {"weight": [0.5, 0.7], "flatten": 0, "row_wise": 1}).to_mergekit(base="B", experts=["X", "Y"])
    assert nu["base_model"] == "B" and nu["slices"][0]["parameters"] == {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    assert nu["slices"][0]["sources"][2]["parameters"] == {"weight": 0.7}
    ka = uniform("karcher", {"weight": [0.4, 0.4]}).to_mergekit(base="B", experts=["X", "Y"])
    assert "base_model" not in ka and [s["model"] for s in ka["slices"][0]["sources"]] == ["X", "Y"]
    assert ka["slices"][0]["parameters"] == {"max_iter": 10, "tol": 1e-5} and "parameters" not in ka["slices"][0]["sources"][0]
    dl = uniform("della_linear", {"weight": [1, 1], "density": [0.5, 0.5]}).to_mergekit_yaml(base="B", experts=["X", "Y"])
    assert "masks differ" in dl.splitlines()[0] and "seed" not in dl


def test_random_method_export_says_masks_differ():
    text = uniform("della", {"weight": [1, 1], "density": [0.5, 0.5]}).to_mergekit_yaml(base="B", experts=["X", "Y"])
    assert text.startswith("# exported by evomerge") and "masks differ" in text.splitlines()[0]
    assert yaml.safe_load(text)["merge_method"] == "della"
    assert "masks differ" not in uniform("ties", {}).to_mergekit_yaml(base="B", experts=["X", "Y"])


def test_della_linear_export_puts_epsilon_where_mergekit_reads_it(models, tmp_path):
    """DELLA-linear cannot be compared below density 1 (masks differ), so check that the
    slice-level epsilon we write is the one mergekit uses: moved out of range, it must raise."""
    recipe = uniform("della_linear", {"weight": [1.0, 1.0], "density": [0.5, 0.5], "epsilon": 0.1})
    cfg = recipe.to_mergekit(base=str(models["base"]), experts=[str(models["a"]), str(models["b"])])
    assert all(s["parameters"]["epsilon"] == 0.1 for s in cfg["slices"])
    for s in cfg["slices"]:
        s["parameters"]["epsilon"] = 0.6  # density + epsilon > 1: mergekit's della_magprune raises
    options = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False)
    with pytest.raises(ValueError, match="Epsilon must be chosen"):
        run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "m"), options)


def test_model_paths_with_at_or_plus_are_exported_so_mergekit_reads_them(tmp_path):
    """mergekit reads ``path@revision`` and ``model+lora`` in its string form: such paths are
    written in the structured form, which it reads back as the same path."""
    import yaml
    from mergekit.config import MergeConfiguration

    from evomerge.merge.recipe import Recipe

    recipe = Recipe.uniform("task_arithmetic", {"weight": [0.5, 0.5]}, 2)
    base, experts = str(tmp_path / "base@v1"), [str(tmp_path / "math+x"), str(tmp_path / "plain")]
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_mergekit_yaml(base=base, experts=experts)))
    assert config.base_model.model.path == base and config.base_model.model.revision is None
    paths = [src.model.model.path for s in config.slices for src in s.sources]
    assert set(paths) == {base, *experts}
    assert all(src.model.lora is None for s in config.slices for src in s.sources)
