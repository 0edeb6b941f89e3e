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
FINAL = ("val_accuracy", "val_macro_f1", "test_accuracy", "test_macro_f1")  # a run's last logged values
TABLE = {"task": "task", "model": "model", "scheme": "scheme", "clients": "K", "rounds": "rounds",
         "lr": "client lr", "local_epochs": "local epochs",
         "val_accuracy": "val acc", "val_accuracy_best": "best val acc", "val_macro_f1": "val macro-F1",
         "test_accuracy": "test acc", "test_macro_f1": "test macro-F1", "run_id": "MLflow run"}


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
                 "scheme": run.data.params["partition.scheme"], "clients": int(run.data.params["fl.num_clients"])}
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


def _label(name: str, scheme: str, schemes: int) -> str:
    """A legend entry; the scheme is named only when the grid has several."""
    return name + (f" {scheme}" if schemes > 1 else "")


def plot_per_round(rounds: pd.DataFrame, metrics: dict, ylabel: str, path: Path) -> None:
    """One panel per task (row) x model (column), one colour per client count, one line style per metric."""
    tasks, models = sorted(rounds["task"].unique()), sorted(rounds["model"].unique())
    schemes = rounds["scheme"].nunique()
    ks = sorted(rounds["clients"].unique())
    colors = dict(zip(ks, colormaps["viridis"]([0.9 * i / max(1, len(ks) - 1) for i in range(len(ks))])))
    fig, axes = _panels(len(tasks), len(models))
    for (task, model, clients, scheme, metric), curve in rounds[rounds["metric"].isin(metrics)].groupby(
            ["task", "model", "clients", "scheme", "metric"]):
        ax = axes[tasks.index(task)][models.index(model)]
        label = _label(f"K={clients}", scheme, schemes) if metric == next(iter(metrics)) else None
        ax.plot(curve["round"], curve["value"], metrics[metric], marker="o", markersize=3, color=colors[clients],
                label=label)
    for i, task in enumerate(tasks):
        for j, model in enumerate(models):
            ax = axes[i][j]
            ax.set(title=f"{task} / {model}", xlabel="round", ylabel=ylabel)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    _save(fig, path)


def plot_final(runs: pd.DataFrame, path: Path) -> None:
    """Final test accuracy against the client count: one panel per task, one line per model (and scheme)."""
    tasks, ks = sorted(runs["task"].unique()), sorted(runs["clients"].unique())
    schemes = runs["scheme"].nunique()
    fig, axes = _panels(1, len(tasks))
    for (task, model, scheme), line in runs.sort_values("clients").groupby(["task", "model", "scheme"]):
        ax = axes[0][tasks.index(task)]
        ax.plot(line["clients"], line["test_accuracy"], marker="o", label=_label(model, scheme, schemes))
    for j, task in enumerate(tasks):
        ax = axes[0][j]
        ax.set(title=task, xlabel="clients K", ylabel="test accuracy after the last round", xscale="log")
        ax.set_xticks(ks, [str(k) for k in ks], minor=False)
        ax.set_xticks([], minor=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    _save(fig, path)


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown_table(runs: pd.DataFrame) -> str:
    """The runs as a Markdown table, one row per grid point."""
    rows = runs.sort_values(["task", "model", "scheme", "clients"])[list(TABLE)]
    lines = ["| " + " | ".join(TABLE.values()) + " |", "|" + "---|" * len(TABLE)]
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
