"""`fedtune launch`: the container specification (pure), the argument parsing, the missing-engine error, and real
runs of the fedtune image on a Docker engine (exit code, streamed logs, environment, mounts, removal on Ctrl-C)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import docker
import pytest
from conftest import TINY
from docker_engine import IMAGE, connect, image_uid, own

from training import cli, launch
from training.launch import LaunchError, container_specs

WORKSPACE = Path("/home/alice/study")
ALL_GPUS = docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])


def specs(command=("train",), *, gpus="all", per_gpu=False, env=None, hf_cache=Path("/home/alice/.cache/hf")):
    return container_specs(list(command), image="fedtune:test", gpus=gpus, per_gpu=per_gpu, workspace=WORKSPACE,
                           env=env or {}, hf_cache=hf_cache, name_prefix="ft")


def test_all_gpus_is_one_container_requesting_every_gpu():
    [spec] = specs(["tune", "--set", "fl.num_clients=8"])
    assert spec["image"] == "fedtune:test"
    assert spec["command"] == ["tune", "--set", "fl.num_clients=8"]
    assert spec["device_requests"] == [ALL_GPUS]
    assert spec["name"] == "ft-0"
    assert spec["detach"] is True
    assert spec["labels"] == {"fedtune.launch": "ft", "fedtune.command": "tune --set fl.num_clients=8",
                              "fedtune.gpus": "all"}


def test_a_gpu_list_is_requested_by_id():
    [spec] = specs(gpus="0, 2")
    assert spec["device_requests"] == [docker.types.DeviceRequest(device_ids=["0", "2"], capabilities=[["gpu"]])]


@pytest.mark.parametrize("gpus", ["none", "", "None"])
def test_no_gpus_requests_none_and_hides_any_default_runtime_gpus(gpus):
    [spec] = specs(gpus=gpus)
    assert spec["device_requests"] == []
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == ""


def test_per_gpu_is_one_container_per_gpu_each_with_its_own():
    first, second = specs(["tune"], gpus="1,3", per_gpu=True)
    assert [first["name"], second["name"]] == ["ft-0", "ft-1"]
    assert first["device_requests"][0]["DeviceIDs"] == ["1"]
    assert second["device_requests"][0]["DeviceIDs"] == ["3"]
    assert first["command"] == second["command"] == ["tune"]


@pytest.mark.parametrize("gpus", ["all", "none"])
def test_per_gpu_needs_gpu_ids(gpus):
    with pytest.raises(LaunchError, match="--per-gpu needs the GPU ids"):
        specs(gpus=gpus, per_gpu=True)


def test_bad_gpu_selection_is_refused():
    with pytest.raises(LaunchError, match="--gpus takes"):
        specs(gpus="cuda:0")


def test_workspace_is_mounted_at_its_own_path_and_is_the_working_dir():
    [spec] = specs()
    assert spec["volumes"][str(WORKSPACE)] == {"bind": str(WORKSPACE), "mode": "rw"}
    assert spec["working_dir"] == str(WORKSPACE)


def test_hf_cache_is_mounted_as_the_images_hf_home():
    [spec] = specs()
    assert spec["volumes"]["/home/alice/.cache/hf"] == {"bind": launch.HF_HOME, "mode": "rw"}
    [spec] = specs(hf_cache=None)
    assert list(spec["volumes"]) == [str(WORKSPACE)]


def test_relative_workspace_is_refused():
    with pytest.raises(LaunchError, match="absolute"):
        container_specs(["train"], image="i", gpus="all", per_gpu=False, workspace=Path("study"), env={},
                        hf_cache=None, name_prefix="ft")


def test_environment_passes_fedtune_mlflow_and_hf_variables_only():
    env = {
        "MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
        "MLFLOW_TRACKING_TOKEN": "t",
        "FEDTUNE_OPTUNA_STORAGE": "postgresql+psycopg://u:p@db/optuna",
        "HF_TOKEN": "hf_x",
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": "/home/alice/.cache/hf",  # a host path: the mounted cache stands in for it
        "CUDA_VISIBLE_DEVICES": "3",  # host numbering; the container's GPUs are numbered from 0
        "PATH": "/usr/bin",
        "AWS_SECRET_ACCESS_KEY": "s",
    }
    [spec] = specs(env=env)
    assert spec["environment"] == {
        "MLFLOW_TRACKING_URI": "http://mlflow.example:5000",
        "MLFLOW_TRACKING_TOKEN": "t",
        "FEDTUNE_OPTUNA_STORAGE": "postgresql+psycopg://u:p@db/optuna",
        "HF_TOKEN": "hf_x",
        "HF_HUB_OFFLINE": "1",
    }
    assert "network_mode" not in spec


@pytest.mark.parametrize(
    "uri",
    [
        f"sqlite:///{WORKSPACE}/mlruns/mlflow.db",
        "sqlite:///mlruns/mlflow.db",
        "mlruns",
        f"file://{WORKSPACE}/mlruns",
        "sqlite:///:memory:",
        "databricks",
    ],
)
def test_stores_inside_the_workspace_pass_unchanged(uri):
    # The workspace keeps its path inside, so these and the artifact paths MLflow recorded in them stay valid.
    [spec] = specs(env={"MLFLOW_TRACKING_URI": uri})
    assert spec["environment"]["MLFLOW_TRACKING_URI"] == uri


@pytest.mark.parametrize("uri", ["sqlite:////home/alice/other/mlflow.db", "sqlite:///../mlflow.db", "/tmp/mlruns",
                                 "file:///tmp/mlruns"])
def test_stores_outside_the_workspace_are_refused(uri):
    with pytest.raises(LaunchError, match="outside the workspace"):
        specs(env={"MLFLOW_TRACKING_URI": uri})


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "http://localhost:5000", "http://[::1]:5000"])
def test_a_server_on_the_hosts_loopback_is_reached_through_the_host_network(uri):
    [spec] = specs(env={"MLFLOW_TRACKING_URI": uri})
    assert spec["network_mode"] == "host"
    assert spec["environment"]["MLFLOW_TRACKING_URI"] == uri


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse as `fedtune` does: launch is a subcommand, whose name goes to `command`."""
    parser = argparse.ArgumentParser(prog="fedtune")
    cli.add_launch(parser.add_subparsers(dest="command").add_parser("launch"))
    return parser.parse_args(["launch", *argv])


def test_arguments_defaults_and_command_after_double_dash(monkeypatch):
    monkeypatch.delenv("FEDTUNE_IMAGE", raising=False)
    args = parse(["--gpus", "0,1", "--per-gpu", "--", "tune", "--set", "fl.num_clients=8"])
    assert (args.image, args.gpus, args.per_gpu, args.workspace) == ("fedtune:latest", "0,1", True, Path("."))
    assert args.command == "launch"
    assert args.fedtune_command == ["--", "tune", "--set", "fl.num_clients=8"]
    assert parse(["train", "--set", "fl.rounds=1"]).fedtune_command == ["train", "--set", "fl.rounds=1"]


def test_run_without_a_command_is_refused():
    with pytest.raises(LaunchError, match="name the fedtune command"):
        cli.run_launch(parse(["--gpus", "none", "--"]))


def test_no_engine_is_a_clear_error(tmp_path, monkeypatch):
    host = f"unix://{tmp_path / 'no-such-docker.sock'}"
    monkeypatch.setenv("DOCKER_HOST", host)
    with pytest.raises(LaunchError, match=f"no Docker engine reachable at DOCKER_HOST={host}: start Docker or run"):
        launch.launch(specs(gpus="none"))


class FakeContainer:
    """Stands in for docker's Container in the parts launch uses: name, logs, wait, remove."""

    def __init__(self, chunks=(), code=0, *, interrupt=False, start_error=None):
        self.name, self.removed = "", False
        self.chunks, self.code, self.interrupt, self.start_error = chunks, code, interrupt, start_error

    def logs(self, stream, follow):
        return iter(self.chunks)

    def wait(self):
        if self.interrupt:
            raise KeyboardInterrupt
        return {"StatusCode": self.code}

    def remove(self, force, v):
        self.removed = True


class FakeClient:
    """`containers.run(**spec)` creates the next prepared container (and, like the engine, keeps it when its start
    fails); `containers.get(name)` finds it."""

    def __init__(self, *containers):
        self.waiting, self.created = list(containers), {}
        self.containers = self

    def run(self, **spec):
        container = self.waiting.pop(0)
        container.name = spec["name"]
        self.created[container.name] = container
        if container.start_error:
            raise docker.errors.APIError(container.start_error)
        return container

    def get(self, name):
        if name not in self.created:
            raise docker.errors.NotFound(name)
        return self.created[name]


def test_launch_streams_whole_prefixed_lines_and_returns_the_worst_code(capsys):
    done = FakeContainer([b"round 1 ac", b"c=0.5\nround 2", b" acc=0.6\n"], 0)
    failed = FakeContainer([b"Traceback\n", b"oom"], 2)

    assert launch.launch(specs(gpus="0,1", per_gpu=True), FakeClient(done, failed)) == 2

    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("[ft-0] ")] == ["[ft-0] round 1 acc=0.5",
                                                                       "[ft-0] round 2 acc=0.6"]
    assert [line for line in lines if line.startswith("[ft-1] ")] == ["[ft-1] Traceback", "[ft-1] oom"]
    assert done.removed and failed.removed


def test_one_container_logs_without_prefix(capsys):
    assert launch.launch(specs(), FakeClient(FakeContainer([b"ok\n"], 0))) == 0
    assert capsys.readouterr().out == "ok\n"


def test_ctrl_c_still_removes_the_containers():
    container = FakeContainer(interrupt=True)
    with pytest.raises(KeyboardInterrupt):
        launch.launch(specs(), FakeClient(container))
    assert container.removed


def test_a_failed_start_removes_every_container_created_so_far():
    started = FakeContainer()
    no_gpu = FakeContainer(start_error='could not select device driver "" with capabilities: [[gpu]]')
    with pytest.raises(LaunchError, match="could not start ft-1: .* use --gpus none"):
        launch.launch(specs(gpus="0,1", per_gpu=True), FakeClient(started, no_gpu))
    assert started.removed and no_gpu.removed


@pytest.fixture(scope="module")
def engine() -> docker.DockerClient:
    return connect()


@pytest.fixture
def workspace(engine, tmp_path) -> Path:
    """A workspace owned by the image's user, as the host user's own project directory is."""
    own(tmp_path, image_uid(engine))
    return tmp_path


@pytest.mark.container
def test_launch_runs_streams_waits_and_removes(engine, workspace, capfd):
    prefix = f"fedtune-test-{workspace.name}"
    script = ('echo "$FEDTUNE_PROBE from $(pwd)" > out.txt; cat out.txt; '
              'echo "secret=${AWS_SECRET_ACCESS_KEY:-unset}"; exit 3')
    [spec] = container_specs(["-c", script], image=IMAGE, gpus="none", per_gpu=False, workspace=workspace,
                             env={"FEDTUNE_PROBE": "probe", "AWS_SECRET_ACCESS_KEY": "s"}, hf_cache=None,
                             name_prefix=prefix)

    # The image's entrypoint is fedtune; a shell shows what the container sees.
    assert launch.launch([spec | {"entrypoint": ["sh"]}], engine) == 3

    assert (workspace / "out.txt").read_text() == f"probe from {workspace}\n"
    assert capfd.readouterr().out.splitlines() == [f"probe from {workspace}", "secret=unset"]
    assert engine.containers.list(all=True, filters={"label": f"fedtune.launch={prefix}"}) == []


@pytest.mark.container
def test_launch_runs_the_fedtune_image(engine, workspace, capfd):
    fedtune = container_specs(["--help"], image=IMAGE, gpus="none", per_gpu=False, workspace=workspace,
                              env={}, hf_cache=None, name_prefix=f"fedtune-test-{workspace.name}")
    assert launch.launch(fedtune, engine) == 0
    assert "usage: fedtune" in capfd.readouterr().out


@pytest.mark.container
def test_ctrl_c_stops_and_removes_a_launched_run(engine, workspace):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_", "FEDTUNE_"))}
    # Enough rounds to be running still when interrupted; the first checkpoint says training is under way.
    command = ["train", *(arg for item in [*TINY, "fl.rounds=500"] for arg in ("--set", item))]
    launched = subprocess.Popen(
        [sys.executable, "-m", "training", "launch", "--gpus", "none", "--image", IMAGE, "--hf-cache", "",
         "--workspace", str(workspace), "--", *command],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        checkpoints = workspace / "mlruns" / "artifacts"
        # The log streams through launch: wait for the first round's line rather than polling the disk.
        seen = []
        for line in launched.stdout:
            seen.append(line)
            if line.startswith("round 1:"):
                break
        assert launched.poll() is None, "".join(seen)
        assert engine.containers.list(filters={"label": "fedtune.launch"}), "no running launched container"

        launched.send_signal(signal.SIGINT)
        assert launched.wait(timeout=60) == 130, "".join(seen) + launched.stdout.read()
    finally:
        launched.kill()
    assert engine.containers.list(all=True, filters={"label": "fedtune.launch"}) == []
    assert checkpoints.exists()  # the run wrote into the mounted workspace before it was stopped
