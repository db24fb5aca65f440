"""`training.report_to` end to end: `rlhf sft` on the built-in tiny model for 3 steps, through the
real CLI entry point in this process, with one tracker writing to its local store. The store is then
read back with the tracker's own reader and must hold exactly the metrics.jsonl rows (names, steps,
values) and the resolved config as hyper-parameters.

Nothing may reach a server: wandb runs offline, mlflow's usage telemetry is off, and every variable
a tracker reads is set with monkeypatch (these runs share the process with other tests).
"""

import json
import os
import struct
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_in_process

from rlhf_cli.config.sections import TrainingConfig
from rlhf_cli.training.metrics import read_metrics
from rlhf_cli.training.trackers import TRACKERS

LEARNING_RATE = 3e-3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A few short reviews as train.jsonl + test.jsonl (generating builtin:reviews costs seconds)."""
    root = tmp_path_factory.mktemp("tracker-data")
    words = "the film was great and the actors were good but the plot felt slow at times"
    for split, count in (("train", 24), ("test", 8)):
        rows = [{"text": f"{words} {i}"} for i in range(count)]
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def write_config(folder: Path, data_dir: Path, report_to: list[str]) -> tuple[Path, Path]:
    """An SFT config for 3 logged steps with an evaluation before and after: (config file, output folder)."""
    out = folder / "run"
    config = {
        "stage": "sft",
        "model": {"model_name_or_path": "builtin:tiny-gpt2"},
        "data": {"dataset_name": str(data_dir), "max_length": 24, "max_eval_samples": 8},
        "training": {
            "output_dir": str(out), "max_steps": 3, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
            "learning_rate": LEARNING_RATE, "logging_steps": 1, "save_steps": 100, "report_to": report_to,
        },
    }
    path = folder / "sft.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, out


def train(monkeypatch, capsys, config: Path) -> None:
    code, err = run_in_process(monkeypatch, capsys, "sft", str(config))
    assert code == 0, err[-3000:]


def jsonl_metrics(out: Path) -> dict[tuple[int, str], float]:
    """metrics.jsonl as {(step, name): value}: the training and evaluation rows of a step have other names."""
    logged = {}
    for row in read_metrics(out):
        for name, value in row.items():
            if name != "step":
                assert (row["step"], name) not in logged
                logged[(row["step"], name)] = value
    return logged


def assert_same_metrics(tracked: dict[tuple[int, str], float], out: Path, rel: float = 1e-12) -> None:
    expected = jsonl_metrics(out)
    assert {name for _, name in expected} >= {"loss", "learning_rate", "eval_loss"}
    assert sorted(tracked) == sorted(expected)
    for key, value in expected.items():
        assert tracked[key] == pytest.approx(value, rel=rel), key


# --- tensorboard -------------------------------------------------------------------------------


def test_tensorboard_event_files_in_the_output_folder_hold_the_metrics_and_the_config(
    data_dir, tmp_path, monkeypatch, capsys
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    config, out = write_config(tmp_path, data_dir, ["tensorboard"])
    train(monkeypatch, capsys, config)

    run_dir = out / "tensorboard" / out.name  # <output_dir>/tensorboard/<run_name>
    scalars = EventAccumulator(str(run_dir), size_guidance={"scalars": 0}).Reload()
    tracked = {(e.step, tag): e.value for tag in scalars.Tags()["scalars"] for e in scalars.Scalars(tag)}
    assert_same_metrics(tracked, out, rel=1e-6)  # event files hold float32

    # the hyper-parameters: a summary in a subfolder of their own (torch's add_hparams)
    [hparams_dir] = [p.parent for p in run_dir.glob("*/events.out.tfevents.*")]
    content = EventAccumulator(str(hparams_dir)).Reload().PluginTagToContent("hparams")
    hparams = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["training.learning_rate"].number_value == LEARNING_RATE
    assert hparams["model.model_name_or_path"].string_value == "builtin:tiny-gpt2"
    assert hparams["training.report_to"].string_value == '["tensorboard"]'  # a list, as JSON
    assert hparams["stage"].string_value == "sft"


# --- mlflow --------------------------------------------------------------------------------------


def mlflow_run(tracking_uri: str, experiment: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    history = {name: client.get_metric_history(run.info.run_id, name) for name in run.data.metrics}
    tracked = {(m.step, name): m.value for name, points in history.items() for m in points}
    return run, tracked


@pytest.fixture
def mlflow_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")  # mlflow would look up its telemetry server
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # restored after the test whatever the run sets
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    return monkeypatch


def test_mlflow_file_store_in_the_output_folder_holds_the_metrics_and_the_config(
    data_dir, tmp_path, mlflow_env, capsys
):
    config, out = write_config(tmp_path, data_dir, ["mlflow"])
    train(mlflow_env, capsys, config)

    # the run's process-wide mlflow settings are undone: a next stage of `rlhf run` gets its own store
    assert "MLFLOW_TRACKING_URI" not in os.environ and "MLFLOW_ALLOW_FILE_STORE" not in os.environ
    mlflow_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow 3 opens a file store only when asked
    run, tracked = mlflow_run((out / "mlruns").as_uri(), out.name)
    assert_same_metrics(tracked, out)
    assert run.data.params["training.learning_rate"] == str(LEARNING_RATE)
    assert run.data.params["model.model_name_or_path"] == "builtin:tiny-gpt2"
    assert run.info.status == "FINISHED"  # closed by finish_run


def test_mlflow_tracking_uri_from_the_environment_wins(data_dir, tmp_path, mlflow_env, capsys):
    store = (tmp_path / "elsewhere").as_uri()
    mlflow_env.setenv("MLFLOW_TRACKING_URI", store)
    mlflow_env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    config, out = write_config(tmp_path, data_dir, ["mlflow"])
    train(mlflow_env, capsys, config)

    assert not (out / "mlruns").exists()
    _, tracked = mlflow_run(store, out.name)
    assert_same_metrics(tracked, out)


def test_a_tracker_that_cannot_start_stops_the_run_with_its_own_message(data_dir, tmp_path, mlflow_env, capsys):
    mlflow_env.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")  # refused by mlflow at once, no network
    config, _ = write_config(tmp_path, data_dir, ["mlflow"])
    code, err = run_in_process(mlflow_env, capsys, "sft", str(config))
    assert code == 2
    assert "error: training.report_to: mlflow could not start (" in err and "nosuchscheme" in err
    assert "Traceback" not in err


def test_mlflow_gets_metric_names_it_accepts_and_the_other_trackers_the_same_names():
    from types import SimpleNamespace

    from mlflow.utils.validation import validate_param_and_metric_name

    from rlhf_cli.training.trackers import log_to_trackers

    logged = {}
    trackers = [SimpleNamespace(name=name, log=lambda values, step, name=name: logged.update({name: (values, step)}))
                for name in ("mlflow", "wandb")]
    row = {"objective/kl": 0.5, "reward/my.module:score": 1.0, "reward/rm@v2#1": 2.0}
    log_to_trackers(SimpleNamespace(trackers=trackers), row, 7)
    assert logged["wandb"] == (row, 7)
    names, step = logged["mlflow"]
    assert names == {"objective/kl": 0.5, "reward/my.module:score": 1.0, "reward/rm_v2_1": 2.0} and step == 7
    assert all(validate_param_and_metric_name(name) for name in names)


# --- wandb ---------------------------------------------------------------------------------------


def wandb_records(run_file: Path) -> list:
    """The records of a run's transaction log (`run-<id>.wandb`), decoded with wandb's own protobuf
    schema (wandb ships no reader of it; `wandb sync` would upload it). The file is a 7-byte W&B
    header, then LevelDB log records (4-byte checksum, 2-byte length, 1-byte type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, pos, records, pending = run_file.read_bytes(), 7, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # no capture of this process's stdout/stderr
    monkeypatch.delenv("WANDB_DIR", raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))  # not the home folder
    yield monkeypatch
    if sys.modules.get("wandb") is not None:
        sys.modules["wandb"].teardown()  # a run that failed before finish_run leaves wandb's service process


@pytest.mark.parametrize("wandb_dir_from_env", [False, True], ids=["default-dir", "WANDB_DIR"])
def test_wandb_offline_run_holds_the_metrics_and_the_config(data_dir, tmp_path, wandb_env, capsys, wandb_dir_from_env):
    if wandb_dir_from_env:
        wandb_env.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    config, out = write_config(tmp_path, data_dir, ["wandb"])
    train(wandb_env, capsys, config)

    root = tmp_path / "wandb-dir" if wandb_dir_from_env else out
    assert (out / "wandb").exists() != wandb_dir_from_env
    [run_file] = (root / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    kinds = [r.WhichOneof("record_type") for r in records]
    assert kinds[-1] == "exit"  # the run was finished, so the log is complete

    # wandb merges the rows of one step (training and evaluation) into one history row
    tracked = {}
    for record in (r for r in records if r.WhichOneof("record_type") == "history"):
        for item in record.history.item:
            name = item.key or ".".join(item.nested_key)  # wandb 0.31 fills nested_key: one part for a flat name
            if not name.startswith("_"):  # wandb's own _step, _runtime, _timestamp
                tracked[(record.history.step.num, name)] = json.loads(item.value_json)
    assert_same_metrics(tracked, out)

    hparams = {u.key or ".".join(u.nested_key): json.loads(u.value_json) for r in records if r.WhichOneof("record_type") == "config"
               for u in r.config.update}
    assert hparams["training.learning_rate"] == LEARNING_RATE
    assert hparams["model.model_name_or_path"] == "builtin:tiny-gpt2"


# --- trackio -------------------------------------------------------------------------------------


@pytest.fixture
def trackio_env(monkeypatch, tmp_path):
    """TRACKIO_DIR in tmp. trackio reads it once, when imported: the test imports trackio afresh and
    drops that import afterwards (the modules imported before, if any, are put back)."""
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        monkeypatch.delitem(sys.modules, name)
    yield monkeypatch
    for name in [m for m in sys.modules if m == "trackio" or m.startswith("trackio.")]:
        del sys.modules[name]


def test_trackio_local_database_holds_the_metrics_and_the_config(data_dir, tmp_path, trackio_env, capsys):
    config, out = write_config(tmp_path, data_dir, ["trackio"])
    train(trackio_env, capsys, config)

    import trackio
    from trackio.sqlite_storage import SQLiteStorage

    assert (tmp_path / "trackio" / f"{out.name}.db").is_file()  # project = run name
    [run] = list(trackio.Api().runs(out.name))
    tracked = {}
    for row in SQLiteStorage.get_logs(out.name, run.name, run_id=run.id):
        for name, value in row.items():
            if name not in ("step", "timestamp"):
                tracked[(row["step"], name)] = value
    assert_same_metrics(tracked, out)
    assert run.config["training.learning_rate"] == LEARNING_RATE
    assert run.config["model.model_name_or_path"] == "builtin:tiny-gpt2"


# --- choices and missing packages ----------------------------------------------------------------


def test_the_choices_of_report_to_are_the_supported_trackers():
    from dataclasses import fields

    [field] = [f for f in fields(TrainingConfig) if f.name == "report_to"]
    assert set(field.metadata["choices"]) == set(TRACKERS)


def hide(monkeypatch, tracker: str) -> None:
    """Make a tracker's packages unimportable, as if not installed (None in sys.modules stops an import)."""
    for module in TRACKERS[tracker].modules:
        monkeypatch.setitem(sys.modules, module, None)


@pytest.mark.parametrize("tracker", sorted(TRACKERS))
def test_a_tracker_that_is_not_installed_is_refused_at_config_check(data_dir, tmp_path, monkeypatch, capsys, tracker):
    hide(monkeypatch, tracker)
    config, out = write_config(tmp_path, data_dir, ["tensorboard", tracker] if tracker != "tensorboard" else [tracker])
    code, err = run_in_process(monkeypatch, capsys, "validate", str(config))
    assert code == 2
    package = TRACKERS[tracker].package
    assert f"training.report_to: {tracker} is not installed" in err
    assert f"pip install {package}" in err and "Traceback" not in err


def test_a_run_with_a_tracker_that_is_not_installed_stops_before_anything_is_written(
    data_dir, tmp_path, monkeypatch, capsys
):
    hide(monkeypatch, "wandb")
    config, out = write_config(tmp_path, data_dir, ["wandb"])
    code, err = run_in_process(monkeypatch, capsys, "sft", str(config))
    assert code == 2
    assert err.strip().splitlines()[0] == (
        "error: training.report_to: wandb is not installed. Install it with `pip install wandb` "
        "(every supported tracker: `pip install 'rlhf-cli[trackers]'`), or remove wandb from training.report_to."
    )
    assert not out.exists()


def test_an_unknown_tracker_names_the_supported_ones(data_dir, tmp_path, monkeypatch, capsys):
    config, _ = write_config(tmp_path, data_dir, ["neptune"])
    code, err = run_in_process(monkeypatch, capsys, "validate", str(config))
    assert code == 2
    assert "training.report_to: 'neptune' is not allowed; choose one of: tensorboard, wandb, mlflow, trackio." in err
