"""``fedtune train``: one tracked federated run, from config to registered model.

Used as is by the command line, the DVC train stage and each Optuna trial (which adds its pruning callback).
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import checkpoint, rounds, tracking
from training.config import Config, ConfigError, from_dict
from training.evaluate import evaluate
from training.models import slug
from training.study import Study, build


@dataclass
class TrainResult:
    run_id: str
    history: rounds.History
    test: dict[str, float]
    registered_name: str
    model_version: str | None
    majority_rate: float  # validation accuracy of always predicting the most common class

    def summary(self) -> dict:
        return {
            "run_id": self.run_id,
            "rounds": len(self.history.rounds),
            "val_accuracy": self.history.last("val_accuracy"),
            "val_accuracy_best": self.history.best("val_accuracy"),
            "val_macro_f1": self.history.last("val_macro_f1"),
            "val_majority_rate": self.majority_rate,
            "test_accuracy": self.test.get("accuracy", float("nan")),
            "test_macro_f1": self.test.get("macro_f1", float("nan")),
            "registered_model": self.registered_name,
            "model_version": self.model_version,
        }


def names(config: Config, study: Study) -> tuple[str, str]:
    """(run name, registered model name), derived from task, model and K unless the config sets them."""
    base = f"{study.task.name}-{slug(config.model.name)}"
    run_name = config.tracking.run_name or f"{base}-K{config.fl.num_clients}"
    return run_name, config.tracking.registered_name or base


def train(
    config: Config,
    split: list[np.ndarray] | None = None,
    resume: str | None = None,
    callbacks: tuple = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    executor=None,
    out=None,
) -> TrainResult:
    """Run (or, with ``resume=RUN_ID``, continue) a federated study and track it in MLflow.

    Under torchrun every worker calls this; only the main one tracks, and the others return None.
    """
    out = out or sys.stdout
    executor = executor or rounds.InProcess()
    # Workers other than the main one touch MLflow only to fetch a checkpoint (the store exists by then).
    client = tracking.connect() if executor.is_main or resume else None
    start = None
    with tempfile.TemporaryDirectory(prefix="fedtune-") as tmp:
        if resume:
            start, config = _resume_point(client, resume, Path(tmp) / "resume")
            split = split if split is not None else _recorded_split(client, resume)
        study = build(config, split, device=executor.device)
        if not executor.is_main:
            rounds.run(study, (), None, start, executor)
            return None
        run_name, registered = names(config, study)
        run_id = resume or tracking.start_run(client, study, run_name, tracking.run_tags(study, tags), parent_run_id)
        if resume:
            _check_same_split(client, run_id, study)
            client.update_run(run_id, status="RUNNING")
        print(f"fedtune: run {run_id} ({run_name}) on {study.where.device}; "
              f"{len(study.task.train.texts)} training texts over {config.fl.num_clients} clients", file=out)
        tracker = tracking.MlflowCallback(client, run_id)
        try:
            history, _ = rounds.run(study, (tracker, _Printer(out), *callbacks), Path(tmp) / "checkpoints", start,
                                    executor)
            test = evaluate(study.model, study.encoded["test"], study.collate, config.runtime.eval_batch_size,
                            study.where)
            last = history.rounds[-1]["round"]
            tracking.log_metrics(client, run_id, {f"test_{k}": v for k, v in test.items()}, last)
            version = tracking.log_model(client, run_id, study, registered) if config.tracking.log_model else None
        except BaseException as err:  # NaN loss, Ctrl-C, any failure: mark the run FAILED, keep checkpoints
            tracking.finish(client, run_id, ok=False, reason=f"{type(err).__name__}: {err}")
            raise
        tracking.finish(client, run_id, ok=True)
    labels = study.task.validation.labels
    result = TrainResult(run_id, history, test, registered, version, float(np.bincount(labels).max() / len(labels)))
    _print_summary(result, config, out)
    return result


def _resume_point(client, run_id: str, into: Path) -> tuple[checkpoint.Checkpoint, Config]:
    try:
        client.get_run(run_id)
    except Exception as err:
        raise ConfigError(f"--resume {run_id}: no such MLflow run at {tracking.tracking_uri()}") from err
    path = tracking.latest_checkpoint(client, run_id, into)
    if path is None:
        raise ConfigError(f"--resume {run_id}: the run has no checkpoint yet; start a new run instead")
    ckpt = checkpoint.load(path)
    return ckpt, from_dict(ckpt.config)


def _recorded_split(client, run_id: str) -> list[np.ndarray] | None:
    """The split file a run was started with (``--split``), if any."""
    path = client.get_run(run_id).data.tags.get("split.path")
    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--resume {run_id}: the run was started with --split {path}, which no longer exists; "
                          f"pass --split with the same file")
    from training.partition import load_split

    return load_split(Path(path))


def _check_same_split(client, run_id: str, study: Study) -> None:
    recorded = client.get_run(run_id).data.tags.get("split.fingerprint")
    if recorded and recorded != study.split_fingerprint:
        raise ConfigError(f"--resume {run_id}: the client split differs from the run's ({recorded}); "
                          f"pass the same --split file the run was started with")


class _Printer(rounds.Callback):
    """One line per round on the terminal."""

    def __init__(self, out):
        self.out = out

    def after_round(self, round_, metrics, clients) -> bool:
        val = f"val acc {metrics['val_accuracy']:.4f} f1 {metrics['val_macro_f1']:.4f} " if "val_accuracy" in metrics else ""
        print(f"round {round_}: {val}train loss {metrics['train_loss']:.4f} "
              f"cosine(min) {metrics['update_cosine_min']:.3f} {metrics['round_seconds']:.1f}s", file=self.out, flush=True)
        return False


def _print_summary(result: TrainResult, config: Config, out) -> None:
    s = result.summary()
    print(f"\ndone: {s['rounds']} rounds, K={config.fl.num_clients}: validation accuracy {s['val_accuracy']:.4f} "
          f"(best {s['val_accuracy_best']:.4f}; majority class {s['val_majority_rate']:.4f}), "
          f"test accuracy {s['test_accuracy']:.4f}, test macro-F1 {s['test_macro_f1']:.4f}", file=out)
    print(f"MLflow run {result.run_id} in experiment '{config.tracking.experiment}' at {tracking.tracking_uri()}", file=out)
    if result.model_version:
        print(f"registered model: models:/{result.registered_name}@{config.tracking.alias} "
              f"(version {result.model_version})", file=out)
    if tracking.tracking_uri().startswith("sqlite:///"):
        print(f"browse: mlflow ui --backend-store-uri {tracking.tracking_uri()}", file=out)
