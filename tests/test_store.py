"""The embedded MLflow store copied or moved: every location it records follows it, and MLflow's own clients (the UI
server, ``pyfunc.load_model``) and ``fedtune evaluate`` read it with the original gone."""

import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from training import optuna_storage, registry, store, tracking
from training.cli import main
from training.config import ConfigError
from training.data import load_task, write_prepared
from training.train import train

MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def recorded_locations(db: Path) -> list[str]:
    """Every artifact location the store records, in the columns store.LOCATIONS names."""
    with sqlite3.connect(db) as connection:
        return [value for table, column, where in store.LOCATIONS
                for (value,) in connection.execute(f"SELECT {column} FROM {table} WHERE {where}") if value]


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """A store in tmp_path/a, named by MLFLOW_TRACKING_URI, used from another working directory."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri(tmp_path / "a"))
    return tmp_path / "a", cwd


def fill(client) -> dict:
    """A run with an artifact, a logged model, two registered versions (by model and by path), a foreign experiment."""
    experiment = tracking.experiment_id(client, "fedtune")
    run_id = client.create_run(experiment).info.run_id
    client.log_text(run_id, "hello", "note.txt")
    model = client.create_logged_model(experiment, name="model", source_run_id=run_id)
    client.create_registered_model("m")
    client.create_model_version("m", source=model.model_uri, run_id=run_id, model_id=model.model_id)
    client.create_model_version("m", source=client.get_run(run_id).info.artifact_uri, run_id=run_id)
    return {"run_id": run_id}


def test_a_store_named_elsewhere_keeps_new_experiments_and_the_journal_beside_it(elsewhere):
    folder, cwd = elsewhere
    client = tracking.connect()
    fill(client)
    for name in ("Default", "fedtune"):
        location = client.get_experiment_by_name(name).artifact_location
        assert location.startswith((folder / "artifacts").as_uri()), (name, location)
    assert optuna_storage.journal_path() == folder / "optuna" / "journal.log"
    assert list(cwd.iterdir()) == [], "nothing of the store lands in the working directory"


def test_a_copied_store_is_relocated_once_on_connect_and_foreign_locations_stay(elsewhere, tmp_path, monkeypatch,
                                                                                capsys):
    original, _ = elsewhere
    client = tracking.connect()
    run_id = fill(client)["run_id"]
    foreign = (tmp_path / "shared" / "artifacts").as_uri()
    client.create_experiment("foreign", artifact_location=foreign)
    shutil.copytree(original, tmp_path / "b")
    shutil.rmtree(original)

    copy = (tmp_path / "b").resolve()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri(copy))
    capsys.readouterr()
    client = tracking.connect()
    said = capsys.readouterr().err
    assert f"the MLflow store in {copy} was copied or moved from {original.resolve()}: 7 recorded" in said, said
    locations = recorded_locations(copy / "mlflow.db")
    moved = [loc for loc in locations if loc != foreign and not loc.startswith("models:/")]
    assert len(moved) == 7 and all(loc.startswith(copy.as_uri() + "/") for loc in moved), locations
    assert foreign in locations
    assert Path(client.download_artifacts(run_id, "note.txt", str(tmp_path))).read_text() == "hello"
    assert len(client.search_model_versions("name='m'")) == 2

    tracking.connect()
    assert "copied or moved" not in capsys.readouterr().err, "a relocated store is in place: nothing more to do"


def test_a_copy_of_the_database_alone_keeps_reading_the_original_artifacts(elsewhere, tmp_path, monkeypatch):
    original, _ = elsewhere
    run_id = fill(tracking.connect())["run_id"]
    (tmp_path / "c").mkdir()
    shutil.copy(original / "mlflow.db", tmp_path / "c")
    before = recorded_locations(tmp_path / "c" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri(tmp_path / "c"))
    client = tracking.connect()
    assert recorded_locations(tmp_path / "c" / "mlflow.db") == before
    # once those are gone too, evaluate says where it looked and what to copy, not "not trained by fedtune"
    shutil.rmtree(original / "artifacts")
    with pytest.raises(ConfigError, match=rf"run {run_id}'s artifacts are not at {original.resolve()}/artifacts/"
                                          rf"{run_id}/artifacts, where the tracking store records them; copy the "
                                          rf"store's whole folder"):
        registry.trained_config(client, run_id)
    # asked to, it moves them all the same
    assert store.relocate(tmp_path / "c", original).rows == 7


def test_relocate_refuses_what_it_cannot_relocate_with_what_to_pass(elsewhere, tmp_path, capsys):
    original, _ = elsewhere
    client = tracking.connect()
    tracking.experiment_id(client, "fedtune")
    client.create_experiment("two", artifact_location=(tmp_path / "other" / "artifacts").as_uri())
    shutil.copytree(original, tmp_path / "d")
    cases = [
        ([str(tmp_path / "nothing")], f"no MLflow store in {tmp_path / 'nothing'}: it holds no mlflow.db"),
        (["http://127.0.0.1:5000"], "http://127.0.0.1:5000 is not an embedded store"),
        ([str(tmp_path / "d")], f"names artifact folders in several places ({original.resolve()}, "
                                f"{tmp_path / 'other'}); run `fedtune relocate {tmp_path / 'd'} --from OLD`"),
    ]
    for argv, message in cases:
        assert main(["relocate", *argv]) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert main(["relocate", str(tmp_path / "d"), "--from", str(original)]) == 0
    assert "2 recorded artifact locations now point into" in capsys.readouterr().out  # Default and fedtune's


# ---- the drill: a store with a registered model, copied, the original removed, read by MLflow's own clients ----


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, raw: bool = False):
    with urllib.request.urlopen(url, timeout=30) as answer:
        body = answer.read()
    return body if raw else json.loads(body)


def wait_for(url: str, server: subprocess.Popen, log: Path) -> None:
    """Poll the health endpoint (a server starts in ~7 s); a server that exits fails the test with its log."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow ui exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            get(url, raw=True)
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"mlflow ui did not answer within 90 s:\n{log.read_text()[-3000:]}")


def test_a_copied_store_with_the_original_removed_is_browsed_loaded_and_evaluated(tiny, tmp_path, monkeypatch):
    # a git checkout holding the prepared data, trained in with the default store mlruns/ and a relative data path
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    task = load_task(tiny().data)
    write_prepared(task, repo / "data" / "prepared" / task.name)
    trained = train(tiny(f"data.source=data/prepared/{task.name}", "fl.rounds=1"), out=io.StringIO())
    config_json = (repo / "mlruns" / "artifacts" / trained.run_id / "artifacts" / "config.json").read_text()

    copy, other = tmp_path / "copy" / "store", tmp_path / "other"
    shutil.copytree(repo / "mlruns", copy)
    shutil.rmtree(repo / "mlruns")
    other.mkdir()
    # plain MLflow clients know nothing of fedtune: the copy is relocated first, as docs/evaluate.md says
    assert main(["relocate", str(copy)]) == 0

    env = {**os.environ, "MLFLOW_TRACKING_URI": store.uri(copy), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    model = f"models:/{trained.registered_name}@candidate"
    port = free_port()
    log = tmp_path / "ui.log"
    with log.open("w") as sink:
        server = subprocess.Popen([MLFLOW, "ui", "--backend-store-uri", store.uri(copy), "--host", "127.0.0.1",
                                   "--port", str(port), "--workers", "1"], cwd=other, env=env, stdout=sink,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    load = subprocess.Popen([sys.executable, "-c", "import json, sys, mlflow\n"
                             f"model = mlflow.pyfunc.load_model({model!r})\n"
                             "print(json.dumps(model.predict(['what a lovely day', 'worst service ever'])"
                             "['label'].tolist()))"], cwd=other, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        # (c) while those start: evaluate from another directory scores exactly what training scored, and logs
        # beside the copy (in this process, whose torch is loaded already)
        monkeypatch.chdir(other)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri(copy))
        assert main(["evaluate", model, "--out", "eval.json"]) == 0
        summary = json.loads((other / "eval.json").read_text())
        assert summary["accuracy"] == pytest.approx(trained.test["accuracy"])
        assert summary["same_data_as_training"] is True
        assert sorted(p.name for p in other.iterdir()) == ["eval.json"]
        assert (copy / "artifacts" / summary["evaluation_run_id"] / "artifacts" / "confusion_matrix.png").is_file()

        # (a) the UI's server: the run, its metrics, its artifacts listed and one downloaded
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/health", server, log)
        run = get(f"{base}/api/2.0/mlflow/runs/get?run_id={trained.run_id}")["run"]
        assert run["info"]["status"] == "FINISHED"
        assert run["info"]["artifact_uri"].startswith(copy.as_uri())
        history = get(f"{base}/api/2.0/mlflow/metrics/get-history?run_id={trained.run_id}"
                      "&metric_key=global/val_accuracy")
        assert [m["value"] for m in history["metrics"]] == [r["val_accuracy"] for r in trained.history.rounds]
        listed = get(f"{base}/api/2.0/mlflow/artifacts/list?run_id={trained.run_id}&path=checkpoints/round-001")
        assert {Path(f["path"]).name for f in listed["files"]} >= {"model.safetensors", "state.json"}
        assert get(f"{base}/get-artifact?path=config.json&run_uuid={trained.run_id}", raw=True).decode() == config_json
        version = get(f"{base}/api/2.0/mlflow/registered-models/alias?name={trained.registered_name}&alias=candidate")
        assert version["model_version"]["run_id"] == trained.run_id

        # (b) pyfunc in a fresh process predicts the task's labels
        out, err = load.communicate(timeout=120)
        assert load.returncode == 0, err[-3000:]
        assert set(json.loads(out.splitlines()[-1])) <= set(task.label_names)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        load.kill()
        load.wait()
