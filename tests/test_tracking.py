"""Everything a run logs can be read back from MLflow, and the registered model loads and predicts."""

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from training.train import train


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

    for metric in ("val_accuracy", "val_macro_f1", "val_loss", "train_loss", "round_seconds", "upload_bytes_per_client"):
        assert [m.step for m in client.get_metric_history(result.run_id, metric)] == [1, 2], metric
    for c in range(3):
        for metric in ("train_loss", "samples", "steps", "update_norm", "update_cosine"):
            history = client.get_metric_history(result.run_id, f"client_{c:03d}/{metric}")
            assert [m.step for m in history] == [1, 2], (c, metric)
    assert sum(client.get_metric_history(result.run_id, f"client_{c:03d}/samples")[0].value for c in range(3)) == 240
    assert run.data.metrics["test_accuracy"] == result.test["accuracy"]

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
