"""The container path end to end, on a real Docker engine (`.ci/run` starts one and builds the CPU image):

1. the image trains offline, as its non-root user, into an MLflow store on a bind-mounted host directory;
2. the compose stack: PostgreSQL and the MLflow server healthy, a trainer run on the server with its per-round metrics
   and checkpoints downloadable through it, two tuner replicas finishing one study in PostgreSQL, then `down -v`;
4. `fedtune evaluate models:/NAME@ALIAS` from inside a container, against the stack's registry.
(3, `fedtune launch`, is in test_launch.py.)
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import docker
import pytest
import yaml
from conftest import TINY
from docker_engine import IMAGE, connect, image_uid, own
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parents[1]
TUNE_TRIALS = 4


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    return connect()


def tiny_params() -> dict:
    """conftest's TINY study as a params.yaml, which `fedtune` reads from its working directory."""
    params: dict = {}
    for item in TINY:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        params.setdefault(section, {})[field] = yaml.safe_load(value)
    # One or two local epochs, so that a trial takes seconds.
    space = {"client.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
             "client.local_epochs": {"type": "int", "low": 1, "high": 2}}
    return params | {"tune": {"trials": TUNE_TRIALS, "space": space}}


def files_under(path: Path) -> list[Path]:
    return [path, *path.rglob("*")]


# 1. the image on its own --------------------------------------------------------------------------------------------
def test_image_trains_offline_as_non_root_into_a_bind_mounted_store(engine, tmp_path):
    uid = image_uid(engine)
    assert uid != 0
    workspace = tmp_path / "study"
    workspace.mkdir()
    own(workspace, uid)
    # At its own path, as `fedtune launch` mounts it, so the artifact paths the store records hold on the host too.
    container = engine.containers.run(
        IMAGE, ["train", *(arg for item in TINY for arg in ("--set", item))],
        volumes={str(workspace): {"bind": str(workspace), "mode": "rw"}}, working_dir=str(workspace),
        environment={"HF_HUB_OFFLINE": "1"}, network_mode="none", detach=True,
    )
    try:
        exit_code = container.wait()["StatusCode"]
        output = container.logs().decode(errors="replace")
    finally:
        container.remove(v=True)  # and its anonymous Hugging Face cache volume

    assert exit_code == 0, output

    store = MlflowClient(f"sqlite:///{workspace}/mlruns/mlflow.db")
    [run] = store.search_runs([store.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.status == "FINISHED", output
    assert [m.step for m in store.get_metric_history(run.info.run_id, "global/val_accuracy")] == [1, 2]
    assert {a.path for a in store.list_artifacts(run.info.run_id, "checkpoints")} >= {"checkpoints/round-002"}
    owners = {(p.stat().st_uid, p.stat().st_gid) for p in files_under(workspace)}
    assert owners == {(uid, uid)}, f"files in the workspace not owned by its user {uid}: {owners}"


# 2 and 4. the compose stack ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """One compose project on the host network (compose.ci.yaml), with its own ports, volumes and workspace."""

    def __init__(self, workspace: Path, resolved: Path):
        self.workspace = workspace
        self.project = f"fedtune-test-{secrets.token_hex(3)}"
        self.mlflow_port, self.postgres_port = free_port(), free_port()
        self.env = {
            key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "FEDTUNE_", "COMPOSE_"))
        } | {
            "FEDTUNE_IMAGE": IMAGE,
            "FEDTUNE_WORKSPACE": str(workspace),
            "POSTGRES_IMAGE": os.environ.get("POSTGRES_IMAGE", "postgres:16"),
            "CI_MLFLOW_PORT": str(self.mlflow_port),
            "CI_POSTGRES_PORT": str(self.postgres_port),
        }
        self.url = f"http://127.0.0.1:{self.mlflow_port}"
        self.files = [ROOT / "compose.yaml", ROOT / "compose.ci.yaml"]
        # Docker refuses published ports on the host network, and docker-compose 1.x cannot remove a key in an
        # override (Compose v2's `!reset`): run the stack as the two files resolve, less the ports.
        config = yaml.safe_load(self.compose("config").stdout)
        for service in config["services"].values():
            service.pop("ports", None)
        resolved.write_text(yaml.safe_dump(config))
        self.files = [resolved]

    def compose(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = ["docker-compose", "--project-name", self.project, "--project-directory", str(ROOT),
                   *(arg for path in self.files for arg in ("-f", str(path))), *args]
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result


@pytest.fixture(scope="module")
def stack(engine, tmp_path_factory):
    """The stack up with a trainer run and a two-worker study done; `down -v` afterwards, checked."""
    uid = image_uid(engine)
    workspace = tmp_path_factory.mktemp("stack")
    (workspace / "params.yaml").write_text(yaml.safe_dump(tiny_params()))
    own(workspace, uid)
    own(workspace / "params.yaml", uid)
    stack = Stack(workspace, tmp_path_factory.mktemp("compose") / "resolved.yaml")
    volumes_before = {volume.name for volume in engine.volumes.list()}
    try:
        stack.compose("up", "-d", "mlflow")  # waits for PostgreSQL to be healthy
        stack.trained = stack.compose("run", "--rm", "trainer")  # waits for MLflow to be healthy
        stack.compose("up", "-d", "--scale", "tuner=2", "tuner")
        tuners = engine.containers.list(all=True, filters={"label": [f"com.docker.compose.project={stack.project}",
                                                                     "com.docker.compose.service=tuner"]})
        stack.tuner_exits = [tuner.wait()["StatusCode"] for tuner in tuners]
        stack.tuner_logs = "\n".join(tuner.logs().decode(errors="replace") for tuner in tuners)
        yield stack
    finally:
        stack.down = stack.compose("down", "-v", "--remove-orphans", check=False)
        assert stack.down.returncode == 0, stack.down.stderr
        label = f"com.docker.compose.project={stack.project}"
        assert engine.containers.list(all=True, filters={"label": label}) == []
        # named and anonymous volumes (the images' VOLUMEs) alike
        assert {volume.name for volume in engine.volumes.list()} <= volumes_before


@pytest.fixture(scope="module")
def server(stack) -> MlflowClient:
    return MlflowClient(stack.url)


def runs(server: MlflowClient):
    return server.search_runs([server.get_experiment_by_name("fedtune").experiment_id], max_results=100)


def test_stack_trainer_logs_rounds_and_serves_checkpoints(stack, server, tmp_path):
    [trained] = [run for run in runs(server) if "mlflow.parentRunId" not in run.data.tags
                 and not run.data.tags.get("optuna.study")]
    assert trained.info.status == "FINISHED", stack.trained.stdout + stack.trained.stderr
    assert [m.step for m in server.get_metric_history(trained.info.run_id, "global/val_accuracy")] == [1, 2]
    # Artifacts go through the server (--serve-artifacts), not a path the client would have to share.
    assert trained.info.artifact_uri.startswith("mlflow-artifacts:")
    downloaded = Path(server.download_artifacts(trained.info.run_id, "checkpoints/round-002", str(tmp_path)))
    assert any(path.suffix == ".safetensors" for path in downloaded.rglob("*")), list(downloaded.rglob("*"))


def test_stack_two_tuners_finish_one_study_in_postgres(stack, server):
    import optuna

    assert stack.tuner_exits == [0, 0], stack.tuner_logs
    storage = f"postgresql+psycopg://fedtune:fedtune@127.0.0.1:{stack.postgres_port}/optuna"
    [summary] = optuna.get_all_study_summaries(storage)
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == TUNE_TRIALS
    assert sorted(t.number for t in study.trials) == list(range(len(study.trials)))  # distinct numbers

    children = [run for run in runs(server) if "mlflow.parentRunId" in run.data.tags]
    [parent] = {run.data.tags["mlflow.parentRunId"] for run in children}
    assert sorted(int(run.data.tags["optuna.trial"]) for run in children) == sorted(t.number for t in study.trials)
    assert server.get_run(parent).data.tags["mlflow.runName"]


def test_evaluate_a_registered_model_from_inside_a_container(stack, server, engine):
    [model] = server.search_registered_models()
    assert "candidate" in model.aliases
    ref = f"models:/{model.name}@candidate"
    # `fedtune launch` runs it in the image; the loopback server makes it use the host network.
    env = stack.env | {"MLFLOW_TRACKING_URI": stack.url}
    result = subprocess.run(
        [sys.executable, "-m", "training", "launch", "--gpus", "none", "--image", IMAGE, "--hf-cache", "",
         "--workspace", str(stack.workspace), "--", "evaluate", ref, "--out", "evaluation.json"],
        env=env, capture_output=True, text=True, check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    scores = json.loads((stack.workspace / "evaluation.json").read_text())
    assert 0.0 <= scores["accuracy"] <= 1.0, scores
    [evaluation] = server.search_runs([server.get_experiment_by_name("fedtune-evaluation").experiment_id])
    assert evaluation.info.status == "FINISHED"
