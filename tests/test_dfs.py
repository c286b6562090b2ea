"""Data-flow-space (layer-path) merging: genome decoding, the in-memory path model
(identity, repeated layers with the KV cache, errors), lm-eval scoring, export."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from evomerge.dfs.model import PathMerger
from evomerge.dfs.path import DfsLayout, LayerPath, Slot
from evomerge.errors import ConfigError, MergeError
from evomerge.merge.merger import Merger
from evomerge.pool import ModelPool


# ---------------------------------------------------------------- genome (pure)


def test_layout_decodes_include_and_scale_genes_by_hand():
    lay = DfsLayout(["base", "expert:a"], n_layers=2, repeats=1, scale_range=(0.5, 2.0))
    # slots: base[0], base[1], expert:a[0], expert:a[1]; scale genes: base>expert:a, expert:a>base
    assert lay.n_slots == 4 and lay.n_var == 6
    assert lay.gene_names[-2:] == ["scale.base>expert:a", "scale.expert:a>base"]
    x = [0.9, 0.2, 0.1, 0.5, 0.5, 0.0]
    path = lay.decode(x)
    # base[0]; then expert:a[1] entered from base: 0.5 + 0.5 * 1.5 = 1.25
    assert path.slots == [Slot("base", 0, 1.0), Slot("expert:a", 1, 1.25)]
    # repeats=2 cycles the models again: slot 5 is base[1], slot 6 expert:a[0]
    lay2 = DfsLayout(["base", "expert:a"], n_layers=2, repeats=2, scale_range=(0.5, 2.0))
    assert [lay2.slot(t) for t in range(8)] == [("base", 0), ("base", 1), ("expert:a", 0), ("expert:a", 1)] * 2
    x2 = np.zeros(lay2.n_var)
    x2[[3, 5, 7]] = 1.0  # expert:a[1] (first slot: from the embeddings of base), base[1], expert:a[1]
    x2[8], x2[9] = 1.0, 0.0  # base>expert:a = 2.0, expert:a>base = 0.5
    assert lay2.decode(x2).slots == [Slot("expert:a", 1, 2.0), Slot("base", 1, 0.5), Slot("expert:a", 1, 2.0)]


def test_identity_and_hand_made_genomes():
    lay = DfsLayout(["base", "expert:a", "expert:b"], n_layers=3, repeats=2)
    made = lay.hand_made()
    assert list(made) == ["path:base", "path:expert:a", "path:expert:b", "path:stack"]
    assert lay.decode(made["path:base"]).slots == [Slot("base", i, 1.0) for i in range(3)]
    # expert:a alone is entered from base's embeddings at scale 1 (gene for 1.0 in [0.5, 2])
    assert lay.decode(made["path:expert:a"]).slots == [Slot("expert:a", i, 1.0) for i in range(3)]
    assert len(lay.decode(made["path:stack"]).slots) == 9
    # a range without 1: single-expert paths cannot be expressed exactly, the identity can
    assert list(DfsLayout(["base", "expert:a"], 2, scale_range=(1.5, 2.0)).hand_made()) == ["path:base"]
    # scale_range [1, 1]: no scale genes
    assert DfsLayout(["base", "expert:a"], 2, scale_range=(1.0, 1.0)).n_var == 4


def test_layout_config_errors():
    with pytest.raises(ConfigError, match="repeats"):
        DfsLayout(["base"], 2, repeats=0)
    with pytest.raises(ConfigError, match="twice"):
        DfsLayout(["base", "base"], 2)
    with pytest.raises(ConfigError, match="scale_range"):
        DfsLayout(["base"], 2, scale_range=(0.0, 1.0))


def test_path_dict_round_trip_and_describe():
    p = LayerPath([Slot("base", 0), Slot("base", 1), Slot("expert:a", 1, 1.5), Slot("base", 1)], ["base", "expert:a"])
    assert LayerPath.from_dict(p.to_dict()) == p
    assert p.describe() == "base[0-1] > expert:a[1]*1.5 > base[1]"


# ---------------------------------------------------------------- in-memory path model


@pytest.fixture(scope="module")
def tiny_path(tiny_models):
    pool = ModelPool(tiny_models["base"], {"a": tiny_models["a"], "b": tiny_models["b"]})
    merger = Merger(pool, device="cpu")
    return PathMerger(merger, ["a", "b"], ["base", "expert:a", "expert:b"])


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).eval()


IDS = torch.tensor([[3, 7, 11, 5, 9, 2, 14, 6]])


def test_identity_path_reproduces_each_model_exactly(tiny_path, tiny_models):
    models = ["base", "expert:a", "expert:b"]
    for name, folder in zip(models, [tiny_models["base"], tiny_models["a"], tiny_models["b"]]):
        tiny_path.apply(LayerPath([Slot(name, 0), Slot(name, 1)], models))
        with torch.no_grad():
            got = tiny_path.model(IDS).logits
            want = _load(folder)(IDS).logits
        if name == "base":
            assert torch.equal(got, want)
        else:  # the test experts perturb embeddings and head too; those come from base here
            assert not torch.equal(got, want)
    # the resident layers hold the model's own weights (expert a = its folder's layer 1)
    want = _load(tiny_models["a"]).model.layers[1].mlp.up_proj.weight
    assert torch.equal(tiny_path.resident["expert:a"][1].mlp.up_proj.weight, want)


def _greedy(model, ids, n, use_cache):
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_repeated_layer_generates_with_kv_cache(tiny_path):
    models = ["base", "expert:a", "expert:b"]
    path = LayerPath([Slot("base", 0), Slot("base", 1), Slot("base", 0), Slot("expert:a", 1, 1.5), Slot("base", 1, 0.75)], models)
    tiny_path.apply(path)
    assert tiny_path.model.config.num_hidden_layers == 5
    # the slot references the resident layer: no copy
    assert tiny_path.model.model.layers[0].layer is tiny_path.model.model.layers[2].layer is tiny_path.resident["base"][0]
    cached = _greedy(tiny_path.model, IDS, 12, use_cache=True)
    plain = _greedy(tiny_path.model, IDS, 12, use_cache=False)
    assert cached == plain
    # the same path materialised (deep-copied layers, own layer_idx, scales as a pre-hook)
    mat = copy.deepcopy(tiny_path.model)
    tiny_path.restore()
    layers = []
    for i, s in enumerate(path.slots):
        layer = copy.deepcopy(tiny_path.resident[s.model][s.layer])
        layer.self_attn.layer_idx = i
        if s.scale != 1.0:
            layer.register_forward_pre_hook(lambda _m, args, kwargs, k=s.scale: ((args[0] * k, *args[1:]), kwargs), with_kwargs=True)
        layers.append(layer)
    mat.model.layers = torch.nn.ModuleList(layers)
    assert _greedy(mat, IDS, 12, use_cache=True) == cached
    tiny_path.apply(path)
    with torch.no_grad():
        assert torch.equal(mat(IDS).logits, tiny_path.model(IDS).logits)
    # (checked: without the per-slot layer_idx, slot 2 appends to slot 0's cache and the
    # cached generation differs from the uncached one.) The resident layer keeps its index:
    assert tiny_path.resident["base"][0].self_attn.layer_idx == 0


def test_recipes_restore_the_model_and_bad_paths_are_clear_errors(tiny_path, tiny_models):
    from evomerge.merge.recipe import reference_recipes

    models = ["base", "expert:a", "expert:b"]
    tiny_path.apply(LayerPath([Slot("expert:b", 0)], models))
    tiny_path.apply(reference_recipes(2, ["a", "b"], 2)["base"])
    assert tiny_path.model.config.num_hidden_layers == 2 and len(tiny_path.model.model.layers) == 2
    with torch.no_grad():
        assert torch.equal(tiny_path.model(IDS).logits, _load(tiny_models["base"])(IDS).logits)
    with pytest.raises(MergeError, match="empty"):
        tiny_path.apply(LayerPath([], models))
    with pytest.raises(MergeError, match="not one of"):
        tiny_path.apply(LayerPath([Slot("expert:c", 0)], models))
    with pytest.raises(MergeError, match="layer 2 of base, which has 2"):
        tiny_path.apply(LayerPath([Slot("base", 2)], models))


# ---------------------------------------------------------------- export


def test_export_round_trips_with_identical_logits(tiny_path, tiny_models, tmp_path):
    from evomerge.dfs.export import save_path_model
    from evomerge.dfs.path import pool_paths

    models = ["base", "expert:a", "expert:b"]
    path = LayerPath([Slot("base", 0), Slot("base", 1), Slot("expert:a", 1), Slot("base", 0), Slot("base", 1)], models)
    out = save_path_model(tiny_path, path, tmp_path / "exported")
    tiny_path.apply(path)
    loaded = _load(out)
    assert loaded.config.num_hidden_layers == 5
    assert [layer.self_attn.layer_idx for layer in loaded.model.layers] == [0, 1, 2, 3, 4]
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, tiny_path.model(IDS).logits)
    assert _greedy(loaded, IDS, 10, use_cache=True) == _greedy(tiny_path.model, IDS, 10, use_cache=True)
    assert LayerPath.from_dict(__import__("yaml").safe_load((out / "evomerge_path.yaml").read_text())).slots == path.slots
    # mergekit passthrough: runs of consecutive layers of one model become one slice
    paths = pool_paths(str(tiny_models["base"]), {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])})
    text = path.to_mergekit_yaml(paths)
    cfg = __import__("yaml").safe_load(text)
    assert cfg["merge_method"] == "passthrough"
    assert [(s["sources"][0]["model"], s["sources"][0]["layer_range"]) for s in cfg["slices"]] == [
        (paths["base"], [0, 2]), (paths["expert:a"], [1, 2]), (paths["base"], [0, 2])
    ]
    # scales are refused with a one-line reason, by both exports
    scaled = LayerPath([Slot("base", 0), Slot("expert:a", 1, 1.5), Slot("base", 1)], models)
    with pytest.raises(MergeError, match=r"scales its input by 1.5.*scale_range=\[1,1\]"):
        save_path_model(tiny_path, scaled, tmp_path / "scaled")
    with pytest.raises(MergeError, match="cannot scale"):
        scaled.to_mergekit_yaml(paths)
    # mergekit takes embeddings from the first slice's model and the head from the last's
    with pytest.raises(MergeError, match="first slice"):
        LayerPath([Slot("base", 0), Slot("expert:a", 1)], models).to_mergekit_yaml(paths)


def test_mergekit_passthrough_reproduces_the_export(tiny_path, tiny_models, tmp_path):
    pytest.importorskip("mergekit", reason="mergekit is not installed; passthrough parity skipped")
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    from evomerge.dfs.export import save_path_model
    from evomerge.dfs.path import pool_paths

    models = ["base", "expert:a", "expert:b"]
    path = LayerPath([Slot("base", 0), Slot("expert:b", 0), Slot("expert:a", 1), Slot("base", 1)], models)
    paths = pool_paths(str(tiny_models["base"]), {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])})
    ours = load_file(str(save_path_model(tiny_path, path, tmp_path / "ours") / "model.safetensors"))
    config = MergeConfiguration.model_validate(yaml.safe_load(path.to_mergekit_yaml(paths)))
    run_merge(config, str(tmp_path / "mk"), MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    theirs = {}
    for f in sorted((tmp_path / "mk").glob("*.safetensors")):
        theirs.update(load_file(str(f)))
    assert set(theirs) == set(ours)
    for k in ours:
        assert torch.equal(ours[k], theirs[k].to(ours[k].dtype)), k


# ---------------------------------------------------------------- fitness and the CLI


def test_lm_eval_scores_a_path_model(test_zoo):
    from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
    from evomerge.merge.recipe import reference_recipes

    pool = ModelPool(test_zoo.base, dict(test_zoo.experts))
    names = list(test_zoo.experts)
    pm = PathMerger(Merger(pool, device="cpu"), names, ["base", *(f"expert:{n}" for n in names)])
    tasks = [FitnessTask("math", "toy_math", "exact_match,first-number"), FitnessTask("lang", "toy_lang", "acc,none")]
    fitness = LmEvalFitness(pm.model, pm.tokenizer, tasks, subset_size=24, batch_size=32, max_length=64)
    pm.apply(reference_recipes(len(names), names, pm.n_layers)["base"])
    base = fitness()
    L = pm.n_layers
    pm.apply(LayerPath([Slot("base", i) for i in range(L)], pm.models))
    assert fitness() == base  # the identity path scores exactly as the base model
    # a path through a repeated layer generates (toy_math is generate_until, KV cache on)
    pm.apply(LayerPath([Slot("base", i) for i in range(L)] + [Slot("base", L - 1, 0.8)], pm.models))
    repeated = fitness()
    assert set(repeated) == {"math", "lang"} and all(0.0 <= v <= 1.0 for v in repeated.values())
    assert repeated != base


@pytest.mark.slow
def test_dfs_search_cli_records_paths_and_exports(test_zoo, tmp_path):
    import json

    from test_cli import cli, pool_args

    run = tmp_path / "run"
    cli(*pool_args(test_zoo), "genome=dfs", "genome.repeats=1", "genome.scale_range=[1,1]", "search.max_evals=8",
        "algorithm.pop_size=4", "report.html=false", "report.plots=false", f"hydra.run.dir={run}", cwd=tmp_path)
    records = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines()]
    search = [r for r in records if r["kind"] == "search"]
    assert len(search) == 8 and all(r["recipe"]["kind"] == "dfs" for r in search)
    refs = {r["label"]: r["scores"] for r in records if r["kind"] == "reference"}
    # the warm start's identity path scores as the base reference (same subset)
    first = search[0]
    assert [s[0] for s in first["recipe"]["path"]] == ["base"] * 4 and first["scores"] == refs["base"]
    assert (run / "recipes" / "knee.yaml").is_file()
    out = tmp_path / "exported"
    cli("export", f"run={run}", f"point={first['id']}", f"out={out}", cwd=tmp_path)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(str(test_zoo.base))
    ids = torch.tensor([[5, 9, 12, 7, 3]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, base(ids).logits)
    assert "passthrough" in (out / "mergekit.yaml").read_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+genome.bogus=1"], "unknown genome option"),
        (["genome.models=[base,merged]"], "unknown model 'merged' (set genome.merged to a recipe file)"),
        (["genome.merged=/nonexistent/knee.yaml"], "genome.merged: no recipe file at /nonexistent/knee.yaml"),
    ],
)
def test_dfs_config_mistakes_are_one_line_errors(test_zoo, tmp_path, overrides, message):
    from test_cli import cli, pool_args

    proc = cli(*pool_args(test_zoo), "genome=dfs", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("algorithm", ["nsga2", "nsga3", "smsemoa", "agemoea", "ga", "de", "cmaes", "mixed_ga", "random", "hand_made"])
def test_every_algorithm_searches_the_dfs_genome(algorithm):
    """The DFS genome is a vector in [0, 1]^n: two ask/tell generations, decoded to paths."""
    import dill
    from test_configs_algorithms import composed

    from evomerge.dfs.space import build_dfs_space
    from evomerge.session import build_strategy

    space = build_dfs_space(["base", "expert:a", "expert:b"], n_layers=2, repeats=1)
    assert space.n_var == 6 + 6
    extra = ["algorithm.points=[path:base,path:stack]"] if algorithm == "hand_made" else []
    strategy = build_strategy(composed([f"algorithm={algorithm}", *extra]), space)
    strategy.setup(space.n_var, 2, max_evals=32, seed=0, initial=space.reference_genomes())
    for generation in range(2):
        if algorithm == "hand_made" and not strategy.has_next():
            break  # its named points may fit in one generation
        assert strategy.has_next(), f"{algorithm} stopped after {generation} generation(s), after a pickle round trip"
        X = strategy.ask()
        paths = [space.decode(x) for x in X]
        assert X.shape[1] == space.n_var and all(isinstance(p, LayerPath) for p in paths)
        strategy.tell(X, np.stack([X[:, 0], 1 - X[:, 1]], axis=1))
        strategy = dill.loads(dill.dumps(strategy))
