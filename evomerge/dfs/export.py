"""Materialising a layer path as a plain HF model folder.

The folder is the anchor model's architecture with ``num_hidden_layers`` = path length and
every slot's layer copied in (``model.layers.<slot>``), loadable by
``AutoModelForCausalLM.from_pretrained`` with the in-memory path's logits. Input scales
other than 1 are refused: a pre-norm layer feeds its input both to RMSNorm (nearly scale
invariant) and to the residual stream, so no weight of a stock Llama layer can carry the
scale exactly, and custom modelling code would not load with a plain ``from_pretrained``.
Search with ``genome.scale_range=[1,1]`` for paths that always export.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from evomerge.errors import MergeError


@torch.no_grad()
def save_path_model(path_merger, path, target: Path) -> Path:
    scaled = [(i, s) for i, s in enumerate(path.slots) if s.scale != 1.0]
    if scaled:
        i, s = scaled[0]
        raise MergeError(
            f"slot {i} ({s.model} layer {s.layer}) scales its input by {s.scale:g}, which a plain Llama folder cannot express "
            "exactly; search with genome.scale_range=[1,1] for exportable paths"
        )
    path_merger.apply(path)  # validates the path; the merger then holds the anchor's embeddings and head
    live = path_merger.model
    config = copy.deepcopy(live.config)  # num_hidden_layers (and layer_types) already the path's
    state = {k: v for k, v in live.state_dict().items() if ".layers." not in k}
    for i, s in enumerate(path.slots):
        for k, v in path_merger.resident[s.model][s.layer].state_dict().items():
            state[f"model.layers.{i}.{k}"] = v
    dtype = next(live.parameters()).dtype
    model = type(live)(config).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not getattr(config, "tie_word_embeddings", False)]
    if missing or unexpected:
        raise MergeError(f"the materialised path does not match its architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").clone().contiguous() for k, v in model.state_dict().items()}
    model.save_pretrained(str(target), state_dict=state)
    if path_merger.tokenizer is not None:
        path_merger.tokenizer.save_pretrained(str(target))
    path.save(target / "evomerge_path.yaml")
    return target
