"""Train the toy zoo: a character tokenizer, a tiny pre-trained Llama base and two experts
fine-tuned from it on distinct skills, cached on disk. Training rounds differently by CPU
kernel family and thread count, so the zoo ``python3 -m evomerge`` uses is the one shipped
with the package (evomerge.zoo.shipped); this module rebuilds it for a changed config.

    python -m evomerge.zoo [--tiny]                      # check and show the shipped zoo
    python -m evomerge.zoo --rebuild [--out DIR] [--tiny] # train one into the cache
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import string
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from evomerge.provenance import cpu_capability, library_versions, pool_digest, weights_digest
from evomerge.zoo.tasks import examples, held_out_prompts, noise_text

log = logging.getLogger(__name__)
PAD, EOS = "<pad>", "<eos>"
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " +-=:?.,\n"


@dataclass(frozen=True)
class ZooConfig:
    """Sizes and budgets of the toy zoo (the cache key is a hash of this)."""

    hidden_size: int = 64
    intermediate_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    max_length: int = 32
    pretrain_steps: int = 1500
    finetune_steps: int = 300
    batch_size: int = 64
    pretrain_lr: float = 3e-3
    finetune_lr: float = 2e-3
    # share of each skill in the base's pre-training mix; the rest is generic text
    pretrain_skill_share: float = 0.05
    # optional per-skill shares instead (e.g. {"math": 0.3, "lang": 0.01}): a base that
    # half-knows a skill, so an expert only sharpens it, as real fine-tunes do
    pretrain_skill_mix: dict[str, float] | None = field(default_factory=lambda: {"math": 0.3, "lang": 0.01})
    # 0: full fine-tuning of every weight; r > 0: rank-r LoRA adapters on every linear
    # layer of the transformer blocks, merged into the weights afterwards (how most
    # published experts are made: small, low-rank task vectors that interfere less)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    # share of pre-training samples replayed during fine-tuning (instruction-tuning mixtures
    # keep general data in, which limits forgetting of what the base knew)
    finetune_replay: float = 0.5
    experts: dict[str, str] = field(default_factory=lambda: {"math": "math", "lang": "lang"})
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def base_key(self) -> str:
        """Hash of what the base model depends on (experts' settings excluded)."""
        fields = {k: v for k, v in asdict(self).items() if not k.startswith(("finetune", "lora"))}
        fields["experts"] = sorted(set(self.experts.values()))
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


TINY = ZooConfig(
    hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, pretrain_steps=60, finetune_steps=60, batch_size=32, lora_rank=4
)


@dataclass(frozen=True)
class Zoo:
    root: Path
    base: Path
    experts: dict[str, Path]
    tokenizer: Path


def build_tokenizer(folder: Path):
    """A character-level ``PreTrainedTokenizerFast`` (every character is one token)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, EOS: 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    fast.model_max_length = 256
    fast.save_pretrained(str(folder))
    return fast


def _new_model(cfg: ZooConfig, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_length * 2,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config)


def _batches(sample: Callable[[], str], tokenizer, cfg: ZooConfig):
    while True:
        texts = [sample() for _ in range(cfg.batch_size)]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=cfg.max_length, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        yield enc["input_ids"], enc["attention_mask"], labels


def _train(model, sample: Callable[[], str], tokenizer, cfg: ZooConfig, steps: int, lr: float, label: str) -> float:
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    model.train()
    loss_value = float("nan")
    started = time.time()
    for step, (ids, mask, labels) in zip(range(steps), _batches(sample, tokenizer, cfg)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        loss_value = float(loss.detach())  # float(loss) warns: the loss still requires grad
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.3f (%.0fs)", label, step + 1, steps, loss_value, time.time() - started)
    model.eval()
    return loss_value


class LoraLinear(torch.nn.Module):
    """``base(x) + (alpha / r) * x A^T B^T`` with the base frozen; B starts at zero."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = torch.nn.Parameter(torch.randn(rank, base.in_features, generator=generator) / base.in_features**0.5)
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return self.base.weight + self.scale * (self.lora_b @ self.lora_a)


def add_lora(model: torch.nn.Module, rank: int, alpha: float, seed: int) -> list[tuple[torch.nn.Module, str, LoraLinear]]:
    """Freeze ``model`` and wrap every linear layer inside its transformer blocks."""
    for p in model.parameters():
        p.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    wrapped = []
    for name, module in list(model.named_modules()):
        if ".layers." not in f".{name}." and not name.startswith("model.layers"):
            continue
        for child_name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear):
                lora = LoraLinear(child, rank, alpha, gen)
                setattr(module, child_name, lora)
                wrapped.append((module, child_name, lora))
    return wrapped


@torch.no_grad()
def merge_lora(wrapped: list[tuple[torch.nn.Module, str, LoraLinear]]) -> None:
    """Fold the adapters into the weights and restore the plain linear layers."""
    for module, child_name, lora in wrapped:
        lora.base.weight.copy_(lora.merged_weight())
        setattr(module, child_name, lora.base)


def _skill_sampler(skill: str, seed: int, held_out: set[str]) -> Callable[[], str]:
    stream = examples(skill, seed)

    def sample() -> str:
        for ex in stream:
            if ex.prompt not in held_out:
                return ex.text
        raise RuntimeError("unreachable")

    return sample


def _pretrain_sampler(cfg: ZooConfig, held_out: set[str], stream: str) -> Callable[[], str]:
    """Pre-training text: generic noise plus a share of each skill."""
    rng = random.Random(stream)
    skills = {s: _skill_sampler(s, cfg.seed, held_out) for s in sorted(set(cfg.experts.values()))}
    mix = cfg.pretrain_skill_mix or {s: cfg.pretrain_skill_share / len(skills) for s in skills}

    def sample() -> str:
        u = rng.random()
        for skill, share in sorted(mix.items()):
            if u < share:
                return skills[skill]()
            u -= share
        return noise_text(rng)

    return sample


def build_zoo(out_dir: str | Path, cfg: ZooConfig = ZooConfig(), force: bool = False) -> Zoo:
    """Build (or reuse from ``out_dir/<config hash>``) the tokenizer, base and experts."""
    root = Path(out_dir).expanduser() / f"zoo-{cfg.key()}"
    zoo = Zoo(root, root / "base", {name: root / f"expert_{name}" for name in cfg.experts}, root / "base")
    if (root / "DONE").is_file() and not force:
        return zoo
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer(tmp / "base")
    held_out = held_out_prompts()
    pretrain_sample = _pretrain_sampler(cfg, held_out, f"pretrain:{cfg.seed}")
    # the base depends on fewer settings than the experts: reuse a cached one
    base_cache = Path(out_dir).expanduser() / f"base-{cfg.base_key()}"
    losses: dict[str, float] = {}
    if (base_cache / "DONE").is_file() and not force:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(base_cache))
        losses["base"] = json.loads((base_cache / "DONE").read_text())["loss"]
    else:
        model = _new_model(cfg, len(tokenizer))
        losses["base"] = _train(model, pretrain_sample, tokenizer, cfg, cfg.pretrain_steps, cfg.pretrain_lr, "base")
        partial = base_cache.with_name(base_cache.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(str(partial))
        (partial / "DONE").write_text(json.dumps({"loss": losses["base"], "built_with": library_versions()}))
        shutil.rmtree(base_cache, ignore_errors=True)
        partial.rename(base_cache)
    model.save_pretrained(str(tmp / "base"))
    from transformers import AutoModelForCausalLM

    for name, skill in cfg.experts.items():
        expert = AutoModelForCausalLM.from_pretrained(str(tmp / "base"))
        skill_sample = _skill_sampler(skill, cfg.seed + 1, held_out)
        replay = _pretrain_sampler(cfg, held_out, f"replay:{name}:{cfg.seed}")
        mix_rng = random.Random(f"finetune:{name}:{cfg.seed}")

        def fine(skill_sample=skill_sample, replay=replay, mix_rng=mix_rng) -> str:
            return replay() if mix_rng.random() < cfg.finetune_replay else skill_sample()

        wrapped = add_lora(expert, cfg.lora_rank, cfg.lora_alpha, cfg.seed) if cfg.lora_rank > 0 else []
        losses[name] = _train(expert, fine, tokenizer, cfg, cfg.finetune_steps, cfg.finetune_lr, f"expert {name}")
        merge_lora(wrapped)
        expert.save_pretrained(str(tmp / f"expert_{name}"))
        tokenizer.save_pretrained(str(tmp / f"expert_{name}"))
    (tmp / "zoo.json").write_text(json.dumps(zoo_record(cfg, tmp, base_cache, losses), indent=2))
    (tmp / "DONE").write_text("ok\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # atomic publish: a killed build never leaves a half zoo behind
    return zoo


def zoo_record(cfg: ZooConfig, folder: Path, base_cache: Path, losses: dict[str, float]) -> dict:
    """zoo.json: the config, final losses, the versions the zoo was built with and a digest of
    its weights (per model and one for the zoo; evomerge.provenance), so a zoo that differs
    from another with the same cache key can be told apart and traced."""
    models = {"base": folder / "base", **{f"expert:{name}": folder / f"expert_{name}" for name in cfg.experts}}
    digests = {role: weights_digest(path) for role, path in models.items()}
    base_done = json.loads((base_cache / "DONE").read_text()) if (base_cache / "DONE").is_file() else {}
    return {
        "config": asdict(cfg),
        "final_losses": losses,
        "digest": pool_digest(digests),
        "weights_digest": digests,
        "built_with": library_versions(),
        # the base may come from an earlier build's cache (base-<key>), possibly other versions
        "base_built_with": base_done.get("built_with"),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": cpu_capability(),
    }


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="The evomerge toy zoo. Without --rebuild: check and show the shipped zoo (what python3 -m evomerge uses). "
        "--rebuild: train one from scratch into the cache (for a changed zoo config; modelpool.source=built uses it)."
    )
    parser.add_argument("--out", default=str(default_cache_dir()), help="cache folder for --rebuild")
    parser.add_argument("--tiny", action="store_true", help="the tiny test-sized zoo")
    parser.add_argument("--rebuild", action="store_true", help="train from scratch into the cache (replaces a cached build)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.rebuild:
        from evomerge.errors import ConfigError
        from evomerge.zoo.shipped import SHIPPED_EXPERTS, read_record, shipped_zoo

        size = "tiny" if args.tiny else "default"
        try:
            zoo = shipped_zoo(size, SHIPPED_EXPERTS)
        except ConfigError as err:
            raise SystemExit(f"error: {err}") from None
        digest = (read_record(size) or {}).get("digest", "?")
        print(f"shipped toy zoo ({size}): {zoo.root}, digest {digest[:12]}, weights ok")
        return
    zoo = build_zoo(args.out, TINY if args.tiny else ZooConfig(), force=True)
    digest = json.loads((zoo.root / "zoo.json").read_text())["digest"]
    print(zoo.root)
    print(
        f"rebuilt zoo digest {digest[:12]} (threads {torch.get_num_threads()}, {cpu_capability()}): training rounds differently on other "
        "CPUs and thread counts, so this zoo differs from the shipped one and the toy numbers in the docs do not apply to it. "
        "Use it with modelpool.source=built" + ("" if args.out == str(default_cache_dir()) else f" modelpool.cache_dir={args.out}") + "."
    )


if __name__ == "__main__":
    main()
