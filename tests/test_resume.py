"""A run killed after round 2 of 4 (SIGKILL, a real process) resumes from its checkpoint to the same weights."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import TINY
from training import config
from training.config import ConfigError
from training.train import train

# Enough data that a round takes a few seconds, so the kill lands inside round 3.
SLOW = [*TINY, "data.max_samples=3000", "fl.num_clients=4", "fl.rounds=4", "tracking.log_model=false"]


def final_weights(client: MlflowClient, run_id: str, tmp_path) -> dict[str, torch.Tensor]:
    path = client.download_artifacts(run_id, "checkpoints/round-004/model.safetensors", str(tmp_path))
    return load_file(path)


def complete_checkpoints(client: MlflowClient, run_id: str) -> list[str]:
    names = [f.path for f in client.list_artifacts(run_id, "checkpoints")]
    return [n for n in names if any(f.path.endswith("state.json") for f in client.list_artifacts(run_id, n))]


def fedtune(*args: str) -> list[str]:
    return [sys.executable, "-m", "training", "train", *args]


def test_killed_run_resumes_to_the_same_final_weights(store, tmp_path):
    client = MlflowClient(store)
    reference = train(config.load(None, SLOW))
    expected = final_weights(client, reference.run_id, tmp_path / "reference")

    sets = [a for item in SLOW for a in ("--set", item)]
    proc = subprocess.Popen(fedtune(*sets), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        run_id = None
        while run_id is None:
            line = proc.stdout.readline()
            assert line, "the training process ended before starting its run"
            if match := re.search(r"fedtune: run ([0-9a-f]{32})", line):
                run_id = match.group(1)
        deadline = time.time() + 300
        while "checkpoints/round-002" not in complete_checkpoints(client, run_id):
            assert proc.poll() is None and time.time() < deadline, "the run never wrote its round-2 checkpoint"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "checkpoints/round-004" not in complete_checkpoints(client, run_id)
    assert client.get_run(run_id).info.status == "RUNNING"  # a killed process cannot mark its run

    resumed = subprocess.run(fedtune("--resume", run_id), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    got = final_weights(client, run_id, tmp_path / "resumed")
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run_id, "val_accuracy")})
    assert steps == [1, 2, 3, 4]


def test_resume_of_a_finished_run_is_refused(tiny, store):
    """Resuming a FINISHED run would evaluate it again, log a second model and move the alias to a new version."""
    result = train(tiny())
    client = MlflowClient(store)
    versions = client.search_model_versions(f"name='{result.registered_name}'")
    with pytest.raises(ConfigError, match=f"--resume {result.run_id}: the run is FINISHED"):
        train(tiny(), resume=result.run_id)
    assert client.search_model_versions(f"name='{result.registered_name}'") == versions
    assert str(client.get_model_version_by_alias(result.registered_name, "candidate").version) == result.model_version
