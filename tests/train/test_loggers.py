"""The run logger's backends, all offline: W&B in ``WANDB_MODE=offline``, MLflow in a local store under tmp_path.

A W&B offline run is read back from its ``run-<id>.wandb`` file: a LevelDB-style log of protobuf ``Record``s
(32 KiB blocks, each chunk behind a 7-byte header: CRC, length, kind), after a 7-byte ``:W&B`` file header.
"""

from __future__ import annotations

import json
import struct
import sys
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from clipforge.cli import main
from clipforge.config import ConfigError, LoggingConfig, config_to_dict, save_config
from clipforge.train.log_backends import BACKENDS, BackendInfo, RunInfo, mlflow_metric_name, mlflow_params
from clipforge.train.run_log import RunLogger, read_metrics
from tests.conftest import tiny_config


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------
class RecordingBackend:
    """A backend that keeps what it was given, opened through the same table as the real ones."""

    opened: list[RecordingBackend] = []

    def __init__(self, module: Any, run: RunInfo) -> None:
        self.run = run
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.closed = False
        RecordingBackend.opened.append(self)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self.logged.append((step, dict(metrics)))

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def recording_backend(monkeypatch: pytest.MonkeyPatch) -> type[RecordingBackend]:
    RecordingBackend.opened = []
    monkeypatch.setitem(BACKENDS, "recording", BackendInfo("json", "json", "pip install nothing", RecordingBackend))
    return RecordingBackend


def write_records(path: Path, steps: range) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps({"step": step, "loss": 1.0 / step}) + "\n" for step in steps)
    path.write_text(text)
    return text


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    home = tmp_path / "wandb-home"
    for variable, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": home,
        "WANDB_CONFIG_DIR": home / "config",
        "WANDB_CACHE_DIR": home / "cache",
        "WANDB_DATA_DIR": home / "data",
        "WANDB_ERROR_REPORTING": "false",  # nothing leaves the machine
        "WANDB_CONSOLE": "off",  # leave pytest's capture of stdout/stderr alone
    }.items():
        monkeypatch.setenv(variable, str(value))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    home.mkdir()
    # imported after the environment is set: W&B reads some of it at import
    return pytest.importorskip("wandb", reason="wandb is not installed: pip install 'clipforge[wandb]'")


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf records of one offline ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    block, data = 32768, path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = 7, b""
    while position + 7 <= len(data):
        left_in_block = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left_in_block < 7 or (length == 0 and kind == 0):  # block padding
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_run_logs(output_dir: Path, run_id: str) -> list[tuple[Any, list[dict[str, Any]]]]:
    """(run record, history rows without W&B's own ``_`` keys but ``_step``) of every offline run folder of
    ``run_id``, oldest first."""
    runs = []
    for path in sorted(output_dir.glob(f"wandb/offline-run-*-{run_id}*/run-{run_id}.wandb")):
        run, history = None, []
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "history":
                items = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item
                }
                history.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
        runs.append((run, history))
    return runs


@pytest.fixture
def mlflow_local(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # nothing leaves the machine (read at import)
    return pytest.importorskip("mlflow", reason="mlflow is not installed: pip install 'clipforge[mlflow]'")


# ----------------------------------------------------------------------------------------------
# The logger and its table
# ----------------------------------------------------------------------------------------------
def test_backend_table_matches_the_config_schema() -> None:
    (choice,) = typing.get_args(typing.get_type_hints(LoggingConfig)["backends"])
    assert typing.get_args(choice) == tuple(BACKENDS)


def test_only_numbers_reach_the_backends(tmp_path: Path, recording_backend: type[RecordingBackend]) -> None:
    run_log = RunLogger(tmp_path, 10, backends=["recording", "recording"], progress=False)
    record = {"loss": 1.5, "samples": 32, "skipped": True, "note": "text", "missing": None, "lr": 1e-3}
    run_log.log(1, record)
    run_log.log(2, {"note": "nothing numeric"})
    run_log.close()
    (backend,) = recording_backend.opened  # a name listed twice opens once
    assert backend.logged == [(1, {"loss": 1.5, "samples": 32, "lr": 1e-3})]
    assert backend.closed
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, **record}, {"step": 2, "note": "nothing numeric"}]


def test_for_run_reads_the_logging_section(
    tmp_path: Path, shapes_manifest: Path, recording_backend: type[RecordingBackend]
) -> None:
    config = tiny_config(shapes_manifest, tmp_path / "run", train={"steps": 7})
    config.logging.backends = ["recording"]  # past the schema's choices: the test backend is in the table only
    config.logging.run_name, config.logging.project = "lit-demo", "shapes"
    (tmp_path / "run").mkdir()
    run_log = RunLogger.for_run(config, tmp_path / "run", start_step=3)
    run_log.close()
    (backend,) = recording_backend.opened
    assert backend.run == RunInfo(tmp_path / "run", 3, config_to_dict(config), "lit-demo", "shapes")
    assert run_log._bar.total == 7 and run_log._bar.n == 3


def test_run_name_defaults_to_the_output_folder(tmp_path: Path, recording_backend: type[RecordingBackend]) -> None:
    (tmp_path / "flickr-run").mkdir()
    RunLogger(tmp_path / "flickr-run", 5, backends=["recording"], progress=False).close()
    assert recording_backend.opened[0].run.name == "flickr-run"


@pytest.mark.parametrize("missing", ["wandb", "mlflow"])
def test_a_missing_package_fails_at_the_start_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, missing: str
) -> None:
    monkeypatch.setitem(sys.modules, missing, None)  # ``import missing`` now raises ImportError
    before = write_records(tmp_path / "metrics.jsonl", range(1, 6))
    with pytest.raises(ConfigError) as caught:
        RunLogger(tmp_path, 10, start_step=2, backends=["tensorboard", missing], progress=False)
    message = str(caught.value)
    assert message.startswith(f"logging.backends has {missing!r} but {missing} is not installed"), message
    assert f"pip install 'clipforge[{missing}]', or drop {missing!r} from logging.backends" in message
    assert (tmp_path / "metrics.jsonl").read_text() == before  # records after step 2 are not dropped yet
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no tensorboard/, no run id


def test_an_unknown_backend_names_the_allowed_ones(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"unknown logging backend 'neptune'; logging.backends allows \['tensorboard'"
    ):
        RunLogger(tmp_path, 10, backends=["neptune"], progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_train_with_a_missing_backend_is_one_line_and_exit_2(
    shapes_manifest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)
    config_path = tmp_path / "tiny.yaml"
    save_config(tiny_config(shapes_manifest, tmp_path / "cli"), config_path)
    assert main(["train", str(config_path), "train.steps=2", "logging.backends=[wandb]"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipforge train: error: logging.backends has 'wandb' but wandb is not installed"), err
    assert "pip install 'clipforge[wandb]'" in err and "Traceback" not in err
    written = {p.name for p in (tmp_path / "cli").iterdir()} if (tmp_path / "cli").exists() else set()
    assert not written & {"metrics.jsonl", "last.pt", "wandb", "wandb_run_id.txt"}, written


# ----------------------------------------------------------------------------------------------
# MLflow names and params
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "legal"),
    [
        ("loss", "loss"),
        ("val/image_retrieval_recall@5", "val/image_retrieval_recall_at_5"),
        ("eval:coco/acc1", "eval_coco/acc1"),
        ("a//b/", "a/b"),
        ("/../b/./c", "_/b/_/c"),
        ("temp (°C) #1", "temp __C_ _1"),
        ("", "_"),
    ],
)
def test_mlflow_metric_names_are_made_legal(name: str, legal: str) -> None:
    assert mlflow_metric_name(name) == legal
    assert mlflow_metric_name(legal) == legal  # legal names stay as they are


def test_mlflow_metric_names_fit_the_key_limit() -> None:
    assert len(mlflow_metric_name("x" * 300)) == 250
    assert mlflow_metric_name("a" * 249 + "/b") == "a" * 249  # no trailing '/' left by the cut


def test_mlflow_params_are_flattened_to_dotted_keys_and_cut_to_the_limit() -> None:
    config = {"train": {"batch_size": 8, "precision": "bf16"}, "logging": {"backends": ["mlflow"], "project": ""}}
    config |= {"data": {"path": None, "augment": {"scale_min": 0.9}, "classnames": {}}, "note": "x" * 7000}
    assert mlflow_params(config) == {
        "train.batch_size": "8",
        "train.precision": "bf16",
        "logging.backends": '["mlflow"]',
        "logging.project": "",
        "data.path": "null",
        "data.augment.scale_min": "0.9",
        "data.classnames": "{}",
        "note": "x" * 6000,
    }


# ----------------------------------------------------------------------------------------------
# MLflow, in a local store
# ----------------------------------------------------------------------------------------------
def test_mlflow_logs_params_and_metrics_and_a_resume_continues_the_run(tmp_path: Path, mlflow_local: Any) -> None:
    output_dir = tmp_path / "shapes-run"
    output_dir.mkdir()
    config = {"train": {"batch_size": 8, "steps": 10}, "model": {"embed_dim": 32}}
    run_log = RunLogger(output_dir, 10, backends=["mlflow"], progress=False, run_config=config)
    for step in (1, 2, 3):
        run_log.log(step, {"loss": 1.0 / step, "val/recall@5": 0.1 * step, "note": "not a number"})
    run_log.close()
    run_id = (output_dir / "mlflow_run_id.txt").read_text().strip()

    changed = {"train": {"batch_size": 16, "steps": 10}, "model": {"embed_dim": 32}, "eval": {"every": 5}}
    resumed = RunLogger(output_dir, 10, start_step=3, backends=["mlflow"], progress=False, run_config=changed)
    resumed.log(4, {"loss": 0.2})
    resumed.close()

    client = mlflow_local.tracking.MlflowClient(f"sqlite:///{output_dir / 'mlflow.db'}")
    assert (output_dir / "mlflow_run_id.txt").read_text().strip() == run_id
    run = client.get_run(run_id)
    assert run.info.run_name == "shapes-run" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "clipforge"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    losses = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    assert sorted(losses) == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3)), (4, 0.2)]
    recalls = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/recall_at_5"))
    assert recalls == [(1, pytest.approx(0.1)), (2, pytest.approx(0.2)), (3, pytest.approx(0.3))]
    assert set(run.data.metrics) == {"loss", "val/recall_at_5"}
    # a param cannot change in MLflow: the resumed run keeps the first batch size and adds the new key
    assert run.data.params == {"train.batch_size": "8", "train.steps": "10", "model.embed_dim": "32", "eval.every": "5"}

    # a run from step 0 in the same folder (train --overwrite) is a new MLflow run; the first one stays
    RunLogger(output_dir, 10, backends=["mlflow"], progress=False, run_config=config).close()
    new_id = (output_dir / "mlflow_run_id.txt").read_text().strip()
    assert new_id != run_id
    assert {r.info.run_id for r in client.search_runs([run.info.experiment_id])} == {run_id, new_id}


def test_mlflow_follows_the_tracking_uri_and_experiment_from_the_environment(
    tmp_path: Path, mlflow_local: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = tmp_path / "store"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for it before it uses a file store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "shapes-sweep")
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    run_log = RunLogger(output_dir, 5, backends=["mlflow"], progress=False, run_config={"seed": 0})
    run_log.log(1, {"loss": 2.0})
    run_log.close()
    client = mlflow_local.tracking.MlflowClient(store.as_uri())
    run = client.get_run((output_dir / "mlflow_run_id.txt").read_text().strip())
    assert client.get_experiment(run.info.experiment_id).name == "shapes-sweep"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 2.0)]
    assert not (output_dir / "mlflow.db").exists()


# ----------------------------------------------------------------------------------------------
# Weights & Biases, offline
# ----------------------------------------------------------------------------------------------
def test_wandb_offline_logs_metrics_and_a_resume_continues_the_run(tmp_path: Path, wandb_offline: Any) -> None:
    output_dir = tmp_path / "shapes-run"
    output_dir.mkdir()
    config = {"train": {"batch_size": 8, "steps": 10}}
    run_log = RunLogger(output_dir, 10, backends=["wandb"], progress=False, run_config=config)
    for step in (1, 2, 3):
        run_log.log(step, {"loss": 1.0 / step, "val/recall@5": 0.5, "note": "not a number"})
    run_log.close()
    run_id = (output_dir / "wandb_run_id.txt").read_text().strip()

    resumed = RunLogger(output_dir, 10, start_step=3, backends=["wandb"], progress=False, run_config=config)
    resumed.log(4, {"loss": 0.2})
    resumed.close()
    wandb_offline.teardown()  # run.finish() may return before W&B's service has written the last records

    assert (output_dir / "wandb_run_id.txt").read_text().strip() == run_id
    (first, first_history), (second, second_history) = wandb_run_logs(output_dir, run_id)
    assert first.run_id == second.run_id == run_id
    assert first.display_name == "shapes-run" and first.project == "clipforge"
    config_items = {item.key: json.loads(item.value_json) for item in first.config.update}
    assert config_items["train"] == config["train"]
    assert first_history == [
        {"_step": 1, "loss": 1.0, "val/recall@5": 0.5},
        {"_step": 2, "loss": 0.5, "val/recall@5": 0.5},
        {"_step": 3, "loss": pytest.approx(1 / 3), "val/recall@5": 0.5},
    ]
    assert second_history == [{"_step": 4, "loss": 0.2}]

    # a run from step 0 in the same folder (train --overwrite) is a new W&B run
    RunLogger(output_dir, 10, backends=["wandb"], progress=False, run_config=config).close()
    assert (output_dir / "wandb_run_id.txt").read_text().strip() != run_id


def test_wandb_that_cannot_start_is_a_config_error(
    tmp_path: Path, wandb_offline: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(**kwargs: Any) -> None:
        raise wandb_offline.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb_offline, "init", refuse)
    with pytest.raises(ConfigError, match=r"W&B could not start the run: api_key not configured .*WANDB_MODE=offline"):
        RunLogger(tmp_path, 10, backends=["wandb"], progress=False)
    assert not (tmp_path / "wandb_run_id.txt").exists()
