"""One-call device check (scripts/gpu_check.sh runs it): merge speed and peak memory of every
method, a short default search, and device-vs-CPU merge agreement, written as one JSON.

    python scripts/gpu_check.py OUT_DIR [--device cuda|cpu] [--quick]

``--quick`` shrinks every part (a 2-layer SmolLM2 shape, no 1B shape, a 4-evaluation search
on the tiny zoo): what CI runs on the CPU so the script cannot rot.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

METHODS = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "breadcrumbs", "slerp", "model_stock"]
# shapes: SmolLM2-135M and a random-weight 1B Llama (Llama-3.2-1B's)
SHAPES = {
    "smollm2_135m": dict(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152),
    "llama_1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256),
}
QUICK_SHAPES = {"smollm2_1layer": dict(hidden=576, intermediate=1536, layers=1, heads=9, kv_heads=3, vocab=4096)}


def method_params(k: int) -> dict[str, dict[str, Any]]:
    w, d = [0.6] * k, [0.4] * k
    return {
        "task_arithmetic": {"weight": w}, "ties": {"weight": w, "density": d}, "dare_linear": {"weight": w, "density": d},
        "dare_ties": {"weight": w, "density": d}, "della": {"weight": w, "density": d}, "breadcrumbs": {"weight": w, "density": d},
        "slerp": {"t": 0.4}, "model_stock": {},
    }


def bench_shape(name: str, shape: dict[str, int], device: str, dtype: str, repeats: int) -> dict[str, Any]:
    """ms per candidate, x the copy bound and peak memory of every method on one shape."""
    from bench_merge import build_pool, timed, timed_pair

    from evomerge.merge.merger import Merger, resolve_device
    from evomerge.merge.recipe import Recipe

    dev = resolve_device(device)
    args = SimpleNamespace(**shape, experts=2, dtype=dtype)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    merger = Merger(build_pool(args), device=dev, check_finite=False)
    n = sum(u.group.base.numel() for u in merger._units)
    elsize = merger._units[0].out.element_size()
    src = torch.empty((merger.n_experts + 1) * n, dtype=merger._units[0].out.dtype, device=dev)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    timed(copy, dev, 2)
    rows = []
    for method, params in method_params(merger.n_experts).items():
        recipe = Recipe.uniform(method, params, merger.n_layers)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        s, copy_s = timed_pair(lambda: merger.apply(recipe), copy, dev, repeats)
        peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
        rows.append({"method": method, "ms": round(s * 1e3, 2), "x_bound": round(s / copy_s, 3), "copy_ms": round(copy_s * 1e3, 2),
                     "peak_gib": None if peak is None else round(peak, 3)})
    out = {"shape": name, **shape, "params_m": round(n / 1e6, 1), "dtype": dtype, "device": str(dev),
           "resident_gib": round(merger.resident_bytes() / 2**30, 3), "input_gib": round((merger.n_experts + 1) * n * elsize / 2**30, 3), "methods": rows}
    del merger, src, dst
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def device_vs_cpu(device: str, dtype: str) -> list[dict[str, Any]]:
    """The same recipes merged on ``device`` and on the CPU (same dtype): max abs difference."""
    from bench_merge import build_pool

    from evomerge.merge.merger import Merger, resolve_device
    from evomerge.merge.recipe import Recipe

    args = SimpleNamespace(**QUICK_SHAPES["smollm2_1layer"], experts=2, dtype=dtype)
    pool = build_pool(args)
    here = Merger(pool, device=resolve_device(device), check_finite=False)
    cpu = Merger(build_pool(args), device=torch.device("cpu"), check_finite=False)
    rows = []
    for method, params in method_params(here.n_experts).items():
        recipe = Recipe.uniform(method, params, here.n_layers)
        here.apply(recipe)
        cpu.apply(recipe)
        a, b = here.model.state_dict(), cpu.model.state_dict()
        diff = max(float((a[k].detach().float().cpu() - b[k].detach().float()).abs().max()) for k in b)
        scale = max(float(b[k].detach().float().abs().max()) for k in b)
        rows.append({"method": method, "max_abs_diff": diff, "max_abs_weight": scale, "identical": diff == 0.0})
    return rows


def default_search(device: str, quick: bool, out_dir: Path) -> dict[str, Any]:
    """The default search (24 evaluations; quick: 4 on the tiny zoo) on ``device``: SmolLM2 when
    its prepared folder exists, else the shipped toy zoo."""
    from evomerge.zoo.build import default_cache_dir

    smollm2 = default_cache_dir() / "smollm2"
    if quick:
        overrides, pool = ["modelpool.size=tiny", "search.max_evals=4", "fitness.subset_size=8", "fitness.test_rescore=false"], "toy zoo (tiny)"
    elif (smollm2 / "tasks").is_dir():
        overrides, pool = ["+experiment=smollm2", f"smollm2_dir={smollm2}", "search.max_evals=24"], "SmolLM2-135M (prepared)"
    else:
        overrides, pool = ["search.max_evals=24"], "toy zoo (SmolLM2 not prepared here)"
    run = out_dir / "search_run"
    cmd = [sys.executable, "-m", "evomerge", *overrides, f"device={device}", "report.html=false", f"hydra.run.dir={run}"]
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.time() - started
    result: dict[str, Any] = {"pool": pool, "command": " ".join(cmd[1:]), "returncode": proc.returncode, "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        result["error_tail"] = (proc.stderr or proc.stdout)[-2000:]
        return result
    summary = json.loads((run / "summary.json").read_text())
    result.update({"evaluated": summary["n_evaluated"], "hypervolume": summary["hypervolume"], "time_s": summary.get("time_s"),
                   "mean_merge_s": summary.get("mean_merge_s"), "mean_eval_s": summary.get("mean_eval_s")})
    env = json.loads((run / "environment.json").read_text())
    result["environment"] = {k: env.get(k) for k in ("device", "gpu", "cuda", "dtype", "cpu_capability")}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for gpu_check.json")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: --device cuda but torch sees no CUDA GPU (torch.cuda.is_available() is False); use --device cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(False)
    started = time.time()
    dtype = "bfloat16" if args.device == "cuda" else "float32"  # what dtype: auto picks on each
    report: dict[str, Any] = {
        "device": args.device, "quick": args.quick, "dtype": dtype,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(), "host": platform.node(),
    }
    shapes = QUICK_SHAPES if args.quick else SHAPES
    report["merge"] = [bench_shape(name, shape, args.device, dtype, repeats=2 if args.quick else 5) for name, shape in shapes.items()]
    report["device_vs_cpu"] = device_vs_cpu(args.device, dtype)
    report["search"] = default_search(args.device, args.quick, args.out)
    report["wall_s"] = round(time.time() - started, 1)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"gpu_check: {path} ({report['wall_s']} s)")
    if report["search"]["returncode"] != 0:
        raise SystemExit("gpu_check: the default search failed; see search.error_tail in the JSON")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
