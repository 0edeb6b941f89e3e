"""The ``fedtune`` command line: one subcommand per job; heavy libraries load only when a command runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from training import __version__, launch, registry, tune
from training.config import ConfigError
from training.prepare import add_partition, add_prepare, run_partition, run_prepare

DEFAULT_PARAMS = "params.yaml"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="PATH", default=None,
                        help=f"YAML config file (default: {DEFAULT_PARAMS} when present, else built-in defaults)")
    parser.add_argument("--set-file", metavar="FILE", action="append", default=[],
                        help="YAML/JSON mapping of section.key: value overrides (e.g. tuned params from `fedtune "
                             "tune`), applied before --set (repeatable)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config value, e.g. --set fl.rounds=5 --set model.name=bert-base-cased "
                             "(repeatable)")


def load_config(args: argparse.Namespace):
    from training import config

    path = args.params or (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None)
    return config.load(path, [*config.read_override_files(args.set_file), *args.overrides])


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# train ---------------------------------------------------------------------------------------------------------------
def add_train(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument("--split", metavar="FILE", help="client split JSON from `fedtune partition` "
                        "(default: partition the training set by the partition.* config)")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted MLflow run from its last checkpoint "
                        "(its own config is used; --params/--set are not allowed)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="train each round's clients on N worker processes (torch.distributed; starts torchrun "
                             "for you); same as `torchrun --nproc-per-node N -m training train ...`")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="with --workers: machines taking part; run the same command on each (multi-node)")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="with --nodes > 1: the rendezvous address every node reaches (e.g. node0:29400)")
    parser.add_argument("--rdzv-id", default="fedtune", metavar="ID", help="with --nodes > 1: a job id shared by the nodes")
    parser.add_argument("--metrics-out", metavar="FILE", help="write final metrics and the run id as JSON (for DVC)")
    parser.add_argument("--rounds-out", metavar="FILE", help="write per-round metrics as CSV (for dvc plots)")


def run_train(args: argparse.Namespace) -> int:
    if args.resume and (args.overrides or args.params or args.set_file):
        raise ConfigError("--resume continues a run with the config it was started with; drop --params and --set")
    if args.workers > 1 or args.nodes > 1:
        return start_workers(args, args.argv)
    from training import config as config_module
    from training.distributed import Distributed, launched
    from training.train import train

    cfg = config_module.Config() if args.resume else load_config(args)
    executor = Distributed() if launched() else None
    split = None
    if args.split:
        from training.partition import load_split

        split = load_split(Path(args.split))
    tags = {"split.path": str(Path(args.split).resolve())} if args.split else {}
    if args.set_file:  # where overrides came from, e.g. a tuned file of the DVC tune stage
        tags["config.set_files"] = ", ".join(args.set_file)
    try:
        result = train(cfg, split=split, resume=args.resume, tags=tags or None, executor=executor)
    finally:
        if executor is not None:
            executor.close()
    if result is None:  # a torchrun worker other than the main one
        return 0
    write_json(args.metrics_out, result.summary())
    if args.rounds_out:
        import pandas as pd

        Path(args.rounds_out).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(result.history.rounds).to_csv(args.rounds_out, index=False)
    return 0


def start_workers(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this command under torchrun: ``--workers`` processes here, on each of ``--nodes`` machines."""
    import subprocess

    launcher = ("--nodes", "--workers", "--rdzv-endpoint", "--rdzv-id")
    cleaned = [a for i, a in enumerate(argv)
               if not (a in launcher or a.startswith(tuple(f"{o}=" for o in launcher)) or (i and argv[i - 1] in launcher))]
    if args.nodes > 1:
        if not args.rdzv_endpoint:
            raise ConfigError("--nodes > 1 needs --rdzv-endpoint HOST:PORT, an address every node can reach")
        where = [f"--nnodes={args.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                 f"--rdzv-id={args.rdzv_id}"]
    else:
        where = ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={args.workers}",
               "-m", "training", *cleaned]
    return subprocess.call(command)


COMMANDS = {
    "train": (add_train, run_train, "run a federated fine-tuning study, tracked in MLflow"),
    "prepare": (add_prepare, run_prepare, "clean and split one task of the params file into Parquet (DVC stage)"),
    "partition": (add_partition, run_partition, "split a prepared training set over K clients (DVC stage)"),
    "launch": (launch.add_arguments, launch.run, "run a fedtune command inside the fedtune image (Docker), on chosen GPUs"),
    "tune": (tune.add_arguments, tune.run, "tune client lr and local epochs (Optuna); rerun to resume or add workers"),
    "evaluate": (registry.add_evaluate, registry.run_evaluate, "evaluate a registered model (or a run's model) on a "
                 "split of its task, logged to MLflow"),
    "promote": (registry.add_promote, registry.run_promote, "move an alias (champion) to a model version when its "
                "evaluation beats the holder's"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning (FedAvg) of transformer text classifiers, tracked in MLflow.",
        epilog="Run `fedtune COMMAND --help` for a command's options. Config: params.yaml, overridable with --set.",
    )
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add, run, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".")
        add(command)
        command.set_defaults(run=run)
    return parser


def _terminate(signum, frame):
    # torchrun stops the surviving workers with SIGTERM when one fails: unwind so the run is marked FAILED.
    raise SystemExit(f"stopped by signal {signum} (another worker failed, or the job was cancelled)")


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args) or 0
    except (ConfigError, launch.LaunchError) as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        from training.client import NonFiniteLoss
        from training.distributed import WorkerFailure

        if not isinstance(err, (NonFiniteLoss, WorkerFailure)):
            raise
        hint = " Lower client.lr or enable client.max_grad_norm." if isinstance(err, NonFiniteLoss) else ""
        print(f"fedtune: error: training stopped: {err}. The MLflow run is marked FAILED with this reason and its "
              f"checkpoints are kept.{hint}", file=sys.stderr)
        return 1
