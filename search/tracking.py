"""MLflow for a study: one experiment per study, one parent run per study, one nested child run per trial.

Everything goes through an explicit `MlflowClient` and run ids, never MLflow's process-global "active run":
with Hydra's basic launcher the trial jobs run in the sweeper's own process, with other launchers in other
processes or hosts, and a child finds its parent by the `mlflow.parentRunId` tag either way. Metric and
parameter names are the same for every trial, so the MLflow UI can compare them (table, parallel coordinates,
scatter).
"""
from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import requests
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from search.config import mask_url
from train.errors import ConfigError
from train.locks import host_lock

MLFLOW_NOTE = "mlflow.note.content"  # a run's description in the UI
EXPERIMENT_KIND, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # the UI's "Model training"

# MLflow's per-request limits for log_batch.
_MAX_PARAMS = 100
_MAX_METRICS = 1000
_MAX_PARAM_LENGTH = 6000
_HEALTH_TIMEOUT_S = 5.0


def _param_value(value: Any) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


class RunLogger:
    """Logs to one run; the `MetricSink` a trial reports to."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client = client
        self.run_id = run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        items = [Param(k, _param_value(v)) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS):
            self.client.log_batch(self.run_id, params=items[start:start + _MAX_PARAMS])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if math.isfinite(float(v))]
        for start in range(0, len(items), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[start:start + _MAX_METRICS])

    def log_series(self, name: str, values: list[float], first_step: int = 1) -> None:
        """One metric over steps (e.g. the fine-tune loss per step)."""
        now = int(time.time() * 1000)
        items = [Metric(name, float(v), now, first_step + i) for i, v in enumerate(values) if math.isfinite(v)]
        for start in range(0, len(items), _MAX_METRICS):
            self.client.log_batch(self.run_id, metrics=items[start:start + _MAX_METRICS])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, _param_value(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def rename(self, name: str) -> None:
        """The run's name in the UI's run list (e.g. a trial's key figures once it finished)."""
        self.set_tags({MLFLOW_RUN_NAME: name})

    def describe(self, markdown: str) -> None:
        """The run's description (the UI's Overview tab shows it as markdown)."""
        self.set_tags({MLFLOW_NOTE: markdown})

    def log_datasets(self, datasets: Sequence[DatasetRecord]) -> None:
        """Datasets as MLflow inputs of the run (name, where it is, digest, what it is used for)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        inputs = [DatasetInput(MetaDataset(source=resolve_dataset_source(str(d.path)), name=d.name,
                                           digest=d.digest)._to_mlflow_entity(),
                               tags=[InputTag("mlflow.data.context", d.context)]) for d in datasets]
        self.client.log_inputs(self.run_id, datasets=inputs)


@dataclass(frozen=True)
class DatasetRecord:
    """One dataset a study uses, for the MLflow run's inputs."""

    name: str
    path: Path
    digest: str
    context: str  # train, eval, unlabeled, guard


def files_digest(paths: Sequence[Path], extra: str = "") -> str:
    """A digest of a file list by names and sizes (cheap: no file is read), plus `extra` (e.g. the labels)."""
    digest = hashlib.sha256(extra.encode())
    for path in paths:
        digest.update(f"{Path(path).name}:{Path(path).stat().st_size}\n".encode())
    return digest.hexdigest()[:16]


@contextmanager
def _first_open_lock(uri: str) -> Iterator[None]:
    """Serialise opening a SQLite tracking store among the processes of this host.

    Opening the store creates and migrates its tables; two workers started together on a new file both migrate
    it and one fails ("duplicate column name"). A server (`http://...`) does that once, for every client.
    """
    prefix = "sqlite:///"
    path = Path(uri[len(prefix):]) if uri.startswith(prefix) else None
    if path is None or not path.parent.is_dir():  # not SQLite, or MLflow reports the bad path
        yield
        return
    with host_lock(path.with_name(path.name + ".lock")):
        yield


class Tracker:
    """The study's MLflow experiment on one tracking server or store."""

    def __init__(self, uri: str, experiment: str, artifact_location: str | None):
        self.uri = uri
        self.experiment = experiment
        self.artifact_location = artifact_location
        with _first_open_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)

    def check(self) -> None:
        """Fail fast with a one-line ConfigError when the tracking URI cannot be used.

        An HTTP server is probed once with a short timeout (MLflow's own client retries for minutes).
        """
        where = mask_url(self.uri)
        if self.uri.startswith(("http://", "https://")):
            try:
                requests.get(self.uri.rstrip("/") + "/health", timeout=_HEALTH_TIMEOUT_S).raise_for_status()
            except requests.RequestException as exc:
                raise ConfigError(f"tracking.uri={where}: MLflow server not reachable ({type(exc).__name__})") from None
        try:
            self.client.search_experiments(max_results=1)
        except Exception as exc:  # store back-ends raise MlflowException, SQLAlchemy and OS errors alike
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ConfigError(f"tracking.uri={where}: cannot use it ({type(exc).__name__}: "
                              f"{mask_url(first)})") from None

    def experiment_id(self) -> str:
        """Id of the study's experiment, created on first use (with the configured artifact location)."""
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if EXPERIMENT_KIND not in found.tags:  # made before the kind was set
                self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND, MODEL_TRAINING)
            return found.experiment_id
        location = None
        if self.artifact_location:
            Path(self.artifact_location).mkdir(parents=True, exist_ok=True)
            location = Path(self.artifact_location).resolve().as_uri()
        # MLflow 3's UI opens an experiment of unknown kind in its GenAI (traces) view; a study is model training.
        tags = {EXPERIMENT_KIND: MODEL_TRAINING}
        try:
            return self.client.create_experiment(self.experiment, artifact_location=location, tags=tags)
        except MlflowException:
            # Another worker created it between the lookup and the create.
            return self.client.get_experiment_by_name(self.experiment).experiment_id

    def start_run(self, name: str, parent_run_id: str | None = None,
                  tags: Mapping[str, Any] | None = None) -> RunLogger:
        all_tags = {MLFLOW_RUN_NAME: name, **(tags or {})}
        if parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = self.client.create_run(self.experiment_id(), run_name=name,
                                     tags={k: _param_value(v) for k, v in all_tags.items()})
        return RunLogger(self.client, run.info.run_id)

    def resume_run(self, run_id: str) -> RunLogger | None:
        """The run `run_id` marked running again, or None when this store does not have it."""
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        if run.info.lifecycle_stage != "active":
            return None
        self.client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        return RunLogger(self.client, run_id)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        RunLogger(self.client, run_id).set_tags(tags)

    def kill_run(self, run_id: str, reason: str) -> None:
        """End the run of a trial the study gave up on as KILLED, with `reason` as its `fail_reason` tag.

        A run that ended FAILED or KILLED keeps its status; a FINISHED one is marked KILLED too, as its result
        never reached the study (its worker was stopped between the end of the job and telling Optuna).
        """
        try:
            status = self.client.get_run(run_id).info.status
        except MlflowException:  # not in this store (e.g. tracking moved): nothing to end
            return
        if status not in ("FAILED", "KILLED"):
            self.set_tags(run_id, {"fail_reason": reason})
            self.client.set_terminated(run_id, "KILLED")

    def delete_run(self, run_id: str) -> None:
        """Delete a run that must not be mistaken for a real one (a parent run whose study creation was taken
        over); a run this store does not have is ignored."""
        try:
            self.client.delete_run(run_id)
        except MlflowException:
            pass
