"""In-place merge time per candidate, as a ratio to the memory-bandwidth bound.

The bound is a plain ``copy_`` of the bytes a merge must read -- the resident base
weights and the K task vectors -- measured in the same run on the same device. A merge
cannot be faster than reading its inputs once, so ``merge / copy`` says how close to the
hardware limit each method runs (1x = as fast as a copy of its inputs).

    python experiments/bench_merge.py                       # SmolLM2-135M shape, 2 experts
    python experiments/bench_merge.py --layers 8 --experts 3 --device cuda --dtype bfloat16
    python experiments/bench_merge.py --json                # one JSON object per method
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from evomerge.merge.merger import Merger, resolve_device
from evomerge.merge.recipe import Recipe
from evomerge.pool import InMemoryPool


def build_pool(args) -> InMemoryPool:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).named_parameters()}
    base = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
    experts = {}
    for k in range(args.experts):
        gen = torch.Generator().manual_seed(k + 1)
        experts[f"e{k}"] = {
            name: p.detach() + 0.01 * torch.randn(shapes[name], generator=gen).to(p.dtype) for name, p in base.named_parameters()
        }
    return InMemoryPool(base, experts)


def timed(fn, device: torch.device, repeats: int) -> float:
    if repeats > 1:
        fn()  # warm-up (also builds lazy magnitude tables, compiles kernels)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_pair(fn, bound, device: torch.device, repeats: int) -> tuple[float, float]:
    """Median seconds of ``fn`` and of ``bound``, run alternately."""
    fn()
    bound()
    a, b = [], []
    for _ in range(repeats):
        a.append(timed(fn, device, 1))
        b.append(timed(bound, device, 1))
    return statistics.median(a), statistics.median(b)


def add_shape_arguments(p: argparse.ArgumentParser, repeats: int) -> None:
    """Model shape (SmolLM2-135M by default), experts, device, dtype, repeats: shared by the merge benchmarks."""
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--experts", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(p, repeats=5)
    p.add_argument("--chunk", default="auto", help="merger chunk size in elements, 'auto' or 0 (whole units)")
    p.add_argument(
        "--methods", nargs="+",
        default=["task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "breadcrumbs", "slerp", "model_stock"],
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch and numba (0: their defaults)")
    p.add_argument("--json", action="store_true", help="print one JSON object per method (ms, x_bound) instead of the table")
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import numba

            numba.set_num_threads(args.threads)
        except ImportError:
            pass

    chunk = "auto" if args.chunk == "auto" else (int(args.chunk) or None)
    merger = Merger(build_pool(args), device=device, check_finite=False, chunk_size=chunk)
    n = sum(u.group.base.numel() for u in merger._units)
    k = merger.n_experts
    elsize = merger._units[0].out.element_size()
    inputs = (k + 1) * n * elsize
    src = torch.empty(inputs // elsize, dtype=merger._units[0].out.dtype, device=device)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    copy_s = timed(copy, device, args.repeats)
    say = (lambda *a, **kw: None) if args.json else print
    say(f"device {device}, {n / 1e6:.1f}M parameters, {k} experts, {args.dtype}, chunk {merger.chunk_size}; resident {merger.resident_bytes() / 2**30:.2f} GiB")
    say(f"bound: copy of the {inputs / 2**30:.2f} GiB of merge inputs: {copy_s * 1e3:.1f} ms ({2 * inputs / copy_s / 1e9:.1f} GB/s moved)")
    say(f"{'method':<16} {'ms / candidate':>14} {'copy ms':>8} {'x bound':>8}")
    params = {
        "task_arithmetic": {"weight": [0.6] * k},
        "ties": {"weight": [0.6] * k, "density": [0.4] * k},
        "passthrough": {"source": 1},
        "dare_ties": {"weight": [0.6] * k, "density": [0.4] * k},
        "dare_linear": {"weight": [0.6] * k, "density": [0.4] * k},
        "della": {"weight": [0.6] * k, "density": [0.4] * k},
        "breadcrumbs": {"weight": [0.6] * k, "density": [0.4] * k},
        "slerp": {"t": 0.4},
        "linear": {"weight": [0.6] * k},
        "model_stock": {},
    }
    for method in args.methods:
        recipe = Recipe.uniform(method, params[method], merger.n_layers)
        # the bound is re-measured next to each method, interleaved with its repeats, so a
        # shared machine's changing load affects both sides of the ratio alike
        s, copy_s = timed_pair(lambda: merger.apply(recipe), copy, device, args.repeats)
        if args.json:
            print(json.dumps({
                "method": method, "ms": round(s * 1e3, 2), "x_bound": round(s / copy_s, 3), "copy_ms": round(copy_s * 1e3, 2),
                "device": str(device), "params_m": round(n / 1e6, 2), "experts": k, "dtype": args.dtype,
            }), flush=True)
        else:
            print(f"{method:<16} {s * 1e3:14.1f} {copy_s * 1e3:8.1f} {s / copy_s:8.2f}", flush=True)


if __name__ == "__main__":
    main()
