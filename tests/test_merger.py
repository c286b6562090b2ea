"""Model pool and in-place merger on tiny models built in the test."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.errors import MergeError, PoolError
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Group, Recipe
from evomerge.pool import ModelPool

from conftest import make_llama


def params(path: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(path))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.fixture(scope="module")
def merger(tiny_models):
    return Merger(ModelPool(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]}), device="cpu")


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_task_arithmetic_in_place_matches_checkpoints(merger, tiny_models):
    base, a, b = (params(tiny_models[k]) for k in ("base", "a", "b"))
    live_ids = {k: id(v) for k, v in merger.model.named_parameters()}
    merger.apply(Recipe.uniform("task_arithmetic", {"weight": [0.3, 0.9]}, merger.n_layers))
    assert {k: id(v) for k, v in merger.model.named_parameters()} == live_ids  # same objects: in place
    for name, p in merger.model.named_parameters():
        expected = base[name] + 0.3 * (a[name] - base[name]) + 0.9 * (b[name] - base[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


# each group copies one model (0 = base): a layer-wise recipe whose merged weights are known
LAYERWISE_PASSTHROUGH = Recipe(
    groups=[
        Group("embed", "embed", "passthrough", {"source": 0}),
        Group("l0", "layers", "passthrough", {"source": 1}, layers=(0, 0)),
        Group("l1-attn", "layers", "passthrough", {"source": 2}, layers=(1, 1), component="attn"),
        Group("l1-mlp", "layers", "passthrough", {"source": 1}, layers=(1, 1), component="mlp"),
        Group("head", "head", "passthrough", {"source": 2}),
    ]
)

def test_layerwise_recipe_routes_groups(merger, tiny_models):
    base, a, b = (params(tiny_models[k]) for k in ("base", "a", "b"))
    recipe = LAYERWISE_PASSTHROUGH
    merger.apply(recipe)
    live = state(merger.model)
    for name, value in live.items():
        if "embed" in name:
            expected = base[name]
        elif ".layers.0." in name or (".layers.1." in name and ".mlp." in name):
            expected = a[name]
        else:  # layer 1 attention + its norms, final norm, lm_head
            expected = b[name]
        torch.testing.assert_close(value, expected, msg=name)


def test_merging_twice_equals_fresh_merge(merger, tiny_models):
    second = Recipe.uniform("dare_ties", {"weight": [0.6, 0.5], "density": [0.4, 0.7], "seed": 3}, merger.n_layers)
    merger.apply(Recipe.uniform("ties", {"weight": [1.0, 0.2], "density": [0.2, 0.9]}, merger.n_layers))
    merger.apply(second)
    fresh = Merger(ModelPool(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]}), device="cpu")
    fresh.apply(second)
    for (name, x), (_, y) in zip(merger.model.named_parameters(), fresh.model.named_parameters()):
        assert torch.equal(x, y), name


def test_save_round_trips_through_from_pretrained(merger, tmp_path):
    recipe = Recipe.uniform("slerp", {"t": 0.3}, merger.n_layers)
    merger.apply(recipe)
    out = merger.save(tmp_path / "merged", recipe)
    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merger.model(ids).logits)
    assert Recipe.load(out / "evomerge_recipe.yaml").groups[0].method == "slerp"


def test_missing_path_is_a_clear_error(tiny_models, tmp_path):
    with pytest.raises(PoolError, match="model 'x': path does not exist"):
        ModelPool(tiny_models["base"], {"x": tmp_path / "nope"})
    with pytest.raises(PoolError, match="not a Hugging Face model folder"):
        ModelPool(tmp_path, {"a": tiny_models["a"]})


def test_shape_mismatch_names_the_tensor(tiny_models, tmp_path):
    other = make_llama(tmp_path / "wide", seed=5, intermediate_size=64)
    with pytest.raises(PoolError, match=r"shape mismatch for model\.layers\.0\.mlp\.\w+_proj\.weight: 'wide' has"):
        Merger(ModelPool(tiny_models["base"], {"a": tiny_models["a"], "wide": other}), device="cpu")


def test_non_finite_merge_is_reported(tiny_models, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["a"]))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    model.save_pretrained(str(tmp_path / "nan"))
    m = Merger(ModelPool(tiny_models["base"], {"nan": tmp_path / "nan"}), device="cpu")
    with pytest.raises(MergeError, match="layers.1.mlp are not finite"):
        m.apply(Recipe.uniform("task_arithmetic", {"weight": [1.0]}, m.n_layers))


def test_finite_weights_whose_sum_overflows_are_not_reported(tiny_models, tmp_path):
    """The finite check sums each unit first; a sum that overflows on finite weights must not fail the merge."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["a"]))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, :2] = 3e38  # finite; their float32 sum is inf
    model.save_pretrained(str(tmp_path / "huge"))
    m = Merger(ModelPool(tiny_models["base"], {"huge": tmp_path / "huge"}), device="cpu")
    m.apply(Recipe.uniform("task_arithmetic", {"weight": [1.0]}, m.n_layers))
    merged = m.model.model.layers[1].mlp.up_proj.weight
    assert torch.isfinite(merged).all() and merged[0, 0] > 1e38 and merged[0, 1] > 1e38


def test_recipe_must_cover_every_unit(merger):
    partial = Recipe(groups=[Group("l", "layers", "ties", {}, layers=(0, 1))])
    with pytest.raises(MergeError, match="recipe has no group for embed"):
        merger.apply(partial)
    overlapping = Recipe.uniform("ties", {}, merger.n_layers)
    overlapping.groups.append(Group("again", "layers", "ties", {}, layers=(1, 1), component="mlp"))
    with pytest.raises(MergeError, match="layers.1.mlp is covered by several recipe groups"):
        merger.apply(overlapping)


def test_out_of_bounds_weight_in_recipe(merger):
    with pytest.raises(MergeError, match="out of bounds"):
        merger.apply(Recipe.uniform("ties", {"weight": [9.0, 1.0]}, merger.n_layers))


def test_unknown_device_is_a_clear_error(tiny_models):
    with pytest.raises(MergeError, match="unknown device 'gpu0'"):
        Merger(ModelPool(tiny_models["base"], [tiny_models["a"]]), device="gpu0")


def test_tokenizer_mismatch_is_a_clear_error(tiny_models, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "other_vocab"
    shutil.copytree(tiny_models["a"], other)
    tok = AutoTokenizer.from_pretrained(str(other))
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(str(other))
    with pytest.raises(PoolError, match="expert 'other_vocab' has a different tokenizer vocabulary"):
        Merger(ModelPool(tiny_models["base"], [tiny_models["a"], other]), device="cpu")


@pytest.mark.parametrize(
    "method, params",
    [
        ("ties", {"weight": [1.0, 0.4], "density": [0.3, 0.8]}),
        ("dare_ties", {"weight": [0.6, 0.5], "density": [0.4, 0.7], "seed": 2}),
        ("della", {"weight": [0.6, 0.5], "density": [0.4, 0.7], "epsilon": 0.2}),
        ("slerp", {"t": 0.35}),
        ("model_stock", {}),
    ],
)
def test_offloaded_task_vectors_merge_like_resident_ones(merger, tiny_models, method, params):
    offloaded = Merger(ModelPool(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]}), device="cpu", offload=True)
    assert offloaded.host_bytes() > 0 and offloaded.resident_bytes() < merger.resident_bytes()
    recipe = Recipe.uniform(method, params, merger.n_layers)
    for _ in range(2):  # twice: the staging buffers are refilled, cached statistics reused
        merger.apply(recipe)
        offloaded.apply(recipe)
        for (name, x), (_, y) in zip(merger.model.named_parameters(), offloaded.model.named_parameters()):
            assert torch.equal(x, y), name


def test_memory_estimate_matches_the_buffers_and_fails_early(merger, tiny_models, monkeypatch):
    from evomerge.merge import merger as merger_module

    pool = ModelPool(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]})
    n = pool.parameter_count()
    assert n == sum(p.numel() for p in merger.model.parameters())
    device_bytes, host_bytes = merger_module.estimate_bytes(n, 2, torch.float32)
    assert (device_bytes, host_bytes) == (merger.resident_bytes(), 0) == (16 * n, 0)
    monkeypatch.setattr(merger_module, "available_bytes", lambda device: 1000)  # 1000 bytes free
    need = f"{16 * n / 2**30:.1f}"
    with pytest.raises(MergeError, match=rf"^merging needs {need} GiB on cpu \(base, output and 2 task vectors; .* in float32\) but cpu has 0.0 GiB free"):
        Merger(pool, device="cpu")


def test_dtype_auto_is_bfloat16_on_gpu_and_float32_on_cpu(monkeypatch):
    import torch

    import evomerge.merge.merger as merger_module
    from evomerge.session import resolve_dtype

    assert resolve_dtype("auto", "cpu") == "float32"
    assert resolve_dtype(None, "cpu") == "float32"
    assert resolve_dtype("float16", "cpu") == "float16"  # an explicit choice is kept
    monkeypatch.setattr(merger_module, "resolve_device", lambda device: torch.device("cuda"))
    assert resolve_dtype("auto", "cuda") == "bfloat16"
