"""Experiment trackers (``tracker=none|mlflow|wandb``): watch an overnight run where you
already watch training runs.

Per candidate its scores, standard errors and genome (the tracker's step is the archive id,
so a resumed run continues the same tracker run without a duplicate point); per generation
the hypervolume, front size and proposal time; at the end the front table, report.html,
recipes and summary.json as artifacts; the resolved config as parameters; the run name is the
run directory's name. ``tracker.json`` in the run directory remembers the tracker run and the
last archive id logged.

A tracker never stops or corrupts a search: its first failure is one warning line and it is
switched off for the rest of the run (``SafeTracker``).
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any, Mapping, Protocol, Sequence

STATE_FILE = "tracker.json"
ARTIFACTS = ("summary.json", "pareto_front.csv", "report.html", "front.png", "progress.png")


class Tracker(Protocol):
    name: str

    def start(self, run_dir: Path, config: Mapping[str, Any]) -> None: ...

    def log_candidates(self, records: Sequence[Any], objectives: Sequence[str]) -> None: ...

    def log_generation(self, entry: Mapping[str, Any]) -> None: ...

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None: ...


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}`` (tracker parameters are flat strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value, default=str) if not isinstance(value, str) else value
    return out


def candidate_metrics(record: Any, objectives: Sequence[str]) -> dict[str, float]:
    metrics = {f"score/{k}": float(v) for k, v in record.scores.items()}
    metrics.update({f"stderr/{k}": float(v) for k, v in (record.stderr or {}).items() if v == v})
    metrics.update({f"gene/{i}": float(x) for i, x in enumerate(record.genome or [])})
    return metrics


class _State:
    """tracker.json: the tracker run's id and the last archive id logged."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STATE_FILE
        try:
            data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            data = {}
        self.data: dict[str, Any] = data if isinstance(data, dict) else {}

    @property
    def last_id(self) -> int:
        return int(self.data.get("last_id", -1))

    def save(self, **values: Any) -> None:
        self.data.update(values)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data))
        os.replace(tmp, self.path)


class NoTracker:
    name = "none"

    def start(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        pass

    def log_candidates(self, records: Sequence[Any], objectives: Sequence[str]) -> None:
        pass

    def log_generation(self, entry: Mapping[str, Any]) -> None:
        pass

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        pass


class MlflowTracker:
    """MLflow: ``tracking_uri`` (null: ``$MLFLOW_TRACKING_URI`` or ``mlruns/`` next to the run
    directory), ``experiment``."""

    name = "mlflow"

    def __init__(self, tracking_uri: str | None = None, experiment: str = "evomerge"):
        self.tracking_uri, self.experiment = tracking_uri, experiment

    def start(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import mlflow

        self.mlflow, self.state = mlflow, _State(run_dir)
        uri = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve().parent / "mlruns").as_uri()
        if uri.startswith("file:") or "://" not in uri:
            # MLflow 3 keeps the file store (what mlflow-skinny can write without a database)
            # behind an opt-in; a folder is what a local run wants
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow.set_tracking_uri(uri)
        self.client = mlflow.tracking.MlflowClient(uri)
        run_id = self.state.data.get("run_id") if self.state.data.get("kind") == self.name else None
        if run_id is None:
            experiment = mlflow.set_experiment(self.experiment)
            run = self.client.create_run(experiment.experiment_id, run_name=Path(run_dir).name, tags={"evomerge.run_dir": str(Path(run_dir).resolve())})
            run_id = run.info.run_id
            params = flatten(config)
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                batch = [mlflow.entities.Param(k, v[:6000]) for k, v in list(params.items())[i : i + 100]]
                self.client.log_batch(run_id, params=batch)
            self.state.save(kind=self.name, run_id=run_id, tracking_uri=uri)
        else:
            self.client.update_run(run_id, status="RUNNING")
            # what the store holds is the truth (a kill between a write and tracker.json's update)
            scored = [k for k in self.client.get_run(run_id).data.metrics if k.startswith("score/")]
            if scored:
                self.state.save(last_id=max((m.step for m in self.client.get_metric_history(run_id, scored[0])), default=-1))
        self.run_id = run_id

    def log_candidates(self, records: Sequence[Any], objectives: Sequence[str]) -> None:
        from mlflow.entities import Metric

        new = [r for r in records if r.id > self.state.last_id and r.error is None]
        if not new:
            return
        metrics = [Metric(k, v, 0, r.id) for r in new for k, v in candidate_metrics(r, objectives).items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        self.state.save(last_id=max(r.id for r in new))

    def log_generation(self, entry: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        step = int(entry.get("n_evals", 0))
        values = {f"round/{k}": float(entry[k]) for k in ("hypervolume", "front_size", "propose_s") if isinstance(entry.get(k), (int, float))}
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, 0, step) for k, v in values.items()])

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        for name in ARTIFACTS:
            if (Path(run_dir) / name).is_file():
                self.client.log_artifact(self.run_id, str(Path(run_dir) / name))
        if (Path(run_dir) / "recipes").is_dir():
            self.client.log_artifacts(self.run_id, str(Path(run_dir) / "recipes"), artifact_path="recipes")
        final = {"final/hypervolume": float(summary.get("hypervolume", 0.0)), "final/front_size": float(len(summary.get("front") or []))}
        for name, entry in (summary.get("test") or {}).items():
            for k, v in (entry.get("scores") or {}).items():
                final[f"test/{name}/{k}"] = float(v)
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(k.replace(":", "_"), v, 0, 0) for k, v in final.items()])
        self.client.set_terminated(self.run_id)


class WandbTracker:
    """Weights & Biases: ``project``, ``mode`` (``online``, ``offline``: files in the run
    directory's ``wandb/``, ``wandb sync`` later), ``entity``."""

    name = "wandb"

    def __init__(self, project: str = "evomerge", mode: str = "online", entity: str | None = None):
        self.project, self.mode, self.entity = project, mode, entity

    def start(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        import wandb

        self.wandb, self.state = wandb, _State(run_dir)
        run_id = self.state.data.get("run_id") if self.state.data.get("kind") == self.name else None
        run_id = run_id or secrets.token_hex(4)  # W&B ids: 8 lowercase alphanumerics
        self.run = wandb.init(project=self.project, entity=self.entity, name=Path(run_dir).name, id=run_id, resume="allow", mode=self.mode,
                              dir=str(run_dir), config=dict(config), reinit="finish_previous")
        # the candidates' step is the archive id, the generations' the evaluations so far
        self.run.define_metric("archive_id")
        self.run.define_metric("candidate/*", step_metric="archive_id")
        self.run.define_metric("n_evals")
        self.run.define_metric("round/*", step_metric="n_evals")
        if self.mode == "offline":
            # a kill can lose what W&B had not flushed yet: go on from what its files hold
            logged = [row["archive_id"] for row in wandb_offline_history(Path(run_dir)) if "archive_id" in row]
            self.state.save(kind=self.name, run_id=run_id, last_id=max(logged, default=-1))
        else:
            self.state.save(kind=self.name, run_id=run_id)

    def log_candidates(self, records: Sequence[Any], objectives: Sequence[str]) -> None:
        new = [r for r in records if r.id > self.state.last_id and r.error is None]
        for r in new:
            self.run.log({"archive_id": r.id, **{f"candidate/{k}": v for k, v in candidate_metrics(r, objectives).items()}})
        if new:
            self.state.save(last_id=max(r.id for r in new))

    def log_generation(self, entry: Mapping[str, Any]) -> None:
        values = {f"round/{k}": float(entry[k]) for k in ("hypervolume", "front_size", "propose_s") if isinstance(entry.get(k), (int, float))}
        self.run.log({"n_evals": int(entry.get("n_evals", 0)), **values})

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        artifact = self.wandb.Artifact(f"{Path(run_dir).name}-outputs".replace(":", "_"), type="evomerge-run")
        for name in ARTIFACTS:
            if (Path(run_dir) / name).is_file():
                artifact.add_file(str(Path(run_dir) / name))
        if (Path(run_dir) / "recipes").is_dir():
            artifact.add_dir(str(Path(run_dir) / "recipes"), name="recipes")
        self.run.log_artifact(artifact)
        self.run.summary["final/hypervolume"] = float(summary.get("hypervolume", 0.0))
        self.run.summary["final/front_size"] = len(summary.get("front") or [])
        self.run.finish()


def wandb_offline_history(run_dir: Path) -> list[dict[str, Any]]:
    """History rows of the offline W&B runs under ``run_dir/wandb``: their ``.wandb`` files are
    a LevelDB-style log of protobuf records (7-byte file header, 32 KiB blocks, 7-byte record
    headers: checksum, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    rows: list[dict[str, Any]] = []
    for path in sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, pending = path.read_bytes(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
            if kind in (2, 3):
                pending += chunk
                continue
            if kind not in (1, 4):
                continue
            record = pb.Record()
            try:
                record.ParseFromString(pending + chunk)
            except Exception:  # noqa: BLE001 -- a torn last record of a killed run
                break
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


class SafeTracker:
    """Wraps a tracker: its first failure is one warning, then it is off; the search goes on."""

    def __init__(self, inner: Any):
        self.inner, self.failed = inner, False
        self.name = getattr(inner, "name", type(inner).__name__)

    def _call(self, what: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.inner, what)(*args)
        except Exception as exc:  # noqa: BLE001 -- a tracker must never stop or corrupt the search
            self.failed = True
            print(f"warning: tracker {self.name} failed in {what} ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}); "
                  "the search goes on without it", file=sys.stderr, flush=True)

    def start(self, run_dir: Path, config: Mapping[str, Any]) -> None:
        self._call("start", run_dir, config)

    def log_candidates(self, records: Sequence[Any], objectives: Sequence[str]) -> None:
        self._call("log_candidates", records, objectives)

    def log_generation(self, entry: Mapping[str, Any]) -> None:
        self._call("log_generation", entry)

    def finish(self, run_dir: Path, summary: Mapping[str, Any]) -> None:
        self._call("finish", run_dir, summary)


def none() -> NoTracker:
    return NoTracker()


def mlflow_tracker(tracking_uri: str | None = None, experiment: str = "evomerge") -> MlflowTracker:
    return MlflowTracker(tracking_uri, experiment)


def wandb_tracker(project: str = "evomerge", mode: str = "online", entity: str | None = None) -> WandbTracker:
    if mode not in ("online", "offline", "disabled"):
        from evomerge.errors import ConfigError

        raise ConfigError(f"tracker.mode must be online, offline or disabled, got {mode!r}")
    return WandbTracker(project, mode, entity)


def build_tracker(cfg: Any) -> SafeTracker:
    """The run's ``tracker`` config group (``_target_``), checked before any model loads: a
    tracker whose library is not installed is one line naming the extra to install."""
    from omegaconf import OmegaConf

    from evomerge.errors import ConfigError

    node = OmegaConf.select(cfg, "tracker")
    if node is None or OmegaConf.select(cfg, "tracker._target_") in (None, "evomerge.trackers.none"):
        return SafeTracker(NoTracker())
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        tracker = instantiate(node)
    except InstantiationException as exc:
        raise ConfigError(f"invalid tracker config: {str(exc).splitlines()[0]}") from None
    library = {"mlflow": "mlflow", "wandb": "wandb"}.get(getattr(tracker, "name", ""))
    if library:
        import importlib.util

        if importlib.util.find_spec(library) is None:
            raise ConfigError(f"tracker={tracker.name} needs the {library} package: pip install 'evomerge[{library}]'")
    return SafeTracker(tracker)


def round_entry(loop: Any) -> dict[str, Any]:
    """The last generation's numbers for a tracker: evaluations, hypervolume, front size, proposal time."""
    from evomerge.search.report import front

    entry = dict(loop.state.history[-1]) if loop.state.history else {}
    entry["front_size"] = len(front(loop.archive.search_records()))
    return entry
