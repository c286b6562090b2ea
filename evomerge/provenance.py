"""Provenance: what a model or a run was made with, so differing numbers can be traced.

- ``library_versions()``: python, evomerge and the libraries that decide the numbers
  (read from package metadata: nothing is imported).
- ``weights_digest(folder)``: SHA-256 over the tensors of a model folder's safetensors
  files (name, dtype, shape, bytes; sorted by name), so it depends on the weights only,
  not on file layout or metadata. The zoo (``zoo.json``) and the SmolLM2 experiment
  (``sources.json``) record it with the versions they were built with.
- ``record_run_environment(run_dir, ...)``: ``environment.json`` in a run directory:
  versions, evomerge's git commit (when run from a checkout), device, dtype, thread
  settings and the models' weight digests. Written at run start; a resume whose
  environment differs is appended under ``resumes`` (the first start is kept).
- ``environment_line(run_dir)``: one line of it for ``evomerge compare`` and the report.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import struct
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

ENVIRONMENT_FILE = "environment.json"
# the libraries whose versions can change a score or a model (the rest of the lock is not recorded)
PACKAGES = (
    "torch", "transformers", "tokenizers", "accelerate", "safetensors", "numpy", "scipy",
    "lm-eval", "datasets", "pymoo", "botorch", "hydra-core", "omegaconf",
)
# a pool's weight digests are computed at run start only up to this total size (a few
# seconds of hashing); larger pools record null (fingerprints.json still pins the files)
DIGEST_LIMIT = 4 << 30
# keys that legitimately differ between the first start and a resume
_VOLATILE = ("recorded_at",)


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def library_versions() -> dict[str, str | None]:
    """``{"python": "3.11.7", "evomerge": "0.1.0", "torch": "2.13.0+cpu", ...}``."""
    from evomerge import __version__

    return {"python": platform.python_version(), "evomerge": __version__, **{p: package_version(p) for p in PACKAGES}}


def git_commit() -> dict[str, Any] | None:
    """Commit and dirty flag of the checkout evomerge is imported from; None for an installed wheel."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def _safetensors_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) if folder.is_dir() else ([folder] if folder.suffix == ".safetensors" else [])


def weights_digest(path: str | Path) -> str | None:
    """SHA-256 over every tensor of ``path`` (a model folder or one safetensors file),
    independent of file layout and metadata; None when it holds no safetensors."""
    files = _safetensors_files(Path(path))
    if not files:
        return None
    tensors: list[tuple[str, Path, dict[str, Any], int]] = []
    for f in files:
        with f.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        tensors += [(name, f, info, 8 + n) for name, info in header.items() if name != "__metadata__"]
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for name, f, info, data_start in sorted(tensors, key=lambda t: t[0]):
            fh = handles.setdefault(f, f.open("rb"))
            start, end = info["data_offsets"]
            digest.update(f"{name}|{info['dtype']}|{info['shape']}|".encode())
            fh.seek(data_start + start)
            remaining = end - start
            while remaining > 0:
                chunk = fh.read(min(remaining, 1 << 24))
                if not chunk:
                    raise ValueError(f"{f} is truncated (tensor {name})")
                digest.update(chunk)
                remaining -= len(chunk)
    finally:
        for fh in handles.values():
            fh.close()
    return digest.hexdigest()


def pool_digest(digests: Mapping[str, str | None]) -> str | None:
    """One digest for a set of models (``{"base": d, "expert:math": d, ...}``); None if any is unknown."""
    if not digests or any(d is None for d in digests.values()):
        return None
    return hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()


def models_provenance(models: Mapping[str, str | Path], limit: int = DIGEST_LIMIT) -> dict[str, Any]:
    """Weight digests of a pool's models (null past ``limit`` bytes in all) and their pool digest."""
    sizes = {role: sum(f.stat().st_size for f in _safetensors_files(Path(p))) for role, p in models.items()}
    compute = sum(sizes.values()) <= limit
    digests = {role: weights_digest(p) if compute else None for role, p in models.items()}
    return {"weights_digest": digests, "pool_digest": pool_digest(digests)}


def _zoo_record(models: Mapping[str, str | Path]) -> dict[str, Any] | None:
    """The toy zoo's own record (``zoo.json`` next to the base) when the pool is the zoo."""
    base = models.get("base")
    record = Path(base).parent / "zoo.json" if base else None
    if record is None or not record.is_file():
        return None
    try:
        data = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    return {"root": str(record.parent), "digest": data.get("digest"), "built_with": data.get("built_with")}


def thread_settings() -> dict[str, Any]:
    import torch

    env = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUBLAS_WORKSPACE_CONFIG", "CUDA_VISIBLE_DEVICES")
    return {
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ[k] for k in env if k in os.environ},
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
    }


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "cpu_capability": cpu_capability(), "machine": platform.machine(), "system": platform.system()}
    if device.startswith("cuda") and torch.cuda.is_available():
        index = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    return info


def cpu_capability() -> str | None:
    """The CPU kernel family torch picked (e.g. AVX2, AVX512): it changes float rounding."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None


def record_session(run_dir: str | Path, session: Any) -> dict[str, Any]:
    """``record_run_environment`` for an open ``evomerge.session.Session``."""
    models = {"base": session.base, **{f"expert:{k}": v for k, v in session.experts.items()}}
    dtype = str(session.pool.dtype).removeprefix("torch.")
    return record_run_environment(run_dir, run_environment(models, str(session.merger.device), dtype))


def run_environment(models: Mapping[str, str | Path], device: str, dtype: str) -> dict[str, Any]:
    """What a run is made with: see the module docstring."""
    env: dict[str, Any] = {
        "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
        "git": git_commit(),
        "argv": sys.argv[1:],
        "dtype": dtype,
        **device_info(device),
        "threads": thread_settings(),
        "host": platform.node(),
        "models": models_provenance(models),
    }
    zoo = _zoo_record(models)
    if zoo is not None:
        env["zoo"] = zoo
    return env


def _comparable(env: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in env.items() if k not in (*_VOLATILE, "resumes", "argv")}


def record_run_environment(run_dir: str | Path, env: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``environment.json``: the first start's environment, plus each resume whose
    environment differs under ``resumes``. Returns what was written."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    current = read_json_object(path, "its environment is recorded anew")  # unreadable: start again rather than fail the run
    if current is None:
        record = dict(env)
    else:
        record = current
        latest = (current.get("resumes") or [current])[-1]
        if _comparable(latest) != _comparable(env):
            record.setdefault("resumes", []).append(dict(env))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return record


def read_environment(run_dir: str | Path) -> dict[str, Any] | None:
    return read_json_object(Path(run_dir) / ENVIRONMENT_FILE, "the environment is reported as not recorded")


def read_json_object(path: Path, consequence: str) -> dict[str, Any] | None:
    """A run directory's JSON file that must hold an object: None when it is missing, and
    None with one warning line (the file named, why, and ``consequence``) when it cannot be
    read, is not JSON or holds another type -- never a traceback."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        why = str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__
    else:
        if isinstance(data, dict):
            return data
        why = f"holds a JSON {type(data).__name__}, not an object"
    print(f"warning: skipped {path}: {why}; {consequence}", file=sys.stderr, flush=True)
    return None


LINE_PACKAGES = ("torch", "transformers", "numpy", "lm-eval", "python", "evomerge")


def environment_line(env: Mapping[str, Any] | None) -> str:
    """``torch 2.13.0+cpu, transformers 5.25.0, ...; git 1a2b3c4; cpu (AVX2) float32, 2 threads; zoo digest 0fa514e60670``."""
    if not env:
        return "not recorded (run made before evomerge recorded environment.json)"
    versions = env.get("versions") or {}
    parts = [", ".join(f"{p} {versions[p]}" for p in LINE_PACKAGES if versions.get(p))]
    git = env.get("git") or {}
    if git.get("commit"):
        parts.append(f"git {git['commit'][:10]}" + (" (uncommitted changes)" if git.get("dirty") else ""))
    cpu = f" ({env['cpu_capability']})" if env.get("cpu_capability") else ""
    threads = (env.get("threads") or {}).get("torch_threads")
    parts.append(f"{env.get('gpu') or env.get('device', '?')}{cpu} {env.get('dtype', '?')}" + (f", {threads} threads" if threads else ""))
    zoo = env.get("zoo") or {}
    pool = (env.get("models") or {}).get("pool_digest")
    if zoo.get("digest"):
        parts.append(f"zoo digest {zoo['digest'][:12]}")
    elif pool:
        parts.append(f"models digest {pool[:12]}")
    line = "; ".join(parts)
    resumes = env.get("resumes") or []
    if resumes:
        line += f"; resumed {len(resumes)}x in a different environment (environment.json: resumes)"
    return line
