"""The shipped toy zoo: the default and tiny zoos' weights as package data.

Training the zoo amplifies float rounding (threads, AVX2 vs AVX512), so a zoo trained on
each machine differed by machine under one cache key, and no toy number could be checked
elsewhere. The zoo is therefore data: ``evomerge/zoo/shipped/<size>/`` holds the tokenizer,
base and experts (``math``, ``lang`` and the added ``rev``) as safetensors, and ``zoo.json``
the config they were trained with and each model's weight digest. Loading checks every
digest (a damaged file is one clear line); ``python -m evomerge.zoo --rebuild`` still trains
a zoo from scratch into the cache (``modelpool.source=built`` uses it), for people who change
the zoo's config; such a zoo differs by machine.

    python -m evomerge.zoo.shipped --write      # maintainers: train both sizes, copy them here
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from evomerge.errors import ConfigError
from evomerge.provenance import pool_digest, weights_digest
from evomerge.zoo.build import TINY, Zoo, ZooConfig

log = logging.getLogger(__name__)
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
# size name -> the config its files were trained with
SIZES: dict[str, ZooConfig] = {"default": ZooConfig(), "tiny": TINY}
# every shipped zoo holds the zoo's own experts and the added ones (evomerge.zoo.k3)
SHIPPED_EXPERTS = ("math", "lang", "rev")
RECORD = "zoo.json"
# files of a model folder worth shipping (weights, configs, tokenizer; no training state)
MODEL_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def shipped_root(size: str) -> Path:
    return SHIPPED_DIR / size


def read_record(size: str) -> dict[str, Any] | None:
    path = shipped_root(size) / RECORD
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def matches_config(size: str, cfg: ZooConfig) -> bool:
    """Whether the shipped zoo of ``size`` was trained with ``cfg`` (same cache key)."""
    record = read_record(size)
    return record is not None and record.get("config_key") == cfg.key()


def shipped_zoo(size: str, experts: Sequence[str] | None = None, check: bool = True) -> Zoo:
    """The shipped zoo of ``size`` with ``experts`` (None: the zoo's own two, in its order),
    every model's weights checked against the digest recorded at shipping time."""
    if size not in SIZES:
        raise ConfigError(f"modelpool.size must be {' or '.join(SIZES)}, got {size!r}")
    root = shipped_root(size)
    record = read_record(size)
    if record is None:
        raise ConfigError(f"the shipped toy zoo is missing or unreadable ({root / RECORD}): reinstall evomerge, or train one with modelpool.source=built")
    names = list(SIZES[size].experts) if experts is None else [str(e) for e in experts]
    unknown = [n for n in names if n not in SHIPPED_EXPERTS]
    if unknown:
        raise ConfigError(f"unknown toy zoo expert {unknown[0]!r}; known: {', '.join(SHIPPED_EXPERTS)}")
    if len(set(names)) != len(names) or len(names) < 2:
        raise ConfigError(f"modelpool.experts must name at least two different experts, got {names}")
    zoo = Zoo(root, root / "base", {n: root / f"expert_{n}" for n in names}, root / "base")
    if check:
        expected = record.get("weights_digest") or {}
        for role, folder in {"base": zoo.base, **{f"expert:{n}": p for n, p in zoo.experts.items()}}.items():
            check_model(folder, expected.get(role), role)
    return zoo


def check_model(folder: Path, expected: str | None, role: str) -> None:
    """One line when a shipped model's weights are missing or not the ones shipped."""
    try:
        got = weights_digest(folder)
    except (OSError, ValueError, KeyError) as err:
        got, why = None, f"unreadable ({err})"
    else:
        why = "no weights found" if got is None else f"weights digest {got[:12]}, shipped {str(expected)[:12]}"
    if got is None or got != expected:
        raise ConfigError(f"the shipped toy zoo's {role} is damaged: {folder} ({why}); reinstall evomerge (pip install --force-reinstall evomerge)")


def ship_zoo(zoo: Zoo, cfg: ZooConfig, out: Path, size: str) -> dict[str, Any]:
    """Copy a trained ``zoo`` (its model files only) to ``out`` with its ``zoo.json``: the
    config key, each model's weight digest, and where and with what it was trained."""
    from evomerge.provenance import cpu_capability, library_versions

    built = json.loads((zoo.root / "zoo.json").read_text())
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    folders = {"base": zoo.base, **{f"expert_{n}": p for n, p in zoo.experts.items()}}
    for name, src in folders.items():
        (tmp / name).mkdir()
        for f in MODEL_FILES:
            if (src / f).is_file():
                shutil.copy2(src / f, tmp / name / f)
    digests = {"base": weights_digest(tmp / "base"), **{f"expert:{n}": weights_digest(tmp / f"expert_{n}") for n in zoo.experts}}
    own = {k: v for k, v in digests.items() if k == "base" or k.removeprefix("expert:") in cfg.experts}
    record = {
        "size": size,
        "config": asdict(cfg),
        "config_key": cfg.key(),
        # the zoo's own experts (base, math, lang): the digest a zoo built in the cache records
        "digest": pool_digest(own),
        "k3_digest": pool_digest(digests) if len(digests) > len(own) else None,
        "weights_digest": digests,
        "final_losses": built.get("final_losses"),
        "built_with": built.get("built_with"),
        "torch_threads": built.get("torch_threads"),
        "cpu_capability": built.get("cpu_capability") or cpu_capability(),
        "shipped_with": library_versions(),
    }
    (tmp / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return record


def write_shipped(sizes: Sequence[str], cache: Path) -> None:
    """Train (or reuse from ``cache``) each size's zoo and added experts and copy them into
    the package. The weights then are what every machine loads; rerun only when the zoo's
    config changes, and re-measure every toy number afterwards."""
    from evomerge.zoo.k3 import build_zoo_with

    for size in sizes:
        record = ship_zoo(build_zoo_with(cache, SIZES[size], list(SHIPPED_EXPERTS)), SIZES[size], shipped_root(size), size)
        print(f"{size}: {shipped_root(size)} (digest {record['digest'][:12]}, with rev {record['k3_digest'][:12]})")


def main(argv: list[str] | None = None) -> None:
    from evomerge.zoo.build import default_cache_dir

    parser = argparse.ArgumentParser(description="The shipped toy zoo (maintainers: --write retrains and replaces it)")
    parser.add_argument("--write", action="store_true", help="train the zoos and copy them into the package")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--cache", default=str(default_cache_dir()), help="where the zoos are trained (reused when there)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.write:
        write_shipped(args.sizes, Path(args.cache))
        return
    for size in args.sizes:
        zoo = shipped_zoo(size, SHIPPED_EXPERTS)
        record = read_record(size) or {}
        print(f"{size}: {zoo.root} digest {str(record.get('digest'))[:12]} (with rev {str(record.get('k3_digest'))[:12]}): weights ok")


if __name__ == "__main__":
    main()
