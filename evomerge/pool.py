"""Model pool: a base model and N expert checkpoints of it, checked to be mergeable.

Models are HF folders (safetensors or bin) or GGUF files (loaded through transformers'
``gguf_file`` support, which needs the ``gguf`` package; weights are de-quantized).
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import nn

from evomerge.errors import PoolError

log = logging.getLogger(__name__)
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix.lower() == ".gguf"


def _ref(name: str, path: str | Path) -> ModelRef:
    p = Path(path).expanduser()
    if not p.exists():
        raise PoolError(f"model '{name}': path does not exist: {p}")
    if p.is_dir() and not (p / "config.json").is_file():
        raise PoolError(f"model '{name}': {p} is not a Hugging Face model folder (no config.json)")
    if p.is_file() and p.suffix.lower() != ".gguf":
        raise PoolError(f"model '{name}': {p} is a file but not a .gguf file")
    return ModelRef(name, p)


def load_causal_lm(ref: ModelRef, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load one model on CPU. GGUF files are de-quantized to ``dtype``."""
    from transformers import AutoModelForCausalLM

    try:
        if ref.is_gguf:
            model = AutoModelForCausalLM.from_pretrained(str(ref.path.parent), gguf_file=ref.path.name, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(ref.path), dtype=dtype)
    except ImportError as exc:
        raise PoolError(f"model '{ref.name}': {exc}") from exc
    except (OSError, ValueError, KeyError) as exc:
        raise PoolError(f"model '{ref.name}' ({ref.path}) could not be loaded: {str(exc).splitlines()[0]}") from exc
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(ref: ModelRef):
    from transformers import AutoTokenizer

    try:
        if ref.is_gguf:
            return AutoTokenizer.from_pretrained(str(ref.path.parent), gguf_file=ref.path.name)
        return AutoTokenizer.from_pretrained(str(ref.path))
    except (OSError, ValueError, KeyError) as exc:
        raise PoolError(f"model '{ref.name}': no usable tokenizer in {ref.path}: {str(exc).splitlines()[0]}") from exc


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters with tied weights listed once (the merge treats them as one)."""
    return {name: p for name, p in model.named_parameters(remove_duplicate=True)}


def layer_index(param_name: str) -> int | None:
    m = _LAYER_RE.search(param_name)
    return int(m.group(1)) if m else None


def count_parameters(ref: ModelRef) -> int | None:
    """Parameter count of an HF folder from its safetensors headers (no tensor is read);
    None when it cannot be known without loading (``.bin`` weights, GGUF)."""
    if ref.is_gguf or not ref.path.is_dir():
        return None
    files = sorted(ref.path.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= int(d)
                total += n
    return total


def available_bytes(device) -> int | None:
    """Free memory on ``device``: the GPU's free memory, or the host's MemAvailable."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class ModelPool:
    """A base model and its experts; loads lazily and validates mergeability.

    ``experts`` maps a display name to a path (a list of paths is named by folder).
    """

    def __init__(self, base: str | Path, experts: Mapping[str, str | Path] | list[str | Path], dtype: str = "float32"):
        if isinstance(experts, Mapping):
            named = dict(experts)
        else:
            named = {Path(p).stem if Path(p).suffix == ".gguf" else Path(p).name: p for p in experts}
        if not named:
            raise PoolError("the model pool needs at least one expert model")
        self.base = _ref("base", base)
        self.experts = [_ref(n, p) for n, p in named.items()]
        try:
            self.dtype: torch.dtype = getattr(torch, dtype)
        except AttributeError:
            raise PoolError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16") from None

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def parameter_count(self) -> int | None:
        """Parameters of the base (tied weights counted once when the file stores them once)."""
        return count_parameters(self.base)

    def load_base(self) -> tuple[nn.Module, object]:
        model = load_causal_lm(self.base, self.dtype)
        return model, load_tokenizer(self.base)

    def iter_experts(self, base_model: nn.Module, base_tokenizer: object | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (index, parameters) per expert, one model in memory at a time,
        after checking it matches the base (fails on the first mismatch)."""
        base_params = parameters_of(base_model)
        for i, ref in enumerate(self.experts):
            model = load_causal_lm(ref, self.dtype)
            check_compatible(self.base.name, base_model, ref.name, model)
            if base_tokenizer is not None:
                _check_tokenizer(ref, base_tokenizer)
            params = parameters_of(model)
            missing = sorted(set(base_params) - set(params))
            if missing:
                raise PoolError(f"expert '{ref.name}' has no parameter {missing[0]} (present in the base)")
            yield i, {k: params[k].detach() for k in base_params}
            del model, params


class InMemoryPool:
    """A pool of models already in memory (benchmarks, notebooks): ``base`` is a causal LM
    module and ``experts`` maps names to parameter dicts with the base's names and shapes."""

    def __init__(self, base: nn.Module, experts: Mapping[str, Mapping[str, torch.Tensor]], tokenizer: object | None = None):
        if not experts:
            raise PoolError("the model pool needs at least one expert model")
        self._base, self._experts, self._tokenizer = base, dict(experts), tokenizer
        self.experts = [ModelRef(name, Path(f"<memory:{name}>")) for name in self._experts]

    @property
    def expert_names(self) -> list[str]:
        return list(self._experts)

    @property
    def dtype(self) -> torch.dtype:
        return next(self._base.parameters()).dtype

    def parameter_count(self) -> int | None:
        return sum(p.numel() for p in parameters_of(self._base).values())

    def load_base(self) -> tuple[nn.Module, object]:
        return self._base, self._tokenizer

    def iter_experts(self, base_model: nn.Module, base_tokenizer: object | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        base_params = parameters_of(base_model)
        for i, (name, params) in enumerate(self._experts.items()):
            for key, value in base_params.items():
                if key not in params:
                    raise PoolError(f"expert '{name}' has no parameter {key} (present in the base)")
                if tuple(params[key].shape) != tuple(value.shape):
                    raise PoolError(f"shape mismatch for {key}: '{name}' has {tuple(params[key].shape)}, the base has {tuple(value.shape)}")
            yield i, {k: params[k] for k in base_params}


def check_compatible(base_name: str, base: nn.Module, name: str, other: nn.Module) -> None:
    """Raise a one-line ``PoolError`` naming the first difference that prevents merging."""
    bt, ot = getattr(base.config, "model_type", None), getattr(other.config, "model_type", None)
    if bt != ot:
        raise PoolError(f"'{name}' is a {ot} model but '{base_name}' is a {bt} model")
    bp, op = parameters_of(base), parameters_of(other)
    for key in bp:
        if key not in op:
            raise PoolError(f"'{name}' has no parameter {key} (present in '{base_name}')")
        if bp[key].shape != op[key].shape:
            raise PoolError(
                f"shape mismatch for {key}: '{name}' has {tuple(op[key].shape)}, '{base_name}' has {tuple(bp[key].shape)}"
            )
    extra = sorted(set(op) - set(bp))
    if extra:
        raise PoolError(f"'{name}' has parameter {extra[0]} that '{base_name}' lacks")


def _check_tokenizer(ref: ModelRef, base_tokenizer: object) -> None:
    has_own = ref.is_gguf or any((ref.path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
    if not has_own:
        return  # experts often ship without a tokenizer; the base's is used
    tok = load_tokenizer(ref)
    if tok.get_vocab() != base_tokenizer.get_vocab():  # type: ignore[attr-defined]
        raise PoolError(f"expert '{ref.name}' has a different tokenizer vocabulary than the base ({len(tok)} vs {len(base_tokenizer)} tokens)")  # type: ignore[arg-type]


def dtype_name(pool: "ModelPool | InMemoryPool") -> str:
    """The pool's dtype as mergekit's config writes it (``float32``, ``bfloat16``, ``float16``):
    exported configs merge in the dtype the search merged in."""
    return str(pool.dtype).removeprefix("torch.")
