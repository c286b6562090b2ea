"""What a search scores is what an export writes (issue 35): with the default config the
search's merger keeps exactly mergekit's entries among tied magnitudes, so its merge equals
the export's (``Merger(table_size=None)``) bit for bit, on float32, bfloat16 and float16
pools, at a tensor just past the old sampled table's exact range (4097 entries) and at a
SmolLM2-sized MLP tensor (576 x 1536 = 884,736 entries)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import ModelPool

pytestmark = pytest.mark.slow


def default_table_size():
    from hydra import compose, initialize_config_module

    import evomerge.cli  # noqa: F401 -- registers the config's resolvers
    from evomerge.session import table_size

    with initialize_config_module("evomerge.configs", version_base="1.3"):
        return table_size(compose("config"))


def tied_pool(root: Path, hidden: int, intermediate: int, heads: int, dtype: torch.dtype) -> dict[str, Path]:
    """A 1-layer Llama base and two experts whose task vectors sit on a coarse grid (few
    distinct magnitudes: thousands of ties per tensor), saved in ``dtype``. The MLP tensors
    are hidden x intermediate; head_dim is rounded down to even (RoPE needs it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.build import build_tokenizer

    out = {}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=80, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=1, num_attention_heads=heads,
                         num_key_value_heads=heads, head_dim=hidden // heads // 2 * 2, max_position_embeddings=32, tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(dtype)
    for name, seed in (("base", None), ("a", 1), ("b", 2)):
        model = LlamaForCausalLM(config).to(dtype)
        model.load_state_dict(base.state_dict())
        if seed is not None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_((torch.randint(-3, 4, p.shape, generator=gen).float() * 2**-5).to(dtype))
        build_tokenizer(root / name)
        model.save_pretrained(str(root / name))
        out[name] = root / name
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(17, 241, 1), (576, 1536, 9)], ids=["4097", "884736"])
def test_the_searched_merge_is_the_exported_merge(tmp_path, dtype, shape):
    hidden, intermediate, heads = shape
    models = tied_pool(tmp_path, hidden, intermediate, heads, getattr(torch, dtype))
    pool = lambda: ModelPool(str(models["base"]), {"a": str(models["a"]), "b": str(models["b"])}, dtype=dtype)  # noqa: E731
    searched = Merger(pool(), device="cpu", table_size=default_table_size())  # what the search scores
    exported = Merger(pool(), device="cpu", table_size=None)  # what `evomerge export` writes
    for method, params in (("ties", {"weight": [1.0, 0.7], "density": [0.37, 0.61]}),
                           ("breadcrumbs", {"weight": [1.0, 0.7], "density": [0.8, 0.9], "gamma": 0.05})):
        recipe = Recipe.uniform(method, params, 1)
        searched.apply(recipe)
        exported.apply(recipe)
        mine = {k: v.clone() for k, v in searched.model.state_dict().items()}
        theirs = exported.model.state_dict()
        big = [k for k, v in mine.items() if v.numel() == hidden * intermediate]
        assert big, "the pool has no tensor of the size under test"
        for name, value in mine.items():
            assert torch.equal(value, theirs[name]), f"{method} {dtype}: {name} differs between the searched and the exported merge"
