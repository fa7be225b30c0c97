"""Where a run's metrics go besides ``metrics.jsonl``: TensorBoard, Weights & Biases and MLflow.

Each backend is a small class with one interface (``log(step, metrics)``, ``close()``), listed in :data:`BACKENDS`
with the module it needs and the pip command that installs it; :class:`clipforge.train.run_log.RunLogger` opens the
ones ``logging.backends`` names. W&B and MLflow are optional extras: their packages are imported only when a run
asks for them (:func:`import_backends`), and a missing one is a :class:`~clipforge.config.ConfigError` that says
what to install.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from clipforge.config import ConfigError
from clipforge.io import atomic_write_text

logger = logging.getLogger("clipforge")

# the W&B project and the MLflow experiment when neither the config nor the environment names one
DEFAULT_PROJECT = "clipforge"
WANDB_ID_FILE = "wandb_run_id.txt"
MLFLOW_ID_FILE = "mlflow_run_id.txt"
# MLflow's limits (mlflow.utils.validation): a param value, a metric or param key, entries per log_batch call
MLFLOW_PARAM_VALUE_LENGTH = 6000
MLFLOW_KEY_LENGTH = 250
MLFLOW_PARAMS_PER_BATCH = 100
MLFLOW_METRICS_PER_BATCH = 1000


@dataclass(frozen=True)
class RunInfo:
    """What a backend needs to open its run, as plain values.

    ``config``: the run's resolved config as nested plain values. ``project``: empty = the backend's own
    environment variable (``WANDB_PROJECT`` / ``MLFLOW_EXPERIMENT_NAME``), else :data:`DEFAULT_PROJECT`.
    """

    output_dir: Path
    start_step: int
    config: Mapping[str, Any]
    name: str
    project: str = ""


class Backend(Protocol):
    """Where metrics go besides ``metrics.jsonl``; ``metrics`` holds only ints and floats."""

    def log(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardBackend:
    """Scalars in ``<output_dir>/tensorboard``; on resume, events after the resumed step are purged first."""

    def __init__(self, tensorboard: ModuleType, run: RunInfo) -> None:
        # purged for the reason metrics.jsonl drops them: they belong to the continuation being replaced
        self._writer = tensorboard.SummaryWriter(
            log_dir=str(run.output_dir / "tensorboard"), purge_step=run.start_step + 1
        )

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbBackend:
    """A Weights & Biases run: ``wandb.init(project, name, dir=output_dir, config, id, resume="allow")``.

    The run id is kept in ``<output_dir>/wandb_run_id.txt``, so a resumed run (``start_step > 0``) continues the
    same W&B run; a run from step 0 is a new one (the trainer starts one in a used folder only when told to
    ``--overwrite`` it) and replaces the stored id. W&B holds one value per step and ignores a step at or before
    the last one it has, so steps replayed after a resume from an earlier checkpoint keep their first values there
    (``metrics.jsonl`` and TensorBoard are rewound instead). ``WANDB_MODE=offline`` writes the run under
    ``<output_dir>/wandb`` for a later ``wandb sync``.
    """

    def __init__(self, wandb: ModuleType, run: RunInfo) -> None:
        id_file = run.output_dir / WANDB_ID_FILE
        run_id = _id_to_continue(id_file, run) or secrets.token_hex(8)
        try:
            self._run = wandb.init(
                project=run.project or os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT,
                name=run.name,
                dir=str(run.output_dir),
                config=dict(run.config),
                id=run_id,
                resume="allow",
                allow_val_change=True,  # a resumed run may change a setting (more steps); W&B would refuse it
                reinit="create_new",  # never log into another run this process has open
            )
        except wandb.errors.Error as error:
            raise ConfigError(
                f"logging.backends has 'wandb' but W&B could not start the run: {error} (log in with "
                f"`wandb login`, or set WANDB_MODE=offline to log under {run.output_dir / 'wandb'} and "
                "`wandb sync` it later)"
            ) from error
        _store_id(id_file, run_id)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


class MlflowBackend:
    """An MLflow run, written through ``MlflowClient``.

    The client, not ``mlflow.start_run``: it keeps no process-wide active run, which two trainings in one process
    would share. Tracking URI: ``MLFLOW_TRACKING_URI`` as MLflow reads it, else ``sqlite:///<output_dir>/mlflow.db``
    with artifacts in ``<output_dir>/mlruns`` (MLflow's own default layout, kept inside the run's folder; MLflow 3
    refuses a plain file store unless ``MLFLOW_ALLOW_FILE_STORE=true``, and a ``file:`` URI in
    ``MLFLOW_TRACKING_URI`` still works with that). Experiment: ``logging.project``, else
    ``MLFLOW_EXPERIMENT_NAME``, else ``clipforge``. Params: :func:`mlflow_params`; metric names:
    :func:`mlflow_metric_name`. The run id is kept in ``<output_dir>/mlflow_run_id.txt``: a resumed run continues
    it (a run from step 0 starts a new one, as with W&B); MLflow keeps every value it is sent, so a step replayed
    after a resume holds two values there.
    """

    def __init__(self, mlflow: ModuleType, run: RunInfo) -> None:
        self._metric = mlflow.entities.Metric
        self._param = mlflow.entities.Param
        self._not_found = mlflow.exceptions.MlflowException
        configured_uri = os.environ.get("MLFLOW_TRACKING_URI", "")
        self._uri = configured_uri or f"sqlite:///{(run.output_dir / 'mlflow.db').resolve()}"
        artifacts = None if configured_uri else (run.output_dir / "mlruns").resolve().as_uri()
        try:
            self._client = mlflow.tracking.MlflowClient(self._uri)
            name = run.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
            experiment_id = self._experiment_id(name, artifacts)
            self._run_id, logged_params = self._open_run(experiment_id, run)
            self._log_params(mlflow_params(run.config), logged_params)
        except mlflow.exceptions.MlflowException as error:
            raise ConfigError(
                f"logging.backends has 'mlflow' but MLflow could not start the run at {self._uri}: {error}"
            ) from error

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        experiment = self._client.get_experiment_by_name(name)
        if experiment is None:
            return self._client.create_experiment(name, artifact_location=artifact_location)
        if experiment.lifecycle_stage == "deleted":
            raise ConfigError(
                f"the MLflow experiment {name!r} is deleted in {self._uri}: restore it "
                "(`mlflow experiments restore`) or name another with logging.project or MLFLOW_EXPERIMENT_NAME"
            )
        return experiment.experiment_id

    def _open_run(self, experiment_id: str, run: RunInfo) -> tuple[str, dict[str, str]]:
        """The stored run (and the params it holds) when resuming and the tracking store has it, else a new run."""
        id_file = run.output_dir / MLFLOW_ID_FILE
        stored = _id_to_continue(id_file, run)
        if stored is not None:
            existing = self._existing_run(stored)
            if existing is not None:
                self._client.update_run(stored, status="RUNNING")
                return stored, dict(existing.data.params)
            logger.warning("MLflow run %s (from %s) is not in %s; starting a new run", stored, id_file, self._uri)
        created = self._client.create_run(experiment_id, run_name=run.name)
        _store_id(id_file, created.info.run_id)
        return created.info.run_id, {}

    def _existing_run(self, run_id: str) -> Any:
        try:
            found = self._client.get_run(run_id)
        except self._not_found as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            return None
        return None if found.info.lifecycle_stage == "deleted" else found

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        # MLflow refuses to change a param: a resumed run logs only the new ones and says which it could not change
        changed = sorted(key for key, value in params.items() if key in logged and logged[key] != value)
        if changed:
            logger.warning("the resumed MLflow run %s keeps its first values of %s", self._run_id, ", ".join(changed))
        new = [self._param(key, value) for key, value in params.items() if key not in logged]
        for chunk in _chunks(new, MLFLOW_PARAMS_PER_BATCH):
            self._client.log_batch(self._run_id, params=chunk)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        timestamp = int(time.time() * 1000)
        entries = [
            self._metric(mlflow_metric_name(key), float(value), timestamp, step) for key, value in metrics.items()
        ]
        for chunk in _chunks(entries, MLFLOW_METRICS_PER_BATCH):
            self._client.log_batch(self._run_id, metrics=chunk)

    def close(self) -> None:
        self._client.set_terminated(self._run_id)


@dataclass(frozen=True)
class BackendInfo:
    """One backend: the module that must import, its package's name, the pip command, and how to open it."""

    module: str
    package: str
    install: str
    open: Callable[[ModuleType, RunInfo], Backend]


# logging.backends' allowed names (config/schema.py LoggingConfig; a test keeps the two in step)
BACKENDS: dict[str, BackendInfo] = {
    "tensorboard": BackendInfo("torch.utils.tensorboard", "tensorboard", "pip install tensorboard", TensorBoardBackend),
    "wandb": BackendInfo("wandb", "wandb", "pip install 'clipforge[wandb]'", WandbBackend),
    "mlflow": BackendInfo("mlflow", "mlflow", "pip install 'clipforge[mlflow]'", MlflowBackend),
}

_MLFLOW_ILLEGAL = re.compile(r"[^A-Za-z0-9_\-. /]")


def mlflow_metric_name(name: str) -> str:
    """``name`` made a legal MLflow metric or param key, the same way every time.

    MLflow keys hold only letters, digits, ``_ - . /``, spaces and (not on Windows) ``:``, and are treated as file
    paths. So: ``@`` becomes ``_at_`` (``image_retrieval_recall@5`` -> ``image_retrieval_recall_at_5``); any other
    character outside ASCII letters, digits, ``_ - . /`` and space becomes ``_`` (``:`` too, so a name is the same
    on every OS); the name is cut to MLflow's 250 characters; then empty path parts are dropped (``a//b`` -> ``a/b``,
    a leading or trailing ``/``) and ``.`` or ``..`` parts become ``_``. Names that are legal already are unchanged.
    """
    text = _MLFLOW_ILLEGAL.sub("_", name.replace("@", "_at_"))[:MLFLOW_KEY_LENGTH]
    parts = ["_" if part in (".", "..") else part for part in text.split("/") if part]
    return "/".join(parts) or "_"


def mlflow_params(config: Mapping[str, Any]) -> dict[str, str]:
    """``config`` as MLflow params: nested keys joined with dots (``train.batch_size``, legal as by
    :func:`mlflow_metric_name`), values as text (a string as it is, anything else as JSON: ``[1, 2]``, ``null``,
    ``true``) cut to MLflow's 6000 characters."""
    params: dict[str, str] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping) and value:
            for key, inner in value.items():
                visit(f"{prefix}.{key}" if prefix else str(key), inner)
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            params[mlflow_metric_name(prefix)] = text[:MLFLOW_PARAM_VALUE_LENGTH]

    visit("", config)
    return params


def import_backends(names: Sequence[str]) -> dict[str, ModuleType]:
    """The module of every named backend, once each, in order; a ConfigError says what to install."""
    modules: dict[str, ModuleType] = {}
    for name in dict.fromkeys(names):
        info = BACKENDS.get(name)
        if info is None:
            raise ConfigError(f"unknown logging backend {name!r}; logging.backends allows {list(BACKENDS)}")
        try:
            modules[name] = importlib.import_module(info.module)
        except ImportError as error:
            raise ConfigError(
                f"logging.backends has {name!r} but {info.package} is not installed or does not import ({error}): "
                f"{info.install}, or drop {name!r} from logging.backends"
            ) from error
    return modules


def _id_to_continue(path: Path, run: RunInfo) -> str | None:
    """The backend run a resumed run continues: the id stored in ``path``; None for a new run (from step 0)."""
    return _stored_id(path) if run.start_step > 0 else None


def _stored_id(path: Path) -> str | None:
    text = path.read_text().strip() if path.is_file() else ""
    return text or None


def _store_id(path: Path, run_id: str) -> None:
    if _stored_id(path) != run_id:
        atomic_write_text(path, run_id + "\n", replace=True)


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
