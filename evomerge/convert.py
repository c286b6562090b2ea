"""Convert a GGUF checkpoint into a de-quantized Hugging Face folder.

transformers loads GGUF files (de-quantizing them) but refuses ``save_pretrained`` on the
result, so we rebuild a plain model from its config and state dict and save that.

    python -m evomerge.convert model.gguf out_dir [--dtype float32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from evomerge.errors import PoolError


def gguf_to_hf(gguf: str | Path, out_dir: str | Path, dtype: str = "float32") -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf).expanduser()
    if not path.is_file() or path.suffix.lower() != ".gguf":
        raise PoolError(f"not a .gguf file: {path}")
    torch_dtype = getattr(torch, dtype)
    try:
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as exc:
        raise PoolError(f"loading GGUF needs the 'gguf' package: {exc}") from exc
    config = loaded.config
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    fresh = type(loaded)(config).to(torch_dtype)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise PoolError(f"GGUF conversion lost tensors: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        fresh.tie_weights()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fresh.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="De-quantize a GGUF model into an HF folder")
    parser.add_argument("gguf")
    parser.add_argument("out")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    try:
        print(gguf_to_hf(args.gguf, args.out, args.dtype))
    except PoolError as exc:
        raise SystemExit(f"evomerge: error: {exc}") from None


if __name__ == "__main__":
    main()
