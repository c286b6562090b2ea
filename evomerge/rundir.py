"""Run-directory integrity: unique names, an exclusive lock, fingerprints of the inputs,
and the rules for what ``resume=`` may change.

- **Lock** (``run.lock``): ``flock`` on the file, held for the whole run; the kernel drops
  it when the owner dies, so a stale lock is taken over. The file records pid, host and
  start time for the refusal message, and doubles as a fallback where ``flock`` is not
  enforced (a live pid on this host that is not us holds the run).
- **Fingerprints** (``fingerprints.json``): size, mtime and a SHA-1 of every model file and
  task file (whole file up to 32 MiB, else the safetensors header plus three 1 MiB
  samples, with the mtime then counting too). Resume and export refuse on a mismatch
  unless ``force=true``.
- **Resume overrides**: only keys that cannot change what was already evaluated may be
  changed on resume; the rest are refused by name.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import secrets
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf

from evomerge.errors import ConfigError, EvomergeError

LOCK_FILE = "run.lock"
FINGERPRINT_FILE = "fingerprints.json"
OVERRIDES_FILE = "overrides.yaml"
FULL_HASH_LIMIT = 32 << 20
SAMPLE = 1 << 20
MODEL_SUFFIXES = {".safetensors", ".bin", ".gguf", ".pt", ".pth", ".json", ".model", ".txt", ".tiktoken"}

# on resume these may change: they do not alter any evaluated candidate
SAFE_RESUME_KEYS = ("search.max_evals", "search.progress", "search.retry_failed", "fitness.test_rescore_searched",
                    # how the final front is chosen after the search: no archived record depends on them
                    "fitness.final_front", "fitness.confirm_z", "fitness.confirm_max_points")
SAFE_RESUME_PREFIXES = ("report.", "executor.", "progress.")
# the executor is how this invocation evaluates, not what the run is: taken from the command line
IGNORED_RESUME_KEYS = ("resume", "force", "executor")

_SUFFIX = f"{os.getpid() % 0xFFFF:04x}{secrets.token_hex(2)}"


class RunDirError(EvomergeError):
    """The run directory is in use, damaged or does not match its inputs."""


def run_suffix() -> str:
    """Per-process suffix of fresh run directories: two runs started in the same second differ."""
    return _SUFFIX


# ---------------------------------------------------------------- lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """Exclusive lock on a run directory; ``release()`` (or process exit) frees it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None
        self.took_over: dict[str, Any] | None = None
        # a resume's config changes, written by commit_resume_changes once everything checked out
        self.pending_config: str | None = None
        self.pending_changes: list[str] = []

    def acquire(self) -> "RunLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(fd)
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by {_who(owner)}; wait for it to finish or stop it first") from None
        owner = _read_owner(fd)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        if owner and owner.get("host") == me["host"] and owner.get("pid") != me["pid"] and _pid_alive(int(owner.get("pid", 0))):
            # flock not enforced here (e.g. some network filesystems): trust the pid
            os.close(fd)
            raise RunDirError(f"{self.path.parent} is in use by {_who(owner)}; wait for it to finish or stop it first")
        if owner:
            self.took_over = owner  # its owner died without releasing it
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**me, "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # an empty lock file means released cleanly (not unlinked: see flock races)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self.fd is None else self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    try:
        raw = os.pread(fd, 4096, 0)
        owner = json.loads(raw.decode()) if raw.strip() else {}
        return owner if isinstance(owner, dict) else {}
    except (OSError, ValueError):
        return {}


def _who(owner: Mapping[str, Any]) -> str:
    if not owner:
        return "another process"
    return f"pid {owner.get('pid')} on {owner.get('host')} (since {owner.get('started', '?')})"


# ---------------------------------------------------------------- run directory


def claim_fresh(run_dir: Path, config_text: str) -> None:
    """Write a fresh run's config.yaml exclusively: a directory that holds a run is never reused."""
    if (run_dir / "archive.jsonl").exists():
        raise RunDirError(f"{run_dir} already holds a run; pass resume={run_dir} to continue it")
    try:
        fd = os.open(run_dir / "config.yaml", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise RunDirError(f"{run_dir} already holds a run; pass resume={run_dir} to continue it") from None
    with os.fdopen(fd, "w") as f:
        f.write(config_text)
        f.flush()
        os.fsync(f.fileno())


def write_atomic(path: Path, text: str, tmp: Path | None = None) -> None:
    """Write via a temporary file (default ``<name>.tmp``) and rename; on any error (a full
    disk, Ctrl-C) the temporary file is removed, so a failed write never keeps the space it took."""
    tmp = tmp or path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


def check_resume_target(resume: str) -> Path:
    run_dir = Path(resume)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"cannot resume: {run_dir / 'config.yaml'} not found (is {run_dir} an evomerge run directory?)")
    return run_dir


def load_subset(run_dir: Path) -> dict[str, list[int]] | None:
    path = run_dir / "subset.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
        if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(i, int) for i in v) for v in data.values()):
            raise ValueError("expected {task: [doc ids]}")
        return data
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunDirError(
            f"{path} is damaged ({str(exc).splitlines()[0][:80]}); it fixes the docs every candidate was scored on -- "
            "restore it, or delete it to recompute it from fitness.subset_seed (the same ids while the task data is unchanged)"
        ) from None


# ---------------------------------------------------------------- resume overrides


def read_original_overrides(run_dir: Path) -> list[str]:
    for path in (run_dir / OVERRIDES_FILE, run_dir / ".hydra" / "overrides.yaml"):
        if path.is_file():
            try:
                data = OmegaConf.to_container(OmegaConf.load(path))
                return [str(x) for x in data] if isinstance(data, list) else []
            except Exception:  # noqa: BLE001 -- a damaged record of overrides only weakens the check
                return []
    return []


def apply_resume_overrides(saved: DictConfig, overrides: Iterable[str], original: Iterable[str] = ()) -> list[str]:
    """Apply the safe command-line overrides of a ``resume=`` invocation to the saved config;
    refuse the others (unless they repeat the original run's value). Returns what changed."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [o for o in overrides]
    if not overrides:
        return []
    original = set(original)
    parsed = OverridesParser.create().parse_overrides(overrides)
    refused: list[str] = []
    changed: list[str] = []
    missing = object()
    for text, o in zip(overrides, parsed):
        key = o.key_or_group
        if key in IGNORED_RESUME_KEYS or key == "hydra" or key.startswith("hydra.") or text in original:
            continue
        value = o.value()
        plain = OmegaConf.to_container(value) if isinstance(value, (DictConfig,)) else value
        old = OmegaConf.select(saved, key, default=missing)
        old_plain = OmegaConf.to_container(old) if isinstance(old, DictConfig) or OmegaConf.is_list(old) else old
        if not o.is_delete() and old is not missing and old_plain == plain:
            continue  # repeats the run's own value
        if not o.is_delete() and (key in SAFE_RESUME_KEYS or key.startswith(SAFE_RESUME_PREFIXES)):
            if key == "search.max_evals":
                if not isinstance(plain, int) or (isinstance(old_plain, int) and plain < old_plain):
                    raise ConfigError(f"search.max_evals can only grow on resume (the run has {old_plain}), got {plain!r}")
            OmegaConf.update(saved, key, plain, merge=False, force_add=True)
            changed.append(f"{key}: {None if old is missing else old_plain} -> {plain}")
            continue
        refused.append(key)
    if refused:
        raise ConfigError(
            f"cannot change {', '.join(refused)} when resuming (the run's config.yaml fixes it); on resume only "
            f"{', '.join(SAFE_RESUME_KEYS)}, {', '.join(p + '*' for p in SAFE_RESUME_PREFIXES)} may change -- start a new run for the others"
        )
    return changed


# ---------------------------------------------------------------- fingerprints


def _safetensors_header(path: Path, size: int) -> bytes:
    """The header bytes; raises RunDirError when the file is shorter than its header says."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise RunDirError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 << 20:
            raise RunDirError(f"{path} is truncated or damaged (header of {n} bytes, file of {size})")
        header = f.read(n)
    try:
        meta = json.loads(header)
        end = max((int(v["data_offsets"][1]) for k, v in meta.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError):
        raise RunDirError(f"{path} is damaged (unreadable safetensors header)") from None
    if 8 + n + end > size:
        raise RunDirError(f"{path} is truncated: its header needs {8 + n + end} bytes, the file has {size}")
    return head + header


def fingerprint_file(path: Path) -> dict[str, Any]:
    st = path.stat()
    h = hashlib.sha1()
    sampled = st.st_size > FULL_HASH_LIMIT
    if path.suffix == ".safetensors":
        h.update(_safetensors_header(path, st.st_size))
    with path.open("rb") as f:
        if sampled:
            for at in (0, st.st_size // 2, max(0, st.st_size - SAMPLE)):
                f.seek(at)
                h.update(f.read(SAMPLE))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": h.hexdigest(), "sampled": sampled}


def model_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES)


def fingerprints(models: Mapping[str, str | Path], task_files: Mapping[str, Iterable[str | Path]] | None = None) -> dict[str, Any]:
    """``models``: role -> HF folder or GGUF file; ``task_files``: task -> its YAML and data files."""
    out: dict[str, Any] = {"models": {}}
    if task_files is not None:
        out["tasks"] = {}
    for role, where in models.items():
        p = Path(where).expanduser()
        out["models"][role] = {"path": str(p), "files": {f.name: fingerprint_file(f) for f in model_files(p)}}
    for task, files in (task_files or {}).items():
        out["tasks"][task] = {"files": {str(Path(f)): fingerprint_file(Path(f)) for f in files if Path(f).is_file()}}
    return out


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    if old.get("size") != new.get("size"):
        return f"size {old.get('size')} -> {new.get('size')}"
    if old.get("sha1") != new.get("sha1"):
        return "content changed"
    if (old.get("sampled") or new.get("sampled")) and old.get("mtime_ns") != new.get("mtime_ns"):
        return "modified (mtime changed; only samples are hashed for large files)"
    return None


def compare_fingerprints(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprint sets ([] when they match)."""
    problems = []
    for section, what in (("models", "model"), ("tasks", "task")):
        if section not in current:
            continue  # e.g. export checks the models only
        old_s, new_s = saved.get(section, {}), current[section]
        for name, old in old_s.items():
            new = new_s.get(name)
            if new is None:
                problems.append(f"{what} '{name}' is no longer in the run's inputs")
                continue
            old_files, new_files = _pair_moved_files(old.get("files", {}), new.get("files", {}))
            for fname, fp in old_files.items():
                now = new_files.get(fname)
                reason = "missing" if now is None else _differs(fp, now)
                if reason:
                    problems.append(f"{what} '{name}' file {fname}: {reason}")
            for fname in sorted(set(new_files) - set(old_files)):
                problems.append(f"{what} '{name}' has a new file {fname}")
    return problems


def _pair_moved_files(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Key a file that moved (same name, another folder) by its old path, so only its content counts.

    Task files are keyed by their path, which changes when the checkout, the virtual environment
    or a cluster's scratch mount moves between start and resume; the scores depend on the content.
    """
    old, new = dict(old), dict(new)
    for fname in [f for f in old if f not in new]:
        moved = [f for f in new if f not in old and Path(f).name == Path(fname).name]
        same = [f for f in moved if (new[f].get("size"), new[f].get("sha1")) == (old[fname].get("size"), old[fname].get("sha1"))]
        if same or len(moved) == 1:
            new[fname] = new.pop((same or moved)[0])
    return old, new


def check_fingerprints(run_dir: Path, current: Mapping[str, Any], force: bool, action: str) -> None:
    """Refuse ``action`` (resume/export) when the inputs changed since the run started."""
    path = run_dir / FINGERPRINT_FILE
    if not path.is_file():
        return  # a run from before fingerprints existed
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise RunDirError(f"{path} is damaged; pass force=true to {action} without checking the models") from None
    problems = compare_fingerprints(saved, current)
    if not problems:
        return
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if force:
        print(f"warning: inputs changed since the run started: {problems[0]}{more}; continuing (force=true)", file=sys.stderr)
        return
    raise RunDirError(
        f"cannot {action}: the inputs changed since the run started: {problems[0]}{more}; "
        f"its archived scores no longer describe these models -- pass force=true to {action} anyway"
    )


# ---------------------------------------------------------------- export target


def check_export_target(target: Path, model_paths: Iterable[str | Path], force: bool) -> None:
    t = target.expanduser().resolve()
    for m in model_paths:
        p = Path(m).expanduser().resolve()
        folder = p.parent if p.is_file() else p
        if t == folder or folder in t.parents or t in folder.parents:
            raise RunDirError(f"refusing to export into {target}: it holds (or is inside) the pool model folder {folder}")
    if t.exists() and (not t.is_dir() or any(t.iterdir())) and not force:
        raise RunDirError(f"refusing to export into {target}: it is not empty (pass force=true to write into it anyway)")


def verify_inputs(run_dir: Path, models: Mapping[str, str | Path], task_files: Mapping[str, Iterable[str | Path]], force: bool) -> None:
    """First start: record the fingerprints of the inputs. Later (resume): refuse if they changed."""
    current = fingerprints(models, task_files)
    path = run_dir / FINGERPRINT_FILE
    if path.is_file():
        check_fingerprints(run_dir, current, force, "resume")
        if not force:
            return
    write_atomic(path, json.dumps(current, indent=1))


def open_run_dir(cfg: DictConfig, run_dir: Path, overrides: list[str] | None) -> tuple[DictConfig, Path, RunLock]:
    """Fresh run: lock the new directory and write its config exclusively. Resume: lock the
    run, load its config and apply the safe overrides (refusing the rest)."""
    resume = OmegaConf.select(cfg, "resume")
    if resume:
        run_dir = check_resume_target(str(resume))
        lock = RunLock(run_dir).acquire()
        try:
            loaded = OmegaConf.load(run_dir / "config.yaml")
            if not isinstance(loaded, DictConfig):
                raise RunDirError(f"{run_dir / 'config.yaml'} is damaged (not a mapping)")
            if OmegaConf.select(cfg, "executor") is not None:  # this command line's executor (default: local)
                loaded.executor = OmegaConf.to_container(cfg.executor, resolve=True)
            changed = apply_resume_overrides(loaded, overrides or [], read_original_overrides(run_dir))
            if changed:  # written only after the inputs, the config and the budget are checked
                lock.pending_config, lock.pending_changes = OmegaConf.to_yaml(loaded), changed
            loaded.resume = str(run_dir)
            loaded.force = bool(OmegaConf.select(cfg, "force"))
        except Exception:
            lock.release()
            raise
        _note_takeover(lock)
        return loaded, run_dir, lock
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        claim_fresh(run_dir, OmegaConf.to_yaml(OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))))
        write_atomic(run_dir / OVERRIDES_FILE, OmegaConf.to_yaml(OmegaConf.create(list(overrides or []))))
    except Exception:
        lock.release()
        raise
    return cfg, run_dir, lock


def commit_resume_changes(lock: RunLock) -> None:
    """Write the safe changes of a resume into config.yaml: called once the fingerprints,
    the config and the budget are checked, so a refused resume changes nothing."""
    if lock.pending_config is None:
        return
    write_atomic(lock.path.parent / "config.yaml", lock.pending_config)
    print(f"resume: {'; '.join(lock.pending_changes)}", file=sys.stderr, flush=True)
    lock.pending_config, lock.pending_changes = None, []


def _note_takeover(lock: RunLock) -> None:
    if lock.took_over:
        print(f"note: {lock.path.parent} was last held by {_who(lock.took_over)}, which ended without releasing it; taking over", file=sys.stderr)
