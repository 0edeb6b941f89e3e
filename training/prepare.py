"""The data stages of the DVC pipeline (dvc.yaml), behind ``fedtune prepare`` and ``fedtune partition``.

``prepare_task`` writes one task's cleaned train/validation/test splits; ``partition_task`` cuts a prepared training
set over K clients and writes the split with per-client statistics and a label-histogram plot. Every path is an
argument: the command line names them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training import config
from training.config import ConfigError

if TYPE_CHECKING:  # pandas and pyarrow load only when a stage runs
    from training.data import Task

ALPHA_SCHEMES = ("dirichlet", "quantity")  # the schemes partition.alpha shapes; the others ignore it


# prepare -------------------------------------------------------------------------------------------------------------
def task_config(params: dict, name: str) -> config.DataConfig:
    """The ``prepare.tasks.<name>`` section of a params file, validated as a ``data`` section."""
    tasks = (params.get("prepare") or {}).get("tasks") or {}
    if name not in tasks:
        raise ConfigError(f"prepare.tasks.{name}: no such task; define it in the params file or pick one of "
                          f"{sorted(tasks)}")
    try:
        return config.from_dict({"data": tasks[name]}).data
    except ConfigError as err:  # it names the key as data.<key>; say where that section lives
        raise ConfigError(f"prepare.tasks.{name} (keys as in the data section): {err}") from err


def prepare_task(params: dict, name: str, out: Path) -> Task:
    """Load, clean and split the task ``prepare.tasks.<name>`` of ``params`` into ``out``; returns the Task."""
    from training.data import load_task, write_prepared

    # the prepared task is named after its params key, which names its runs in MLflow and its files in the pipeline
    task = dataclasses.replace(load_task(task_config(params, name)), name=name)
    write_prepared(task, out)
    return task


# partition -----------------------------------------------------------------------------------------------------------
def split_stats(parts: list[np.ndarray], labels: np.ndarray, label_names: list[str]) -> dict:
    """Per client its size, label histogram and label TV distance to the whole set, and a summary over clients
    (``size_min``, ``size_max``, ``tv_mean``, ``tv_max``)."""
    from training.partition import client_stats

    overall = np.bincount(labels, minlength=len(label_names)) / len(labels)
    clients = {}
    for stats in client_stats(parts, labels, len(label_names)):
        counts = np.asarray(stats["label_counts"])
        tv = 0.5 * float(np.abs(counts / stats["size"] - overall).sum())  # total variation distance to the whole
        clients[str(stats["client"])] = {"size": stats["size"], "label_tv": round(tv, 6),
                                         "labels": dict(zip(label_names, counts.tolist()))}
    sizes = [c["size"] for c in clients.values()]
    tvs = [c["label_tv"] for c in clients.values()]
    # the summary is the DVC metric: few, short names, so `dvc metrics show` fits a terminal (K is in its path)
    summary = {"size_min": min(sizes), "size_max": max(sizes), "tv_mean": round(float(np.mean(tvs)), 6),
               "tv_max": max(tvs)}
    return {"summary": summary, "clients": clients}


def plot_split(stats: dict, label_names: list[str], title: str, path: Path) -> None:
    """Stacked bars: one per client, one colour per label."""
    from matplotlib.figure import Figure

    clients = list(stats["clients"].values())
    fig = Figure(figsize=(max(4.0, 0.5 * len(clients) + 2), 3.2), layout="constrained")
    ax = fig.subplots()
    bottom = np.zeros(len(clients))
    for name in label_names:
        counts = np.array([c["labels"][name] for c in clients])
        ax.bar(range(len(clients)), counts, bottom=bottom, label=name)
        bottom += counts
    ax.set(xlabel="client", ylabel="training texts", title=title, xticks=range(len(clients)))
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def partition_task(prepared: Path, clients: int, scheme: str, alpha: float, seed: int, out: Path, stats: Path,
                   client_stats: Path | None = None, plot: Path | None = None,
                   drop_remainder: bool = False) -> tuple[str, dict]:
    """Split the training set of the ``prepared`` task folder over ``clients``; write the split (``out``), its summary
    (``stats``) and optionally each client's statistics and a plot. Returns (the task's name, the summary)."""
    from training.data import read_prepared
    from training.partition import partition, save_split

    task = read_prepared(prepared)
    labels = task.train.labels
    try:
        parts = partition(labels, clients, scheme, alpha, seed, drop_remainder)
    except ConfigError as err:
        raise ConfigError(f"partition of {prepared} ({len(labels)} training texts) into --clients {clients} with "
                          f"--scheme {scheme}: {err}") from err
    # alpha and drop_remainder go into the file only where they shape the split, so splits made without them stay
    # byte-identical to those of earlier versions
    meta = {"task": task.name, "dataset_fingerprint": task.fingerprint, "scheme": scheme, "clients": clients,
            "seed": seed, **({"alpha": alpha} if scheme in ALPHA_SCHEMES else {}),
            **({"drop_remainder": True} if drop_remainder else {})}
    save_split(parts, out, meta)
    computed = split_stats(parts, labels, task.label_names)
    write_json(stats, computed["summary"])
    if client_stats:
        write_json(client_stats, computed["clients"])
    if plot:
        plot_split(computed, task.label_names, f"{task.name}: {scheme}, K={clients}", plot)
    return task.name, computed["summary"]


# the config keys a split file's meta records: a run on the split takes them from there
SPLIT_SETUP = {"clients": "fl.num_clients", "scheme": "partition.scheme", "seed": "partition.seed"}


def split_setup(meta: dict) -> dict[str, Any]:
    """``{"fl.num_clients": K, "partition.scheme": ..., "partition.seed": ..., "partition.drop_remainder": ...}`` as
    ``partition_task`` recorded them in a split file's meta (``partition.read_split``); empty for a split written
    some other way."""
    setup = {key: meta[name] for name, key in SPLIT_SETUP.items() if name in meta}
    if setup:  # partition_task writes drop_remainder only when set: a split without it covers every row
        setup["partition.drop_remainder"] = bool(meta.get("drop_remainder", False))
    return setup


def write_json(path: str | Path | None, data: dict, sort_keys: bool = False) -> None:
    """A stage's JSON output (DVC metrics, run records), its folder made; nothing when ``path`` is empty."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")
