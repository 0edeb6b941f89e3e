"""What ``--resume`` refuses, and a killed run resumed with server state (a strategy's, exact LoRA's folded base).
Resuming killed FedAvg runs (SIGKILL at each phase of a round, bit-identical weights, every metric once) is drilled
in tests/test_faults.py."""

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests import test_faults as drill
from tests.conftest import TINY
from training import config, tracking
from training.config import ConfigError
from training.train import train


def test_resume_of_a_finished_run_is_refused(tiny, store):
    """Resuming a FINISHED run would evaluate it again, log a second model and move the alias to a new version."""
    result = train(tiny())
    client = MlflowClient(store)
    versions = client.search_model_versions(f"name='{result.registered_name}'")
    with pytest.raises(ConfigError, match=f"--resume {result.run_id}: the run is FINISHED"):
        train(tiny(), resume=result.run_id)
    assert client.search_model_versions(f"name='{result.registered_name}'") == versions
    assert str(client.get_model_version_by_alias(result.registered_name, "candidate").version) == result.model_version


@pytest.mark.parametrize("settings, server_state", [
    (["fl.strategy=fedadam", "fl.server_lr=1e-2"], {"optimizer", "rng"}),
    (["fl.strategy=fedprox", "client.prox_mu=0.1"], {"rng"}),
    (["peft.method=lora", "peft.aggregation=exact", "client.lr=5e-3"], {"base", "rng"}),
], ids=["fedadam", "fedprox", "lora-exact"])
def test_kill_9_mid_run_then_resume_is_exact_with_server_state(store, tmp_path, settings, server_state):
    """Round 2 recomputed after a SIGKILL continues from round 1's checkpoint: for FedAdam only if the checkpoint
    holds the server's moments, for FedProx only if the clients' anchor is the checkpoint's global model, for exact
    LoRA aggregation only if it holds the base weights the fold changed (the adapters alone are not the model)."""
    items = [*TINY, "tracking.log_model=false", *settings]
    client = MlflowClient(store)
    reference = train(config.load(None, items))
    assert all("server_update_norm" in r for r in reference.history.rounds)

    # stopped when round 1 is checkpointed and uploaded and round 2 is computed but not logged
    proc = drill.start(*drill.options(items), hook="computed:2")
    run_id = drill.announced(proc)
    drill.wait_until(lambda: drill.stopped(proc), proc, "round 2")
    drill.kill(proc)
    assert tracking.checkpoint_rounds(client, run_id) == [1]
    resumed = subprocess.run([sys.executable, "-m", "training", "train", "--resume", run_id], capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    def final(run: str, file: str) -> dict[str, torch.Tensor]:
        return load_file(client.download_artifacts(run, f"checkpoints/round-002/{file}", str(tmp_path / run)))

    for file in ("model.safetensors", "server.safetensors"):
        got, want = final(run_id, file), final(reference.run_id, file)
        # not the torch RNG: clients and model init draw from forked generators, so the global state saved is what
        # the process drew before the run (the reference ran inside pytest)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want if k != "rng.torch"), file
    assert {k.split(".", 1)[0] for k in want} == server_state
    expected = drill.metric_points(client, reference.run_id)
    drill.assert_once_and_as_uninterrupted(drill.metric_points(client, run_id), expected)
