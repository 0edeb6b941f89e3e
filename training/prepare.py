"""``fedtune prepare`` and ``fedtune partition``: the data stages of the DVC pipeline (dvc.yaml).

prepare writes one task's cleaned train/validation/test splits; partition cuts a prepared training set over K clients
and writes the split with per-client statistics and a label-histogram plot. Every path comes from the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from training import config
from training.config import ConfigError

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


def add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="PATH", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--task", required=True, help="a task under prepare.tasks in the params file")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder for train/validation/test.parquet and "
                        "meta.json; `fedtune train --set data.source=DIR` reads it")


def run_prepare(args: argparse.Namespace) -> int:
    from training.data import load_task, write_prepared

    path = Path(args.params)
    if not path.is_file():
        raise ConfigError(f"--params {path}: file not found")
    # the prepared task is named after its params key, which names its runs in MLflow and its files in the pipeline
    params = config.parse_yaml(path.read_text(), f"--params {path}") or {}
    task = dataclasses.replace(load_task(task_config(params, args.task)), name=args.task)
    write_prepared(task, Path(args.out))
    print(f"fedtune: {args.task}: {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} test "
          f"texts in {len(task.label_names)} classes -> {args.out}")
    return 0


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


def add_partition(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", metavar="DIR", required=True, help="a task folder from `fedtune prepare`")
    parser.add_argument("--clients", metavar="K", type=int, required=True, help="number of clients")
    parser.add_argument("--scheme", required=True, choices=config.SCHEMES,
                        help="iid (the paper's) | shards (label-sorted) | dirichlet (label skew) | quantity (size skew)")
    parser.add_argument("--alpha", type=float, default=config.PartitionConfig.alpha,
                        help=f"Dirichlet concentration for {' and '.join(ALPHA_SCHEMES)}; small = skewed "
                             f"(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=config.PartitionConfig.seed, help="default: %(default)s")
    parser.add_argument("--out", metavar="FILE", required=True, help="client split JSON for `fedtune train --split`")
    parser.add_argument("--stats", metavar="FILE", required=True,
                        help="the split's summary JSON: client sizes and label skew (a DVC metric)")
    parser.add_argument("--client-stats", metavar="FILE", help="each client's size, label histogram and label skew")
    parser.add_argument("--plot", metavar="PNG", help="per-client label histogram (stacked bars)")


def run_partition(args: argparse.Namespace) -> int:
    from training.data import read_prepared
    from training.partition import partition, save_split

    task = read_prepared(Path(args.prepared))
    labels = task.train.labels
    try:
        parts = partition(labels, args.clients, args.scheme, args.alpha, args.seed)
    except ConfigError as err:
        raise ConfigError(f"partition of {args.prepared} ({len(labels)} training texts) into --clients "
                          f"{args.clients} with --scheme {args.scheme}: {err}") from err
    # alpha goes into the file only where it shapes the split, so changing it leaves IID splits byte-identical
    meta = {"task": task.name, "dataset_fingerprint": task.fingerprint, "scheme": args.scheme,
            "clients": args.clients, "seed": args.seed, **({"alpha": args.alpha} if args.scheme in ALPHA_SCHEMES else {})}
    save_split(parts, Path(args.out), meta)
    stats = split_stats(parts, labels, task.label_names)
    _write_json(Path(args.stats), stats["summary"])
    if args.client_stats:
        _write_json(Path(args.client_stats), stats["clients"])
    if args.plot:
        plot_split(stats, task.label_names, f"{task.name}: {args.scheme}, K={args.clients}", Path(args.plot))
    summary = stats["summary"]
    print(f"fedtune: {task.name} -> {args.clients} clients ({args.scheme}): sizes {summary['size_min']}.."
          f"{summary['size_max']}, mean label TV distance {summary['tv_mean']:.3f} -> {args.out}")
    return 0


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
