"""How the toy zoo's experts were chosen (issue 8): build zoo variants and score the base,
the experts and hand-made task-arithmetic merges on the full validation split.

    python experiments/toy/zoo_design.py --variants full lora8 [--out /tmp/zoos]

A zoo is worth merging when some merge keeps >= 80% of each expert's own accuracy.
Prints one JSON line per (variant, model); writes experiments/toy/zoo_design.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness, quiet_libraries
from evomerge.merge.merger import Merger
from evomerge.merge.recipe import Recipe
from evomerge.pool import ModelPool
from evomerge.zoo.build import ZooConfig, build_zoo

# the zoo of the first release: full fine-tunes (500 steps at lr 1e-3) of a base that saw
# 2.5% of each skill in pre-training
FIRST_RELEASE = ZooConfig(
    pretrain_steps=600, finetune_steps=500, finetune_lr=1e-3, pretrain_skill_share=0.05, pretrain_skill_mix=None, lora_rank=0, finetune_replay=0.0
)
MIX = {"math": 0.3, "lang": 0.01}  # a base that half-knows math and barely reads the second language
VARIANTS = {
    "full": FIRST_RELEASE,
    "lora8": replace(FIRST_RELEASE, pretrain_steps=1200, finetune_steps=400, finetune_lr=3e-3, lora_rank=8, pretrain_skill_share=0.1),
    "full_short": replace(FIRST_RELEASE, pretrain_steps=1200, finetune_steps=150, finetune_lr=5e-4, pretrain_skill_share=0.1),
    "mix_lora": replace(FIRST_RELEASE, pretrain_steps=1500, pretrain_skill_mix=MIX, finetune_steps=400, finetune_lr=2e-3, lora_rank=8),
    "mix_full": replace(FIRST_RELEASE, pretrain_steps=1500, pretrain_skill_mix=MIX, finetune_steps=200, finetune_lr=3e-4),
    "wide_mix_lora": replace(
        FIRST_RELEASE, hidden_size=128, intermediate_size=384, pretrain_steps=1500, pretrain_skill_mix=MIX,
        finetune_steps=400, finetune_lr=2e-3, lora_rank=16, lora_alpha=32.0,
    ),
    # replay: a share of pre-training text mixed into each fine-tune (limits forgetting)
    "replay_lora": replace(
        FIRST_RELEASE, pretrain_steps=1500, pretrain_skill_mix=MIX, finetune_steps=300, finetune_lr=2e-3, lora_rank=8, finetune_replay=0.3
    ),
    "replay_full": replace(FIRST_RELEASE, pretrain_steps=1500, pretrain_skill_mix=MIX, finetune_steps=200, finetune_lr=5e-4, finetune_replay=0.3),
    "replay50_lora": replace(
        FIRST_RELEASE, pretrain_steps=1500, pretrain_skill_mix=MIX, finetune_steps=300, finetune_lr=2e-3, lora_rank=8, finetune_replay=0.5
    ),  # = the default ZooConfig() since issue 8
}
TASKS = [
    FitnessTask("math", "toy_math", "exact_match,first-number"),
    FitnessTask("lang", "toy_lang", "acc,none"),
    FitnessTask("target", "toy_target", "exact_match,first-number"),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--out", default="/tmp/evomerge-zoos")
    ap.add_argument("--json", default=str(Path(__file__).with_name("zoo_design.json")))
    args = ap.parse_args()
    quiet_libraries()
    for name in args.variants:
        results = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
        started = time.time()
        zoo = build_zoo(args.out, VARIANTS[name])
        built = time.time() - started
        merger = Merger(ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}), device="cpu")
        fitness = LmEvalFitness(merger.model, merger.tokenizer, TASKS, split="validation", batch_size=64, max_length=64)
        k, L = merger.n_experts, merger.n_layers
        recipes = {"base": ("task_arithmetic", [0.0] * k)}
        for i, e in enumerate(zoo.experts):
            recipes[f"expert:{e}"] = ("task_arithmetic", [1.0 if j == i else 0.0 for j in range(k)])
        for w in (0.5, 0.7, 1.0):
            recipes[f"ta_{w}"] = ("task_arithmetic", [w] * k)
        recipes["ties_d0.5"] = ("ties", [1.0] * k)
        out = {"build_s": round(built, 1), "config": VARIANTS[name].__dict__ | {}}
        for label, (method, weights) in recipes.items():
            params = {"weight": weights} | ({"density": [0.5] * k} if method == "ties" else {})
            merger.apply(Recipe.uniform(method, params, L))
            scores = fitness()
            out[label] = scores
            print(json.dumps({"variant": name, "model": label, **{k2: round(v, 3) for k2, v in scores.items()}}), flush=True)
        results[name] = out
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
