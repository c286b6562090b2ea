"""``evomerge reproduce run=<run dir>``: run a recorded search again and compare.

The run's own ``config.yaml`` (seed included) is run afresh into a scratch folder, up to the
number of search candidates the original evaluated (or ``max_evals``), without the test
re-score and the report. Then the two archives are compared record by record (order, kind,
label, genome, recipe, scores, error), and the two environments (versions, model digests,
task files, threads, device, dtype, CPU kernel family). The first differing record is named
with how much it differs; the result line says ``identical`` only when every compared record
is equal. The exit code is 0 exactly then.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError

CONFIG_FILE = "config.yaml"
FINGERPRINT_FILE = "fingerprints.json"
ENVIRONMENT_FILE = "environment.json"
# the parts of environment.json that can change a score, in the order they are reported
ENV_FIELDS = ("device", "gpu", "dtype", "cpu_capability")


@dataclass
class Comparison:
    """Outcome of comparing a rerun's archive with the original's."""

    compared: int
    identical: bool
    first_difference: str | None = None
    environment: list[str] = field(default_factory=list)  # one line per difference

    def lines(self) -> list[str]:
        head = (
            f"identical: {self.compared} records (genome, recipe, scores, order) equal the original's"
            if self.identical
            else f"DIFFERS: {self.first_difference}"
        )
        return [head, *(f"  environment: {line}" for line in self.environment)]


def _records(run: Path) -> list[dict[str, Any]]:
    from evomerge.search.archive import Archive

    archive = Archive(run / "archive.jsonl")
    return [vars(r) for r in archive.records]


def _number_diff(a: Any, b: Any) -> float | None:
    """Largest absolute difference of two equal-shaped number lists/dicts; None if shapes differ."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        if set(a) != set(b):
            return None
        diffs = [_number_diff(a[k], b[k]) for k in a]
        return None if any(d is None for d in diffs) else max(diffs, default=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return None
        diffs = [_number_diff(x, y) for x, y in zip(a, b)]
        return None if any(d is None for d in diffs) else max(diffs, default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        return abs(float(a) - float(b))
    return 0.0 if a == b else None


def _describe(name: str, a: Any, b: Any) -> str:
    diff = _number_diff(a, b)
    if diff is not None:
        return f"{name} differ by up to {diff:.3g} (original {_short(a)}, rerun {_short(b)})"
    return f"{name}: original {_short(a)}, rerun {_short(b)}"


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def compare_records(original: Sequence[Mapping[str, Any]], rerun: Sequence[Mapping[str, Any]]) -> tuple[int, str | None]:
    """(records compared, first difference or None). Every rerun record is compared with the
    original's record at the same position; a rerun with fewer records than expected differs."""
    for i, (a, b) in enumerate(zip(original, rerun)):
        where = f"record {i} (archive id {a.get('id')}, {a.get('label') or a.get('kind')})"
        for key in ("id", "kind", "label"):
            if a.get(key) != b.get(key):
                return i, f"{where}: {key} {a.get(key)!r} in the original, {b.get(key)!r} in the rerun"
        if a.get("genome") != b.get("genome"):
            return i, f"{where}: " + _describe("genomes", a.get("genome"), b.get("genome"))
        if a.get("recipe") != b.get("recipe"):
            return i, f"{where}: " + _describe("recipes", a.get("recipe"), b.get("recipe"))
        if a.get("scores") != b.get("scores"):
            return i, f"{where}, same genome: " + _describe("scores", a.get("scores"), b.get("scores"))
        if a.get("error") != b.get("error"):
            return i, f"{where}: error {a.get('error')!r} in the original, {b.get('error')!r} in the rerun"
    n = min(len(original), len(rerun))
    return n, None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _latest(env: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The environment a run last ran in (its last resume's, if it was resumed elsewhere)."""
    if not env:
        return {}
    resumes = env.get("resumes")
    return resumes[-1] if isinstance(resumes, list) and resumes and isinstance(resumes[-1], Mapping) else env


def compare_environments(original: Mapping[str, Any] | None, rerun: Mapping[str, Any] | None) -> list[str]:
    """One line per difference of versions, model digests, threads, device, dtype, CPU kernels."""
    if not original:
        return ["the original run has no readable environment.json: versions and digests not compared"]
    a, b = _latest(original), _latest(rerun)
    lines = []
    va, vb = a.get("versions") or {}, b.get("versions") or {}
    for pkg in sorted(set(va) | set(vb)):
        if va.get(pkg) != vb.get(pkg):
            lines.append(f"{pkg} {va.get(pkg)} in the original, {vb.get(pkg)} now")
    ma, mb = (a.get("models") or {}), (b.get("models") or {})
    da, db = ma.get("weights_digest") or {}, mb.get("weights_digest") or {}
    for role in sorted(set(da) | set(db)):
        if da.get(role) != db.get(role):
            lines.append(f"{role} weights digest {str(da.get(role))[:12]} in the original, {str(db.get(role))[:12]} now")
    if ma.get("pool_digest") != mb.get("pool_digest") and not any("weights digest" in line for line in lines):
        lines.append(f"pool digest {str(ma.get('pool_digest'))[:12]} in the original, {str(mb.get('pool_digest'))[:12]} now")
    for key in ENV_FIELDS:
        if a.get(key) != b.get(key):
            lines.append(f"{key} {a.get(key)} in the original, {b.get(key)} now")
    ta, tb = (a.get("threads") or {}).get("torch_threads"), (b.get("threads") or {}).get("torch_threads")
    if ta != tb:
        lines.append(f"torch threads {ta} in the original, {tb} now")
    return lines


def compare_task_files(original_run: Path, rerun: Path) -> list[str]:
    """Task files (YAML, data) whose content changed since the original run, one line each."""
    from evomerge.rundir import compare_fingerprints

    saved, now = _read_json(original_run / FINGERPRINT_FILE), _read_json(rerun / FINGERPRINT_FILE)
    if saved is None or now is None:
        return []
    return [line for line in compare_fingerprints({"tasks": saved.get("tasks") or {}}, {"tasks": now.get("tasks") or {}})]


def original_budget(run: Path, cfg: DictConfig) -> int:
    """Search candidates the original evaluated (a partial run's are fewer than its budget)."""
    records = _records(run)
    done = sum(1 for r in records if r["kind"] == "search")
    budget = OmegaConf.select(cfg, "search.max_evals")
    return min(done, int(budget)) if isinstance(budget, int) else done


def rerun_config(run: Path, max_evals: int | None) -> tuple[DictConfig, int]:
    if not (run / CONFIG_FILE).is_file() or not (run / "archive.jsonl").is_file():
        raise ConfigError(f"{run} is not an evomerge run directory (no {CONFIG_FILE} / archive.jsonl)")
    try:
        cfg = OmegaConf.load(run / CONFIG_FILE)
    except Exception as err:  # yaml errors of a damaged file
        raise ConfigError(f"{run / CONFIG_FILE} cannot be read: {err}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"{run / CONFIG_FILE} is damaged (not a mapping)")
    done = original_budget(run, cfg)
    if max_evals is not None:
        if max_evals < 1:
            raise ConfigError(f"max_evals must be a positive integer, got {max_evals}")
        if max_evals > done:
            raise ConfigError(f"max_evals={max_evals}: the original run evaluated only {done} search candidates")
    n = max_evals or done
    if n < 1:
        raise ConfigError(f"{run} evaluated no search candidate yet: nothing to reproduce")
    cfg.search.max_evals = n
    cfg.resume = None
    cfg.force = False
    cfg.fitness.test_rescore = False
    OmegaConf.update(cfg, "report.html", False, force_add=True)
    OmegaConf.update(cfg, "report.plots", False, force_add=True)
    if OmegaConf.select(cfg, "executor.kind") not in (None, "local"):
        cfg.executor = {"kind": "local"}  # parallel workers may finish in another order
    return cfg, n


def expected_records(original: list[dict[str, Any]], n_search: int) -> list[dict[str, Any]]:
    """The original's records up to and including its ``n_search``-th search record."""
    out, seen = [], 0
    for r in original:
        if r["kind"] == "search":
            if seen == n_search:
                break
            seen += 1
        out.append(r)
    return out


def reproduce(run_dir: str | Path, max_evals: int | None = None, out: str | Path | None = None) -> Comparison:
    """Run ``run_dir``'s recorded config again into ``out`` (a new temporary folder by default) and compare."""
    from evomerge.run import run_search

    run = Path(run_dir).expanduser()
    cfg, n = rerun_config(run, max_evals)
    scratch = Path(out).expanduser() if out else Path(tempfile.mkdtemp(prefix=f"evomerge-reproduce-{run.name}-"))
    if scratch.exists() and any(scratch.iterdir()):
        raise ConfigError(f"refusing to reproduce into {scratch}: it is not empty")
    print(f"reproduce: running {run}'s config again ({n} search candidates) into {scratch}", flush=True)
    started = time.time()
    run_search(cfg, scratch, overrides=[])
    original = expected_records(_records(run), n)
    rerun = _records(scratch)
    compared, first = compare_records(original, rerun)
    if first is None and len(rerun) != len(original):
        first = f"the rerun has {len(rerun)} records, the original {len(original)} up to its {n}th search candidate"
    env = compare_environments(_read_json(run / ENVIRONMENT_FILE), _read_json(scratch / ENVIRONMENT_FILE))
    env += [f"task {line}" if not line.startswith("task") else line for line in compare_task_files(run, scratch)]
    result = Comparison(compared=compared, identical=first is None, first_difference=first, environment=env)
    print(f"reproduce: {time.time() - started:.0f}s, rerun in {scratch}")
    return result
