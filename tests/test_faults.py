"""Fault drills with real processes: ``kill -9`` at each phase of a round, then ``--resume``; a real ``mlflow server``
stopped mid-round, for a minute or for longer than the trainer waits; a server that is not there at all.

Kills are synchronised by what the store shows, or by ``FEDTUNE_FAULT_HOOK=phase:round``, which makes the trainer
stop itself (SIGSTOP) at that point so the SIGKILL lands exactly there. Nothing waits on a guessed duration except
the outage, whose length is the fault itself.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import TINY
from training import checkpoint, config, tracking
from training.train import train
from training.workdir import WorkDir

# Enough data that a round takes a few seconds, so a kill right after round 1's checkpoint lands in round 2's training.
SLOW = [*TINY, "data.max_samples=900", "fl.num_clients=4", "fl.rounds=3", "tracking.log_model=false"]
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def options(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def start(*args: str, hook: str = "", **env: str) -> subprocess.Popen:
    environment = {**os.environ, **env, "FEDTUNE_FAULT_HOOK": hook}
    return subprocess.Popen([sys.executable, "-m", "training", "train", *args], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def announced(proc: subprocess.Popen) -> str:
    """The run id the trainer prints when its run starts."""
    for line in proc.stdout:
        if match := re.search(r"fedtune: run ([0-9a-f]{32})", line):
            return match.group(1)
    pytest.fail(f"the trainer ended before starting its run:\n{proc.stderr.read()[-3000:]}")


def wait_until(condition, proc: subprocess.Popen, what: str, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} never happened (trainer exit {proc.poll()}):\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)


def stopped(proc: subprocess.Popen) -> bool:
    """True once the trainer has stopped itself at its FEDTUNE_FAULT_HOOK point."""
    return Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def metric_points(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every point of every metric, as (step, value) sorted by step."""
    keys = client.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys}


def assert_once_and_as_uninterrupted(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key, points in got.items():
        steps = [s for s, _ in points]
        assert steps == [s for s, _ in expected[key]], key  # every step present, each exactly once
        if "seconds" not in key:  # timings differ between processes; everything else must not
            assert points == expected[key], key


def final_weights(client: MlflowClient, run_id: str, into: Path) -> dict[str, torch.Tensor]:
    return load_file(client.download_artifacts(run_id, "checkpoints/round-003/model.safetensors", str(into)))


def test_kill_9_at_each_phase_of_a_round_then_resume_is_exact(store, tmp_path):
    client = MlflowClient(store)
    reference = train(config.load(None, SLOW))
    expected = metric_points(client, reference.run_id)

    # 1. during client training: round 1's checkpoint is on the server, round 2 is training
    proc = start(*options(SLOW))
    run_id = announced(proc)
    wait_until(lambda: tracking.checkpoint_rounds(client, run_id) == [1], proc, "round 1's checkpoint upload")
    kill(proc)
    assert [s for s, _ in metric_points(client, run_id)["global/val_accuracy"]] == [1]  # the kill landed in round 2
    assert client.get_run(run_id).info.status == "RUNNING"
    # the next `fedtune train` (here the sweep it starts with) marks it FAILED and removes its work directory
    assert tracking.sweep(client) == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FAILED"
    assert f"process {proc.pid} on host {socket.gethostname()} ended" in run.data.tags["failure_reason"]
    assert f"fedtune train --resume {run_id}" in run.data.tags["failure_reason"]
    assert not WorkDir(store, run_id).path.exists()

    # 2. after round 2's metrics are logged, before its checkpoint is written
    proc = start("--resume", run_id, hook="logged:2")
    wait_until(lambda: stopped(proc), proc, "round 2's metrics")
    kill(proc)
    assert tracking.checkpoint_rounds(client, run_id) == [1]

    # 3. after round 2's checkpoint is written here, before it is uploaded: the work directory keeps it
    proc = start("--resume", run_id, hook="saved:2")
    wait_until(lambda: stopped(proc), proc, "round 2's checkpoint")
    kill(proc)
    assert tracking.sweep(client) == [run_id]
    work = WorkDir(store, run_id)
    assert tracking.checkpoint_rounds(client, run_id) == [1] and (work.checkpoints / "round-002").is_dir()

    # 4. after the last round's checkpoint is uploaded, before the test evaluation
    proc = start("--resume", run_id, hook="uploaded:3")
    wait_until(lambda: stopped(proc), proc, "round 3's checkpoint upload")
    kill(proc)

    # 5. resume to the end
    resumed = subprocess.run([sys.executable, "-m", "training", "train", "--resume", run_id], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not work.path.exists()

    got = final_weights(client, run_id, tmp_path / "resumed")
    want = final_weights(client, reference.run_id, tmp_path / "reference")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert_once_and_as_uninterrupted(metric_points(client, run_id), expected)
    kept = {checkpoint.round_of(f.path) for f in client.list_artifacts(run_id, "checkpoints")}
    assert kept == checkpoint.to_keep([1, 2, 3], reference.history.rounds, 2)


# the tracking server --------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real ``mlflow server`` (SQLite backend, served artifacts) that can be stopped and started on its port."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None
        root.mkdir(parents=True)

    def start(self) -> "Server":
        log = (self.root / "server.log").open("a")
        self.proc = subprocess.Popen(
            [MLFLOW, "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
             str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(self.root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def _healthy(self) -> bool:
        import urllib.request

        try:
            return urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # work directories of runs on a server
    running = Server(tmp_path / "server").start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", running.uri)
    yield running
    running.stop()


def outage_mid_round(server: Server, *settings: str) -> tuple[subprocess.Popen, str]:
    """Start a run; when round 2 is computed and nothing of it is sent, stop the server and let the trainer go on."""
    proc = start(*options([*TINY, "fl.rounds=3", "tracking.log_model=false", *settings]), hook="computed:2")
    run_id = announced(proc)
    wait_until(lambda: stopped(proc), proc, "round 2")
    server.stop()
    proc.send_signal(signal.SIGCONT)
    return proc, run_id


@pytest.mark.slow
def test_a_60_s_tracking_outage_mid_round_is_waited_out(server):
    proc, run_id = outage_mid_round(server)
    time.sleep(60)  # the outage itself
    server.start()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"the tracking server at {server.uri} does not answer" in err
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "FINISHED"
    points = metric_points(client, run_id)
    assert all([s for s, _ in p] == ([3] if k.startswith("global/test_") else [1, 2, 3]) for k, p in points.items())
    assert not WorkDir(server.uri, run_id).path.exists()


def test_an_outage_longer_than_the_retry_window_fails_cleanly_and_resume_sends_what_was_held(server):
    proc, run_id = outage_mid_round(server, "tracking.retry_seconds=3", "fl.keep_checkpoints=1")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in err and err.count("fedtune: error:") == 1
    assert server.uri in err and f"fedtune train --resume {run_id}" in err
    work = WorkDir(server.uri, run_id)
    assert (work.pending / "round-002.json").is_file()  # round 2's metrics, held back, not lost

    server.start()
    client = MlflowClient(server.uri)
    assert client.get_run(run_id).info.status == "RUNNING"  # nothing could tell the server until now
    resumed = subprocess.run([sys.executable, "-m", "training", "train", "--resume", run_id], capture_output=True,
                             text=True, timeout=300, env={**os.environ, "FEDTUNE_FAULT_HOOK": ""})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"run {run_id} marked FAILED: the tracking server at {server.uri} stopped answering" in resumed.stdout
    assert client.get_run(run_id).info.status == "FINISHED"
    points = metric_points(client, run_id)
    assert all([s for s, _ in p] == ([3] if k.startswith("global/test_") else [1, 2, 3]) for k, p in points.items())
    assert not work.path.exists()
    # retention deleted through the server's artifact proxy (mlflow-artifacts:/) too
    history = [{"round": s, "val_accuracy": v} for s, v in points["global/val_accuracy"]]
    kept = {checkpoint.round_of(f.path) for f in client.list_artifacts(run_id, "checkpoints")}
    assert kept == checkpoint.to_keep([1, 2, 3], history, 1) and len(kept) < 3


def test_an_unreachable_server_fails_in_seconds_with_one_paragraph(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run([sys.executable, "-m", "training", "train", *options(TINY)], capture_output=True, text=True,
                            timeout=90, cwd=tmp_path, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert result.returncode == 1
    assert f"cannot reach the MLflow tracking server at {uri} (connection refused)" in result.stderr
    assert "Traceback" not in result.stderr and "fedtune: run" not in result.stdout
