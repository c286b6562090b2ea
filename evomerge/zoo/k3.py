"""More experts for the toy zoo: the same base and experts as the 2-expert zoo, plus experts
on further skills (``rev``: writing digits backwards), each fine-tuned from that base the
same way and cached on its own. The 2-expert zoo (its cache key, files and weights) is not
touched: a 3-expert zoo is ``build_zoo(cfg)`` + one separately cached expert.

    python -m evomerge.zoo.k3 [--tiny] [--experts math,lang,rev] [--scores] [--built [--out DIR]]

``--scores`` prints the table of docs/three-experts.md: base, each expert and uniform task
arithmetic of all experts, scored on the full test split of every expert's task, on the
shipped zoo (``--built``: a zoo trained on this machine into the cache instead).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from evomerge.errors import ConfigError
from evomerge.zoo.build import (
    TINY,
    Zoo,
    ZooConfig,
    _pretrain_sampler,
    _skill_sampler,
    _train,
    add_lora,
    build_zoo,
    default_cache_dir,
    merge_lora,
)
from evomerge.zoo.tasks import held_out_prompts

log = logging.getLogger(__name__)
# skills an added expert can learn (each has a fitness task fitness/toy_<skill>.yaml)
EXTRA_SKILLS = ("rev",)
K3_EXPERTS = ("math", "lang", "rev")
# bump when the way an added expert is trained changes (part of its cache key)
EXTRA_EXPERT_VERSION = 1


def extra_expert_key(cfg: ZooConfig, skill: str) -> str:
    """Cache key of an added expert: the zoo it starts from, its skill, the recipe version."""
    text = json.dumps({"zoo": cfg.key(), "skill": skill, "version": EXTRA_EXPERT_VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_extra_expert(out_dir: str | Path, cfg: ZooConfig, skill: str, force: bool = False) -> Path:
    """Fine-tune (or reuse from ``out_dir/expert-<skill>-<key>``) an expert on ``skill`` from
    the base of ``build_zoo(out_dir, cfg)``, exactly as ``build_zoo`` makes its experts:
    LoRA of the same rank, the same steps and learning rate, the same share of replayed
    pre-training text."""
    if skill not in EXTRA_SKILLS:
        raise ConfigError(f"unknown toy zoo skill {skill!r}; the zoo has {', '.join(cfg.experts)} and can add {', '.join(EXTRA_SKILLS)}")
    zoo = build_zoo(out_dir, cfg)
    folder = Path(out_dir).expanduser() / f"expert-{skill}-{extra_expert_key(cfg, skill)}"
    if (folder / "DONE").is_file() and not force:
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(zoo.tokenizer))
    expert = AutoModelForCausalLM.from_pretrained(str(zoo.base))
    held_out = held_out_prompts()
    # the same streams build_zoo gives an expert named like its skill
    skill_sample = _skill_sampler(skill, cfg.seed + 1, held_out)
    replay = _pretrain_sampler(cfg, held_out, f"replay:{skill}:{cfg.seed}")
    mix_rng = random.Random(f"finetune:{skill}:{cfg.seed}")

    def fine() -> str:
        return replay() if mix_rng.random() < cfg.finetune_replay else skill_sample()

    wrapped = add_lora(expert, cfg.lora_rank, cfg.lora_alpha, cfg.seed) if cfg.lora_rank > 0 else []
    loss = _train(expert, fine, tokenizer, cfg, cfg.finetune_steps, cfg.finetune_lr, f"expert {skill}")
    merge_lora(wrapped)
    expert.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    info = {"zoo": str(zoo.root), "zoo_config": asdict(cfg), "skill": skill, "version": EXTRA_EXPERT_VERSION, "final_loss": loss}
    (tmp / "expert.json").write_text(json.dumps(info, indent=2))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # atomic publish, as build_zoo
    return folder


def build_zoo_with(out_dir: str | Path, cfg: ZooConfig, experts: Sequence[str] | None = None, force: bool = False) -> Zoo:
    """The zoo with the named experts, in that order: the zoo's own (``cfg.experts``) and
    added ones (``EXTRA_SKILLS``). ``None``: the zoo as ``build_zoo`` makes it. ``force``
    rebuilds the added experts only."""
    names = None if experts is None else [str(e) for e in experts]
    if names is not None:
        known = [*cfg.experts, *EXTRA_SKILLS]
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown toy zoo expert {unknown[0]!r}; known: {', '.join(known)}")
        if len(set(names)) != len(names) or len(names) < 2:
            raise ConfigError(f"modelpool.experts must name at least two different experts, got {names}")
    zoo = build_zoo(out_dir, cfg)
    if names is None:
        return zoo
    paths = {}
    for name in names:
        paths[name] = zoo.experts[name] if name in zoo.experts else build_extra_expert(out_dir, cfg, name, force=force)
    return Zoo(zoo.root, zoo.base, paths, zoo.tokenizer)


# the fitness task of each skill (as in configs/fitness/toy_k3.yaml)
SKILL_TASKS = {
    "math": ("toy_math", "exact_match,first-number"),
    "lang": ("toy_lang", "acc,none"),
    "rev": ("toy_rev", "exact_match,first-number"),
    "target": ("toy_target", "exact_match,first-number"),
}
TABLE_TA_WEIGHTS = (0.3, 0.5, 1.0)


def score_zoo(zoo: Zoo, tasks: Sequence[str], split: str = "test", ta_weights: Sequence[float] = TABLE_TA_WEIGHTS,
              subset_size: int | None = None, include_paths: Sequence[str | Path] = ()) -> dict[str, dict[str, float]]:
    """Scores of the base, each expert alone and uniform task arithmetic of all experts at
    ``ta_weights``, on the whole ``split`` of each task (or a seeded subset)."""
    from evomerge.estimators.lm_eval_fitness import FitnessTask, LmEvalFitness
    from evomerge.merge.merger import Merger
    from evomerge.merge.recipe import Recipe
    from evomerge.pool import ModelPool

    merger = Merger(ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}), device="cpu")
    fitness = LmEvalFitness(merger.model, merger.tokenizer, [FitnessTask(t, *SKILL_TASKS[t]) for t in tasks], split=split,
                            subset_size=subset_size, batch_size=64, max_length=64, include_paths=[str(p) for p in include_paths])
    k = len(zoo.experts)
    weights = {"base": [0.0] * k, **{f"expert:{name}": [float(i == j) for j in range(k)] for i, name in enumerate(zoo.experts)}}
    weights.update({f"task_arithmetic:{w:g}": [float(w)] * k for w in ta_weights})
    out = {}
    for label, w in weights.items():
        merger.apply(Recipe.uniform("task_arithmetic", {"weight": w}, merger.n_layers))
        out[label] = fitness()
    return out


def markdown_table(scores: dict[str, dict[str, float]]) -> str:
    tasks = list(next(iter(scores.values())))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {label} | " + " | ".join(f"{s[t]:.3f}" for t in tasks) + " |" for label, s in scores.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the toy zoo with added experts (default: the 3-expert zoo)")
    parser.add_argument("--out", default=str(default_cache_dir()), help="cache folder")
    parser.add_argument("--tiny", action="store_true", help="the tiny test-sized zoo")
    parser.add_argument("--experts", default=",".join(K3_EXPERTS), help="comma-separated expert names")
    parser.add_argument("--force", action="store_true", help="with --built: retrain the added experts even if cached")
    parser.add_argument("--built", action="store_true", help="a zoo trained on this machine (cache) instead of the shipped one")
    parser.add_argument("--scores", action="store_true", help="print base/expert/task-arithmetic scores on the full test splits")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.built:
        zoo = build_zoo_with(args.out, TINY if args.tiny else ZooConfig(), args.experts.split(","), force=args.force)
    else:
        from evomerge.zoo.shipped import shipped_zoo

        zoo = shipped_zoo("tiny" if args.tiny else "default", args.experts.split(","))
    for name, path in zoo.experts.items():
        print(f"{name}: {path}")
    if args.scores:
        tasks = [*zoo.experts, *(["target"] if {"math", "lang"} <= set(zoo.experts) else [])]
        print(markdown_table(score_zoo(zoo, tasks)))


if __name__ == "__main__":
    main()
