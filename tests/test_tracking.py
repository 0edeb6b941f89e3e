"""Everything a run logs can be read back from MLflow, and the registered model loads and predicts."""

import subprocess
import sys

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from training import tracking
from training.config import ConfigError
from training.train import train
from training.workdir import WorkDir


def test_run_is_readable_from_mlflow(tiny, store):
    cfg = tiny("fl.num_clients=3", "fl.rounds=2", "tracking.experiment=readback")
    result = train(cfg)
    client = MlflowClient(store)
    run = client.get_run(result.run_id)

    assert run.info.status == "FINISHED"
    assert run.data.params["fl.num_clients"] == "3"
    assert run.data.params["client.lr"] == "0.001"
    assert run.data.params["model.name"] == "tiny-bert"
    for tag in ("git.commit", "fedtune.version", "device", "dataset.fingerprint", "split.fingerprint"):
        assert run.data.tags[tag]

    for metric in ("val_accuracy", "val_macro_f1", "val_loss", "train_loss", "round_seconds",
                   "upload_bytes_per_client"):
        key = tracking.metric_key(metric)
        assert [m.step for m in client.get_metric_history(result.run_id, key)] == [1, 2], key
    for c in range(3):
        for metric in ("train_loss", "samples", "steps", "update_norm", "update_cosine"):
            history = client.get_metric_history(result.run_id, f"local/client_{c:03d}/{metric}")
            assert [m.step for m in history] == [1, 2], (c, metric)
    assert sum(client.get_metric_history(result.run_id, f"local/client_{c:03d}/samples")[0].value
               for c in range(3)) == 240
    assert run.data.metrics["global/test_accuracy"] == result.test["accuracy"]

    checkpoints = [f.path for f in client.list_artifacts(result.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/round-001", "checkpoints/round-002"]
    files = {f.path.rsplit("/", 1)[-1] for f in client.list_artifacts(result.run_id, "checkpoints/round-002")}
    assert files == {"model.safetensors", "server.safetensors", "state.json"}

    version = client.get_model_version_by_alias(result.registered_name, "candidate")
    assert str(version.version) == result.model_version and version.run_id == result.run_id
    model = mlflow.pyfunc.load_model(f"models:/{result.registered_name}@candidate")
    predictions = model.predict(pd.DataFrame({"text": ["I love this car", "worst idea ever"]}))
    assert len(predictions) == 2
    assert set(predictions["label"]) <= {"negative", "neutral", "positive"}


def test_metrics_are_logged_once_per_key_and_step_when_a_round_is_logged_again(store, tmp_path):
    """What a resumed round does: the same round's values logged by a new process must not add points."""
    client = MlflowClient(store)
    run_id = client.create_run(tracking.experiment_id(client, "once")).info.run_id
    work = WorkDir(store, run_id)
    tracking.Metrics(client, run_id, work).log("round-001", {"val_accuracy": 0.5, "client_000/samples": 80}, 1)
    tracking.Metrics(client, run_id, work).log("round-002", {"val_accuracy": 0.6}, 2)

    resumed = tracking.Metrics(client, run_id, work, tracking.logged_points(client, run_id))
    resumed.log("round-002", {"val_accuracy": 0.6, "train_loss": 1.0}, 2)  # rerun: one key new at this step
    resumed.log("round-003", {"val_accuracy": 0.7}, 3)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_accuracy")] == [(1, .5), (2, .6), (3, .7)]
    assert [m.step for m in client.get_metric_history(run_id, "train_loss")] == [2]
    assert [m.step for m in client.get_metric_history(run_id, "client_000/samples")] == [1]
    assert not list(work.pending.glob("*.json"))  # nothing held back once the server has it


def test_an_invalid_alias_is_refused_before_anything_runs(tiny, store):
    for alias in ("my alias", "latest", "v2", "x/y"):
        with pytest.raises(ConfigError, match="tracking.alias"):
            tiny(f"tracking.alias={alias}")
    sets = [a for item in TINY for a in ("--set", item)]
    result = subprocess.run([sys.executable, "-m", "training", "train", *sets, "--set", "tracking.alias=best model"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "tracking.alias" in result.stderr and "Traceback" not in result.stderr
    client = MlflowClient(store)
    assert not client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_reading_mlflow_does_not_load_torch_or_transformers():
    """The report and the tracking module only read and write MLflow: importing them must not pay for torch."""
    probe = ("import sys, analysis.report, training.tracking; "
             "print(sorted(m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_resuming_a_run_the_store_does_not_hold_is_refused_naming_the_store(tiny, store):
    missing = "0" * 32
    with pytest.raises(ConfigError, match=f"--resume {missing}: no such MLflow run at {store}"):
        train(tiny(), resume=missing)
