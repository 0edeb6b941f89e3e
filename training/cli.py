"""The ``fedtune`` command line: one subcommand per job; heavy libraries load only when a command runs."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from training import __version__, config, launch, prepare, registry
from training.config import ConfigError
from training.optuna_storage import StorageUnavailable

DEFAULT_PARAMS = "params.yaml"


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="PATH", default=None,
                        help=f"YAML config file (default: {DEFAULT_PARAMS} when present, else built-in defaults)")
    parser.add_argument("--set-file", metavar="FILE", action="append", default=[],
                        help="YAML/JSON mapping of section.key: value overrides (e.g. tuned params from `fedtune "
                             "tune`), applied over --params and before --set (repeatable)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config value, e.g. --set fl.rounds=5 --set model.name=bert-base-cased "
                             "(repeatable); the config is checked once all are applied, so --set can fix a bad "
                             "value of a file")


def load_config(args: argparse.Namespace) -> config.Config:
    path = args.params or (DEFAULT_PARAMS if Path(DEFAULT_PARAMS).is_file() else None)
    return config.load(path, args.overrides, args.set_file)


def load_inputs(args: argparse.Namespace, cfg=None):
    """The config (``cfg``, else read from the options) and the ``--split`` file, checked against the data and the
    model's config.json.

    Torch and transformers are not imported, so bad input fails in seconds and before any run or study starts.
    """
    cfg = cfg or load_config(args)
    from training.partition import read_split

    split, meta = read_split(Path(args.split)) if args.split else (None, {})
    if split is not None:  # K and the scheme as the split was made, given once: by `fedtune partition`
        cfg = config.follow(cfg, prepare.split_setup(meta), config.parse_overrides(args.overrides),
                            f"--split {args.split}")
    from training import preflight  # after the config and the split file: their mistakes are found before pandas loads

    preflight.check(cfg, split, f"--split {args.split}")
    return cfg, split


# train ---------------------------------------------------------------------------------------------------------------
TRAIN_EXAMPLES = """\
examples:
  fedtune train                                        # params.yaml: MiniLM-L6 on the shipped tweets, K=4, FedAvg
  fedtune train --set fl.num_clients=8 --set fl.rounds=5
  fedtune train --set peft.method=lora --set peft.r=8 --set client.lr=1e-3     # LoRA adapters (docs/lora.md)
  fedtune train --set peft.method=lora --set peft.aggregation=exact            # exact mean of the clients' updates
  fedtune train --set fl.strategy=fedadam --set fl.server_lr=1e-3              # docs/strategies.md
  fedtune train --workers 2                            # clients over 2 processes (docs/distributed.md)
  fedtune train --workers auto                         # as many processes as pay off, measured first
"""


def add_train(parser: argparse.ArgumentParser) -> None:
    parser.epilog = TRAIN_EXAMPLES
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    add_config_options(parser)
    parser.add_argument("--split", metavar="FILE", help="client split JSON from `fedtune partition`; it must give "
                        "every training row to exactly one client, and every client a row. fl.num_clients and "
                        "partition.scheme come from the file (default: partition the training set by the "
                        "partition.* config)")
    parser.add_argument("--resume", metavar="RUN_ID", help="continue an interrupted MLflow run from its last "
                        "checkpoint (its own config is used; --params/--set are not allowed)")
    parser.add_argument("--from-round", type=int, metavar="N", help="with --resume: continue from round N's kept "
                        "checkpoint instead of the newest (e.g. when the newest is damaged)")
    parser.add_argument("--workers", type=workers_option, default=1, metavar="N|auto",
                        help="train each round's clients on N worker processes (torch.distributed; starts torchrun "
                             "for you); same as `torchrun --nproc-per-node N -m training train ...`. auto: first "
                             "train a few steps with 1, 2, 4... processes at once and take the fewest within 5%% of "
                             "the fastest that fit in memory (~10-20 s per count; this machine only, so not with "
                             "--nodes or --resume)")
    parser.add_argument("--nodes", type=int, default=1, metavar="N",
                        help="with --workers: machines taking part; run the same command on each (multi-node)")
    parser.add_argument("--rdzv-endpoint", metavar="HOST:PORT",
                        help="with --nodes > 1: the rendezvous address every node reaches (e.g. node0:29400)")
    parser.add_argument("--rdzv-id", default="fedtune", metavar="ID",
                        help="with --nodes > 1: a job id shared by the nodes")
    parser.add_argument("--metrics-out", metavar="FILE", help="write final metrics and the run id as JSON (for DVC)")
    parser.add_argument("--headline-out", metavar="FILE", help="write the headline metrics (val_acc, test_acc, "
                        "test_f1) as JSON: the DVC metric of a train stage")
    parser.add_argument("--rounds-out", metavar="FILE", help="write per-round metrics as CSV (for dvc plots)")


def workers_option(value: str) -> int | str:
    """``--workers``: a count of processes, or auto (``training.worker_count`` measures and chooses)."""
    if value == "auto":
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not a number of processes: give a count such as 2, or auto to "
                                     f"measure and choose")


RUN_TAGS = "FEDTUNE_RUN_TAGS"  # JSON tags for the run, from the `fedtune train` that started these workers


def run_train(args: argparse.Namespace) -> int:
    if args.workers == "auto" and (args.resume or args.nodes > 1):
        raise ConfigError("--workers auto measures this machine for the config given here: with --resume or "
                          "--nodes > 1 give a count, e.g. --workers 2")
    if args.resume and (args.overrides or args.params or args.set_file):
        raise ConfigError("--resume continues a run with the config it was started with; drop --params and --set")
    if args.from_round is not None and not args.resume:
        raise ConfigError("--from-round N needs --resume RUN_ID: it picks the checkpoint to continue from")
    from training.reach import probe

    probe(os.environ.get("MLFLOW_TRACKING_URI", ""))  # an unreachable server fails in seconds, before data loads
    # a resumed run is checked with the config it was started with, once train() has read it
    cfg, split = (None, None) if args.resume else load_inputs(args)
    tags, environment = json.loads(os.environ.get(RUN_TAGS, "{}")), {}
    if args.workers == "auto":
        from training import worker_count

        decision = worker_count.decide(cfg, split)
        args.workers, tags, environment = decision.workers, decision.tags(), decision.environment()
    if args.workers > 1 or args.nodes > 1:
        return start_workers(args, {**environment, RUN_TAGS: json.dumps(tags)})
    from training.config import Config
    from training.distributed import Distributed, launched
    from training.train import train

    cfg = cfg or Config()
    executor = Distributed() if launched() else None
    if args.split:
        tags["split.path"] = str(Path(args.split).resolve())
    if args.set_file:  # where overrides came from, e.g. a tuned file of the DVC tune stage
        tags["config.set_files"] = ", ".join(args.set_file)
    try:
        result = train(cfg, split=split, resume=args.resume, tags=tags or None, executor=executor,
                       from_round=args.from_round)
    finally:
        if executor is not None:
            executor.close()
    if result is None:  # a torchrun worker other than the main one
        return 0
    prepare.write_json(args.metrics_out, result.summary(), sort_keys=True)
    if args.headline_out:
        from analysis.run_metrics import headline

        prepare.write_json(args.headline_out, headline(result.summary()))  # its columns in this order
    if args.rounds_out:
        import pandas as pd

        Path(args.rounds_out).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(result.history.rounds).to_csv(args.rounds_out, index=False)
    return 0


def start_workers(args: argparse.Namespace, environment: dict[str, str] | None = None) -> int:
    """Re-run this command under torchrun: ``--workers`` processes here, on each of ``--nodes`` machines, with
    ``environment`` added to theirs."""
    import subprocess

    if args.nodes > 1:
        if not args.rdzv_endpoint:
            raise ConfigError("--nodes > 1 needs --rdzv-endpoint HOST:PORT, an address every node can reach")
        where = [f"--nnodes={args.nodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={args.rdzv_endpoint}",
                 f"--rdzv-id={args.rdzv_id}"]
    else:
        where = ["--standalone"]
    command = [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={args.workers}",
               "-m", "training", "train", *worker_argv(args)]
    return subprocess.call(command, env={**os.environ, **(environment or {})})


LAUNCHER = ("workers", "nodes", "rdzv_endpoint", "rdzv_id")  # the train options torchrun's own replace


def worker_argv(args: argparse.Namespace) -> list[str]:
    """The options of a parsed ``train`` command as argv, less the launcher's: each worker's command.

    Built from the parsed values, not by filtering the typed argv, so an abbreviated launcher option (``--work 2``)
    cannot slip through and make every worker start workers of its own.
    """
    parser = argparse.ArgumentParser()
    add_command(parser, "train")
    argv = []
    for action in parser._actions:  # argparse has no public list of a parser's options
        value = getattr(args, action.dest, action.default)
        if action.dest in LAUNCHER or value == action.default:
            continue
        option = action.option_strings[-1]  # the long form; `train` takes no positional arguments
        if action.nargs == 0:  # a flag such as --debug
            argv.append(option)
        else:  # OPTION=VALUE keeps a value that starts with '-' a value; an appended option repeats
            argv += [f"{option}={item}" for item in (value if isinstance(value, list) else [value])]
    return argv


# tune ----------------------------------------------------------------------------------------------------------------
def add_tune(parser: argparse.ArgumentParser) -> None:
    add_config_options(parser)
    parser.add_argument("--split", metavar="FILE", help="client split JSON from `fedtune partition` for every trial; "
                        "fl.num_clients and partition.scheme come from the file (default: partition the training "
                        "set by the partition.* config)")
    parser.add_argument("--storage", metavar="URL", help="Optuna RDB URL shared by workers on many machines, e.g. "
                        "postgresql+psycopg://user@host:5432/optuna or sqlite:///optuna.db (default: tune.storage; "
                        "empty = the journal file mlruns/optuna/journal.log, for workers on this machine)")
    parser.add_argument("--study-name", metavar="NAME", help="study to launch or join (default: tune.study_name; "
                        "empty = TASK-MODEL-K<num_clients>-<hash of the setup>, so a changed setup gets a new study)")
    parser.add_argument("--trials", type=int, metavar="N", help="finished (complete or pruned) trials the study should "
                        "reach, counted over all its workers and earlier runs: rerunning after a crash runs only the "
                        "remainder, a higher N extends the study (default: tune.trials)")
    parser.add_argument("--best-out", metavar="FILE", help="write the best params as a flat YAML mapping "
                        "(client.lr: ...), for `fedtune train --set-file FILE`")
    parser.add_argument("--summary-out", metavar="FILE", help="write the study's standing as JSON (trials complete, "
                        "pruned and failed, rounds saved, best value and params, parent run): DVC metrics")
    parser.add_argument("--enabled", choices=("true", "false"), default="true",
                        help="false: run no study and write an empty --best-out, so `fedtune train --set-file FILE` "
                             "keeps its config; lets dvc.yaml switch tuning off (study.tune) without changing its "
                             "graph (default: true)")


def run_tune(args: argparse.Namespace) -> int:
    from training.tune import print_summary, tune, write_best

    flags = {"tune.storage": args.storage, "tune.study_name": args.study_name, "tune.trials": args.trials}
    cfg = load_config(args).override(**{k: v for k, v in flags.items() if v is not None})
    if args.enabled == "false":
        if not args.best_out:
            raise ConfigError("--enabled false runs no study and only writes --best-out FILE; name that file")
        write_best(Path(args.best_out), {}, "tuning is off (`fedtune tune --enabled false`, study.tune in "
                   "params.yaml): no overrides, so `fedtune train --set-file` keeps its config")
        prepare.write_json(args.summary_out, {"tuned": False}, sort_keys=True)
        print(f"tuning is off: wrote {args.best_out} with no overrides; no study was run")
        return 0
    cfg, split = load_inputs(args, cfg)
    result = tune(cfg, split)
    print_summary(result, cfg)
    t = result.tally
    prepare.write_json(args.summary_out, {
        "tuned": True, "study": result.study_name, "parent_run_id": result.parent_run_id,
        "trials_complete": t.complete, "trials_pruned": t.pruned, "trials_failed": t.failed,
        "rounds_saved": t.rounds_saved, "best_value": t.best_value, "best_trial": t.best_trial,
        "best_params": t.best_params, "worker_seconds": round(result.seconds, 1)}, sort_keys=True)
    if result.tally.best_value is None:
        print("fedtune: error: no trial completed, so there are no best params", file=sys.stderr)
        return 1
    if args.best_out:
        t = result.tally
        write_best(Path(args.best_out), t.best_params,
                   f"best params of Optuna study {result.study_name} (trial {t.best_trial}: validation accuracy "
                   f"{t.best_value:.4f}, {cfg.tune.objective} round, of {t.finished} finished trials); "
                   f"from `fedtune tune`, for `fedtune train --set-file`")
        print(f"best params written to {args.best_out}; use them with `fedtune train --set-file {args.best_out}`")
    return 0


# evaluate and promote ------------------------------------------------------------------------------------------------
def add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help=f"the model to evaluate: {registry.REF_FORMS}")
    parser.add_argument("--split", choices=registry.SPLITS, default="test",
                        help="which split of the task (default: test)")
    parser.add_argument("--data", metavar="SOURCE", help="evaluate on this data.source instead of the one the model "
                        "was trained on (a prepared task folder, a file, pkg://... or a hub id); by default the run's "
                        "data is looked for where it was, then at the same place in this git checkout, then here")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override a data.* setting of the run's config, e.g. --set data.max_samples=0 "
                             "(repeatable)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="texts per batch (default: the run's "
                        "runtime.eval_batch_size)")
    parser.add_argument("--out", metavar="FILE", help="write the scores and the per-class report as JSON")


def run_evaluate(args: argparse.Namespace) -> int:
    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: must be >= 1")
    # Syntax, keys, types and ranges of --set, checked on the defaults before MLflow and torch load; the run's own
    # config is checked again once it is fetched.
    config.Config().override(**config.parse_overrides(args.overrides))
    from training import tracking

    client = tracking.connect()
    target = registry.resolve(client, args.model)
    scores = registry.evaluate(client, target, args.split, args.data, args.overrides, args.batch_size)
    prepare.write_json(args.out, scores, sort_keys=True)
    return 0


def add_promote(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", metavar="NAME", help="registered model name, e.g. empythy-tiny-bert")
    parser.add_argument("--version", metavar="V", help="the version to promote (default: the one holding --from)")
    parser.add_argument("--from", dest="from_alias", metavar="ALIAS", default="candidate",
                        help="alias whose version is promoted when --version is not given (default: candidate)")
    parser.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    parser.add_argument("--split", choices=registry.SPLITS, default="test", help="split the versions are compared on "
                        "(default: test)")
    parser.add_argument("--metric", choices=registry.METRICS, default="accuracy",
                        help="score compared (default: accuracy)")


def run_promote(args: argparse.Namespace) -> int:
    from training import promote, tracking

    # a declined promotion is a decision, not an error: exit 0 either way
    promote.promote(tracking.connect(), args.name, args.version, args.alias, args.from_alias, args.split,
                    args.metric)
    return 0


# relocate ------------------------------------------------------------------------------------------------------------
def add_relocate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", nargs="?",
                        help="the copied store: its folder (holding mlflow.db), the mlflow.db file or a sqlite:/// "
                             "URI (default: the store fedtune uses, from MLFLOW_TRACKING_URI, else mlruns)")
    parser.add_argument("--from", dest="old", metavar="FOLDER",
                        help="the folder the store was copied from (default: the one its experiments name)")


def run_relocate(args: argparse.Namespace) -> int:
    from training import store, tracking

    where = args.store or tracking.tracking_uri()
    if where.startswith("sqlite:"):
        folder = store.directory(where)
    elif "://" in where:
        raise ConfigError(f"{where} is not an embedded store (a folder holding {store.DB}); a server keeps its "
                          f"own artifact locations. Pass the folder of the copied store")
    else:
        folder = Path(where).parent if Path(where).is_file() else Path(where)
    moved = store.relocate(folder, Path(args.old) if args.old else None)
    print(f"fedtune: {moved}" if moved else f"fedtune: nothing to relocate: the store in {folder.resolve()} records "
          f"its artifacts in its own folder, or only its {store.DB} was copied (then pass --from FOLDER)")
    print(f"browse: mlflow ui --backend-store-uri {store.uri(folder)}")
    return 0


# prepare and partition ------------------------------------------------------------------------------------------------
def add_prepare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", metavar="PATH", default=DEFAULT_PARAMS, help="params file (default: %(default)s)")
    parser.add_argument("--task", required=True, help="a task under prepare.tasks in the params file")
    parser.add_argument("--out", metavar="DIR", type=Path, required=True, help="folder for "
                        "train/validation/test.parquet and meta.json; `fedtune train --set data.source=DIR` reads it")


def run_prepare(args: argparse.Namespace) -> int:
    path = Path(args.params)
    if not path.is_file():
        raise ConfigError(f"--params {path}: file not found")
    params = config.parse_yaml(path.read_text(), f"--params {path}") or {}
    task = prepare.prepare_task(params, args.task, args.out)
    print(f"fedtune: {args.task}: {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} test "
          f"texts in {len(task.label_names)} classes -> {args.out}")
    return 0


def add_partition(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepared", metavar="DIR", type=Path, required=True,
                        help="a task folder from `fedtune prepare`")
    parser.add_argument("--clients", metavar="K", type=int, required=True, help="number of clients")
    parser.add_argument("--scheme", required=True, choices=config.SCHEMES,
                        help="iid (the paper's) | shards (label-sorted) | dirichlet (label skew) | "
                             "quantity (size skew)")
    parser.add_argument("--alpha", type=float, default=config.PartitionConfig.alpha,
                        help=f"Dirichlet concentration for {' and '.join(prepare.ALPHA_SCHEMES)}; small = skewed "
                             f"(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=config.PartitionConfig.seed, help="default: %(default)s")
    parser.add_argument("--drop-remainder", choices=("true", "false"), default="false",
                        help="true: equal shards of floor(n/K) rows for iid and shards, the n mod K rows left over "
                             "train on no client (the paper's protocol; partition.drop_remainder) "
                             "(default: %(default)s)")
    parser.add_argument("--out", metavar="FILE", type=Path, required=True,
                        help="client split JSON for `fedtune train --split`; it records K, the scheme, the seed and "
                             "drop_remainder")
    parser.add_argument("--stats", metavar="FILE", type=Path, required=True,
                        help="the split's summary JSON: client sizes and label skew (a DVC metric)")
    parser.add_argument("--client-stats", metavar="FILE", type=Path,
                        help="each client's size, label histogram and label skew")
    parser.add_argument("--plot", metavar="PNG", type=Path, help="per-client label histogram (stacked bars)")


def run_partition(args: argparse.Namespace) -> int:
    task, summary = prepare.partition_task(args.prepared, args.clients, args.scheme, args.alpha, args.seed, args.out,
                                           args.stats, args.client_stats, args.plot, args.drop_remainder == "true")
    print(f"fedtune: {task} -> {args.clients} clients ({args.scheme}): sizes {summary['size_min']}.."
          f"{summary['size_max']}, mean label TV distance {summary['tv_mean']:.3f} -> {args.out}")
    return 0


# launch ---------------------------------------------------------------------------------------------------------------
LAUNCH_EXAMPLES = """\
examples:
  fedtune launch -- train --set fl.rounds=5
  fedtune launch --gpus 0,1 --per-gpu -- tune --set fl.num_clients=8
  fedtune launch --gpus none --image fedtune:dev -- evaluate --help

The workspace is mounted at its own path and is the working directory, so relative paths in the command and the
absolute paths MLflow records (the embedded store mlruns/mlflow.db, its artifact locations) mean the same inside and
outside. MLFLOW_*, FEDTUNE_* and HF_* variables pass through; a tracking server on this machine's loopback is reached
through the host network. Build the image first: docker build -t fedtune:latest .
"""


def add_launch(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = LAUNCH_EXAMPLES
    parser.add_argument("--image", default=os.environ.get("FEDTUNE_IMAGE", "fedtune:latest"),
                        help="the fedtune image to run (default: $FEDTUNE_IMAGE, else fedtune:latest)")
    parser.add_argument("--gpus", default="all", metavar="all|none|IDS",
                        help="all, none, or comma-separated host GPU ids such as 0,2 (default: %(default)s)")
    parser.add_argument("--per-gpu", action="store_true",
                        help="start one container per GPU id in --gpus, each seeing only its own GPU")
    parser.add_argument("--workspace", type=Path, default=Path("."), metavar="DIR",
                        help="project directory to mount, at its own path, as the working directory "
                             "(default: the current directory)")
    parser.add_argument("--hf-cache", default=os.environ.get("HF_HOME", "~/.cache/huggingface"), metavar="DIR",
                        help="host Hugging Face cache to mount as the container's HF_HOME; '' for a throwaway one "
                             "(default: $HF_HOME, else ~/.cache/huggingface)")
    # Not `command`: that is where fedtune's own parser keeps the subcommand's name.
    parser.add_argument("fedtune_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="the fedtune command to run inside, e.g. -- tune --set fl.num_clients=8")


def run_launch(args: argparse.Namespace) -> int:
    command = args.fedtune_command[1:] if args.fedtune_command[:1] == ["--"] else args.fedtune_command
    hf_cache = Path(args.hf_cache).expanduser().resolve() if args.hf_cache else None
    return launch.run_command(command, image=args.image, gpus=args.gpus, per_gpu=args.per_gpu,
                              workspace=args.workspace, hf_cache=hf_cache)


# report ---------------------------------------------------------------------------------------------------------------
def add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", metavar="DIR", type=Path, required=True,
                        help="folder of `fedtune train --metrics-out` run records; their run ids pick the runs")
    parser.add_argument("--experiment", required=True, help="MLflow experiment for the summary run")
    parser.add_argument("--accuracy-rounds", metavar="PNG", type=Path, required=True,
                        help="validation accuracy per round, a line per client count, a panel per task x model")
    parser.add_argument("--accuracy-clients", metavar="PNG", type=Path, required=True,
                        help="final test accuracy against the client count, a line per model, a panel per task")
    parser.add_argument("--divergence", metavar="PNG", type=Path, required=True,
                        help="cosine of client updates to their mean per round (mean and min over clients)")
    parser.add_argument("--table", metavar="MD", type=Path, required=True, help="results table (Markdown)")


def run_report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    figures = (args.accuracy_rounds, args.accuracy_clients, args.divergence, args.table)
    ids, summary = write_report(args.runs, args.experiment, *figures)
    print(f"fedtune: report of {len(ids)} runs -> {', '.join(map(str, figures))}; MLflow summary run {summary}")
    return 0


COMMANDS = {
    "train": (add_train, run_train, "run a federated fine-tuning study, tracked in MLflow"),
    "prepare": (add_prepare, run_prepare, "clean and split one task of the params file into Parquet (DVC stage)"),
    "partition": (add_partition, run_partition, "split a prepared training set over K clients (DVC stage)"),
    "launch": (add_launch, run_launch, "run a fedtune command inside the fedtune image (Docker), on chosen GPUs"),
    "tune": (add_tune, run_tune, "tune client lr and local epochs (Optuna); rerun to resume or add workers"),
    "evaluate": (add_evaluate, run_evaluate, "evaluate a registered model (or a run's model) on a "
                 "split of its task, logged to MLflow"),
    "promote": (add_promote, run_promote, "move an alias (champion) to a model version when its "
                "evaluation beats the holder's"),
    "relocate": (add_relocate, run_relocate, "make a copied or moved MLflow store read and write its own artifacts "
                 "(run once before `mlflow ui` on the copy)"),
    "report": (add_report, run_report, "draw the paper's figures and a results table from the pipeline's tracked runs, "
               "also logged to an MLflow summary run (DVC stage)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedtune",
        description="Federated fine-tuning (FedAvg) of transformer text classifiers, tracked in MLflow.",
        epilog="Run `fedtune COMMAND --help` for a command's options. Config: params.yaml, overridable with --set.",
    )
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        add_command(sub.add_parser(name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."), name)
    return parser


def add_command(parser: argparse.ArgumentParser, name: str) -> None:
    """The options of the command ``name``, and what runs it."""
    add, run, _ = COMMANDS[name]
    add(parser)
    parser.add_argument("--debug", action="store_true", help="show the full traceback of a failure")
    parser.set_defaults(run=run)


def _terminate(signum, frame):
    # torchrun stops the surviving workers with SIGTERM when one fails: unwind so the run is marked FAILED.
    raise SystemExit(f"stopped by signal {signum} (another worker failed, or the job was cancelled)")


def _tracking_unavailable() -> type:
    # evaluated only when an exception reaches main(), so `fedtune --help` does not load requests
    from training.reach import TrackingUnavailable

    return TrackingUnavailable


def _traceback_note(args: argparse.Namespace) -> str:
    """The full traceback of the error being handled: on the terminal with --debug, else in a log file."""
    import tempfile
    import traceback

    if args.debug:
        return traceback.format_exc()
    log = Path(tempfile.gettempdir()) / "fedtune-last-error.log"
    log.write_text(traceback.format_exc())
    return f"(full traceback in {log}; or rerun with --debug)"


def main(argv: list[str] | None = None) -> int:
    import signal

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.run(args) or 0
    except (ConfigError, launch.LaunchError) as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return 2
    # an unreachable tracking server or study database: one paragraph naming it and what to do, not a traceback
    except (_tracking_unavailable(), StorageUnavailable) as err:
        print(f"fedtune: error: {err}\n{_traceback_note(args)}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from training.client import NonFiniteLoss
        from training.distributed import WorkerFailure

        if not isinstance(err, (NonFiniteLoss, WorkerFailure)):
            raise
        hint = " Lower client.lr or enable client.max_grad_norm." if isinstance(err, NonFiniteLoss) else ""
        print(f"fedtune: error: training stopped: {err}. The MLflow run is marked FAILED with this reason and its "
              f"checkpoints are kept.{hint}", file=sys.stderr)
        return 1
