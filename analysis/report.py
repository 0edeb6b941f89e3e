"""``fedtune report``: the paper's figures and a results table from the pipeline's tracked runs.

The runs are the ones the train stages wrote run records for (``--runs DIR``), read back from MLflow. The figures
and the table are also logged as artifacts of a summary run tagged ``fedtune.summary=true``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from training import tracking
from training.config import ConfigError
from training.models import slug

# per-round metrics and their line styles; the legend names the client counts once, from the first metric
ACCURACY = {"val_accuracy": "-"}
DIVERGENCE = {"update_cosine_mean": "-", "update_cosine_min": ":"}
# a run's last logged values; test_client_mean_accuracy only with fl.evaluation=clients (the paper's protocol)
FINAL = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1", "test_client_mean_accuracy")
TABLE = {"task": "task", "model": "model", "scheme": "scheme", "strategy": "strategy", "clients": "K",
         "rounds": "rounds", "lr": "client lr", "local_epochs": "local epochs",
         "val_accuracy": "val acc", "val_accuracy_best": "best val acc", "val_macro_f1": "val macro-F1",
         "test_accuracy": "test acc", "test_macro_f1": "test macro-F1",
         "test_client_mean_accuracy": "client-mean test acc", "run_id": "MLflow run"}
OPTIONAL = ("test_client_mean_accuracy",)  # columns the table shows only when a run has them
GRID = ["task", "model", "scheme", "strategy", "clients"]  # what tells the runs apart, in the table's order
VARIANTS = ("scheme", "strategy")  # grid axes a figure's legend names only when the runs differ in them
MARKERS = "osD^vP*X"  # one per strategy in the per-round figures


def run_ids(folder: Path) -> list[str]:
    """The MLflow run id in each ``fedtune train --metrics-out`` file under ``folder``."""
    files = sorted(Path(folder).rglob("*.json"))
    if not files:
        raise ConfigError(f"--runs {folder}: no run records from `fedtune train --metrics-out`; run the train "
                          "stages first (dvc repro)")
    return [json.loads(f.read_text())["run_id"] for f in files]


def load_runs(client, ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per run with its grid point and final metrics, one row per run, round and per-round metric)."""
    runs, rounds = [], []
    for run_id in ids:
        run = tracking.get_run(client, run_id, f"run {run_id} is not in the MLflow store at {tracking.tracking_uri()}; "
                               "set MLFLOW_TRACKING_URI to the store the train stages used, or rerun them")
        point = {"run_id": run_id, "task": run.data.tags["task"], "model": slug(run.data.tags["model"]),
                 "scheme": run.data.params["partition.scheme"],
                 "strategy": run.data.params.get("fl.strategy", "fedavg"),  # runs before strategies were FedAvg
                 "clients": int(run.data.params["fl.num_clients"])}
        for metric in (*ACCURACY, *DIVERGENCE):
            rounds += [{**point, "round": m.step, "metric": metric, "value": m.value}
                       for m in client.get_metric_history(run_id, tracking.metric_key(metric))]
        accuracy = [r["value"] for r in rounds if r["run_id"] == run_id and r["metric"] == "val_accuracy"]
        runs.append({**point, "rounds": len(accuracy), "val_accuracy_best": max(accuracy, default=math.nan),
                     "lr": f"{float(run.data.params['client.lr']):.3g}",  # tuned values differ by K (study.tune)
                     "local_epochs": int(run.data.params["client.local_epochs"]),
                     **{m: run.data.metrics.get(tracking.metric_key(m), math.nan) for m in FINAL}})
    return pd.DataFrame(runs), pd.DataFrame(rounds)


def _panels(rows: int, cols: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), layout="constrained")
    return fig, fig.subplots(rows, cols, squeeze=False)


def _varying(frame: pd.DataFrame) -> list[str]:
    """The grid axes among VARIANTS in which the runs differ: the legend names those."""
    return [axis for axis in VARIANTS if frame[axis].nunique() > 1]


def _label(name: str, point: dict, varying: list[str]) -> str:
    """A legend entry: ``name``, then the scheme and strategy of ``point`` where the grid has several."""
    return " ".join([name, *(str(point[axis]) for axis in varying)])


def plot_per_round(rounds: pd.DataFrame, metrics: dict, ylabel: str, path: Path) -> Figure:
    """One panel per task (row) x model (column), one colour per client count, one line style per metric, one
    marker per strategy."""
    tasks, models = sorted(rounds["task"].unique()), sorted(rounds["model"].unique())
    varying = _varying(rounds)
    ks = sorted(rounds["clients"].unique())
    colors = dict(zip(ks, colormaps["viridis"]([0.9 * i / max(1, len(ks) - 1) for i in range(len(ks))])))
    markers = dict(zip(sorted(rounds["strategy"].unique()), MARKERS))
    fig, axes = _panels(len(tasks), len(models))
    for (task, model, clients, scheme, strategy, metric), curve in rounds[rounds["metric"].isin(metrics)].groupby(
            ["task", "model", "clients", "scheme", "strategy", "metric"]):
        ax = axes[tasks.index(task)][models.index(model)]
        point = {"scheme": scheme, "strategy": strategy}
        label = _label(f"K={clients}", point, varying) if metric == next(iter(metrics)) else None
        ax.plot(curve["round"], curve["value"], metrics[metric], marker=markers[strategy], markersize=5,
                color=colors[clients], label=label)
    for i, task in enumerate(tasks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.set(title=f"{task} / {model}", xlabel="round", ylabel=ylabel)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    _save(fig, path)
    return fig


def plot_final(runs: pd.DataFrame, path: Path) -> Figure:
    """Final test accuracy against the client count: one panel per task, one line per model (scheme, strategy)."""
    tasks, ks = sorted(runs["task"].unique()), sorted(runs["clients"].unique())
    varying = _varying(runs)
    fig, axes = _panels(1, len(tasks))
    for (task, model, scheme, strategy), line in runs.sort_values("clients").groupby(
            ["task", "model", "scheme", "strategy"]):
        ax = axes[0][tasks.index(task)]
        label = _label(model, {"scheme": scheme, "strategy": strategy}, varying)
        ax.plot(line["clients"], line["test_accuracy"], marker="o", label=label)
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        ax.set(title=task, xlabel="clients K", ylabel="test accuracy after the last round", xscale="log")
        ax.set_xticks(ks, [str(k) for k in ks], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown_table(runs: pd.DataFrame) -> str:
    """The runs as a Markdown table, one row per grid point."""
    columns = {key: name for key, name in TABLE.items() if key not in OPTIONAL or runs[key].notna().any()}
    rows = runs.sort_values(GRID)[list(columns)]
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def log_summary(client, experiment: str, ids: list[str], table: str, paths: list[Path]) -> str:
    """A run holding the figures and the table (also shown as its description); returns its id."""
    tags = {"fedtune.summary": "true", "mlflow.note.content": table}
    run_id = client.create_run(tracking.experiment_id(client, experiment), run_name="report", tags=tags).info.run_id
    client.log_dict(run_id, {"runs": ids}, "runs.json")
    for path in paths:
        client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    return run_id


def write_report(runs: Path, experiment: str, accuracy_rounds: Path, accuracy_clients: Path, divergence: Path,
                 table: Path) -> tuple[list[str], str]:
    """Draw the figures and write the table of the runs recorded under ``runs``, and log them all to a summary run
    in ``experiment``; returns (the runs' ids, the summary run's id)."""
    client = tracking.connect()
    ids = run_ids(runs)
    found, rounds = load_runs(client, ids)
    plot_per_round(rounds, ACCURACY, "validation accuracy", accuracy_rounds)
    plot_final(found, accuracy_clients)
    plot_per_round(rounds, DIVERGENCE,
                   "cosine of client update to mean update\n(solid: mean, dotted: min over clients)", divergence)
    text = markdown_table(found)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(text)
    return ids, log_summary(client, experiment, ids, text, [accuracy_rounds, accuracy_clients, divergence, table])
