"""A bfloat16 / float16 *pool* (``dtype: bfloat16``, what ``dtype: auto`` picks on a GPU)
merges in that dtype, step by step as mergekit does (issue 35): the exported config says
``dtype: bfloat16`` and mergekit's merge of it equals the search's merge bit for bit: the same
kept entries and the same roundings (before, the bf16 arithmetic was fused and the config said
float32: up to 7,230 elements beyond one bf16 rounding)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Group, Recipe
from evomerge.pool import ModelPool, dtype_name

from conftest import make_llama
from test_mergekit_parity_bf16 import make_bf16_expert

pytest.importorskip("mergekit", reason="mergekit is not installed; parity tests skipped")

from evomerge.verify import verify_export  # noqa: E402


def perturbed_expert(folder: Path, base: Path, seed: int, scale: float = 0.01) -> Path:
    """A float32 expert: base + Gaussian noise (distinct magnitudes; the bf16 cast ties them)."""
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.build import build_tokenizer

    build_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, tuple[Path, dict[str, Path]]]:
    """float32 files (3 experts) and bfloat16 files (2 heavily tied experts), MLP tensors of 5,120."""
    from transformers import AutoModelForCausalLM

    from evomerge.zoo.build import build_tokenizer

    root = tmp_path_factory.mktemp("pool_dtype")
    base32 = make_llama(root / "base32", seed=0, intermediate_size=160)
    f32 = {n: perturbed_expert(root / f"{n}32", base32, s) for n, s in (("a", 3), ("b", 4), ("c", 5))}
    base16 = root / "base16"
    build_tokenizer(base16)
    AutoModelForCausalLM.from_pretrained(str(base32), torch_dtype=torch.bfloat16).save_pretrained(str(base16))
    b16 = {n: make_bf16_expert(root / f"{n}16", base16, s) for n, s in (("a", 1), ("b", 2))}
    return {"float32 files": (base32, f32), "bfloat16 files": (base16, b16)}


W, D = [1.0, 0.6], [0.3, 0.55]
CASES = {
    "task_arithmetic": Recipe.uniform("task_arithmetic", {"weight": [0.7, 0.45], "lambda": 1.3}, 2),
    "ties_lambda": Recipe.uniform("ties", {"weight": W, "density": D, "lambda": 1.4}, 2),
    "ties_unnormalized": Recipe.uniform("ties", {"weight": W, "density": [0.1, 0.05], "normalize": 0}, 2),
    "breadcrumbs": Recipe.uniform("breadcrumbs", {"weight": W, "density": D, "gamma": 0.1}, 2),
    "breadcrumbs_ties": Recipe.uniform("breadcrumbs_ties", {"weight": W, "density": [0.5, 0.3], "gamma": 0.05, "lambda": 0.8}, 2),
    "task_arithmetic_trim": Recipe.uniform("task_arithmetic_trim", {"weight": W, "density": [0.4, 0.2]}, 2),
    "sce": Recipe.uniform("sce", {"select_topk": 0.3}, 2),
    "layerwise_ties": Recipe(groups=[
        Group("embed", "embed", "ties", {"weight": [0.5, 0.5], "density": [0.3, 0.3], "lambda": 0.7}),
        Group("l0-attn", "layers", "ties", {"weight": [1.0, 0.2], "density": [0.6, 0.2], "lambda": 1.4}, layers=(0, 0), component="attn"),
        Group("l0-mlp", "layers", "ties", {"weight": [0.3, 1.1], "density": [0.25, 0.8], "normalize": 0}, layers=(0, 0), component="mlp"),
        Group("l1", "layers", "ties", {"weight": [0.8, 0.8], "density": [0.5, 0.45]}, layers=(1, 1)),
        Group("head", "head", "ties", {"weight": [1.2, 0.1], "density": [0.9, 0.1], "lambda": 2.0}),
    ]),
    "ties_3_experts": Recipe.uniform("ties", {"weight": [0.9, -0.4, 0.5], "density": [0.2, 0.55, 0.9], "lambda": 1.2}, 2),
    "task_arithmetic_3_experts": Recipe.uniform("task_arithmetic", {"weight": [0.9, 0.4, 0.5]}, 2),
}
QUICK = {("bfloat16", "bfloat16 files", "ties_lambda"), ("bfloat16", "float32 files", "sce"), ("float16", "float32 files", "task_arithmetic")}


def params():
    for dtype in ("bfloat16", "float16"):
        for files in ("float32 files", "bfloat16 files"):
            for case in CASES:
                if files == "bfloat16 files" and "3_experts" in case:
                    continue
                marks = [] if (dtype, files, case) in QUICK else [pytest.mark.slow]
                yield pytest.param(dtype, files, case, marks=marks, id=f"{dtype}-{files.split()[0]}-{case}")


_MERGERS: dict[tuple[str, str, int], Merger] = {}


@pytest.mark.parametrize("dtype, files, case", list(params()))
def test_low_precision_pool_export_is_mergekits_merge(pools, dtype, files, case, tmp_path):
    base, experts = pools[files]
    recipe = CASES[case]
    k = len(recipe.groups[0].params["weight"]) if "weight" in recipe.groups[0].params else 2
    names = sorted(experts)[:k]
    key = (dtype, files, k)
    if key not in _MERGERS:
        _MERGERS[key] = Merger(ModelPool(base, {n: experts[n] for n in names}, dtype=dtype), device="cpu", table_size=None)
    merger = _MERGERS[key]
    assert dtype_name(merger.pool) == dtype
    merger.apply(recipe)
    merger.save(tmp_path / "export")
    assert recipe.to_mergekit(str(base), [str(experts[n]) for n in names], dtype=dtype)["dtype"] == dtype
    result = verify_export(tmp_path / "export", recipe, str(base), [str(experts[n]) for n in names], dtype=dtype)
    assert result.same and result.max_abs_diff == 0.0, result.line()  # bit for bit, not within a rounding


def test_the_float32_config_is_not_what_a_bfloat16_pool_merged(pools, tmp_path):
    """Why the exported config carries the pool's dtype: mergekit's float32 merge of the same
    recipe keeps other entries (thresholds on unrounded task vectors) and rounds differently."""
    base, experts = pools["float32 files"]
    merger = Merger(ModelPool(base, {n: experts[n] for n in ("a", "b")}, dtype="bfloat16"), device="cpu", table_size=None)
    merger.apply(CASES["ties_lambda"])
    merger.save(tmp_path / "export")
    result = verify_export(tmp_path / "export", CASES["ties_lambda"], str(base), [str(experts["a"]), str(experts["b"])], dtype="float32")
    assert not result.same and result.beyond > 0, result.line()
