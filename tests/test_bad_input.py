"""Bad input fails before any training starts, with an error that names the field; a NaN loss fails the run."""

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import TINY
from training import checkpoint
from training.cli import main


def fedtune_train(*overrides: str) -> list[str]:
    return ["train", *[a for o in [*TINY, *overrides] for a in ("--set", o)]]


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.name=no-such-org/no-such-model", "model.name='no-such-org/no-such-model' could not be loaded"),
        ("data.source=no-such-org/no-such-dataset", "data.source"),
        ("data.source=/nonexistent/data.csv", "data.source"),
        ("data.text_column=body", "data.text_column"),
        ("data.label_column=stars", "data.label_column"),
        ("fl.num_clients=500", "fl.num_clients"),
        ("client.lr=0", "client.lr: must be > 0"),
        ("client.lr=-0.1", "client.lr: must be > 0"),
        ("fl.rounds=0", "fl.rounds: must be >= 1"),
        ("fl.roundz=3", "unknown config key 'fl.roundz'"),
    ],
)
def test_bad_input_is_refused_before_training_with_the_field_named(override, expected, store, capsys):
    assert main(fedtune_train(override)) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert not list(MlflowClient(store).search_runs(experiment_ids=["0"]))


def test_a_client_left_without_data_is_refused(store, capsys):
    assert main(fedtune_train("partition.scheme=dirichlet", "partition.alpha=0.001", "fl.num_clients=60")) == 2
    err = capsys.readouterr().err
    assert "partition.alpha" in err and "fl.num_clients" in err, err


def test_the_offline_hub_fails_fast(store, capsys):
    import time

    start = time.perf_counter()
    assert main(fedtune_train("model.name=bert-base-cased")) == 2
    assert time.perf_counter() - start < 20
    assert "model.name='bert-base-cased'" in capsys.readouterr().err


class PoisonAfterRound1:
    """Fault injection: from round 2 on, every 3-way classifier output is NaN."""

    def __init__(self):
        self.handle = None

    def after_round(self, round_, metrics, clients):
        def nan_logits(module, args, output):
            if isinstance(module, torch.nn.Linear) and module.out_features == 3:
                return output * math.nan
            return output

        self.handle = torch.nn.modules.module.register_module_forward_hook(nan_logits)
        return False

    def after_checkpoint(self, round_, path):
        pass


def test_nan_loss_stops_the_run_marks_it_failed_and_keeps_checkpoints(tiny, store, tmp_path):
    from training.client import NonFiniteLoss
    from training.train import train

    poison = PoisonAfterRound1()
    try:
        with pytest.raises(NonFiniteLoss, match="loss is nan"):
            train(tiny("fl.rounds=3"), callbacks=(poison,))
    finally:
        if poison.handle is not None:
            poison.handle.remove()
    client = MlflowClient(store)
    (run,) = client.search_runs(experiment_ids=[client.get_experiment_by_name("fedtune").experiment_id])
    assert run.info.status == "FAILED"
    assert "NonFiniteLoss" in run.data.tags["failure_reason"] and "nan" in run.data.tags["failure_reason"]
    saved = client.download_artifacts(run.info.run_id, "checkpoints/round-001", str(tmp_path))
    assert checkpoint.load(saved).round == 1
    assert [f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/round-001"]
