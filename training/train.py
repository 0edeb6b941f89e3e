"""``fedtune train``: one tracked federated run, from config to registered model.

Used as is by the command line, the DVC train stage and each Optuna trial (which adds its pruning callback).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training import checkpoint, dataref, lora, partition, rounds, tracking
from training.callbacks import Callback
from training.config import Config, ConfigError, from_dict
from training.evaluate import client_accuracies, predict, scores
from training.executor import Executor, InProcess
from training.federation import Federation, build
from training.models import slug
from training.workdir import WorkDir, owned_here, owner_gone


@dataclass
class TrainResult:
    run_id: str
    history: rounds.History
    test: dict[str, float]
    registered_name: str
    model_version: str | None
    majority_rate: float  # validation accuracy of always predicting the most common class

    def summary(self) -> dict:
        # with fl.evaluation=clients the test scores hold the mean over the clients' slices: the paper's headline
        client_mean = {f"test_{k}": self.test[k] for k in ("client_mean_accuracy",) if k in self.test}
        return {
            "run_id": self.run_id,
            "rounds": len(self.history.rounds),
            "val_accuracy": self.history.last("val_accuracy"),
            "val_accuracy_best": self.history.best("val_accuracy"),
            "val_macro_f1": self.history.last("val_macro_f1"),
            "val_majority_rate": self.majority_rate,
            "test_accuracy": self.test.get("accuracy", float("nan")),
            "test_macro_f1": self.test.get("macro_f1", float("nan")),
            **client_mean,
            "registered_model": self.registered_name,
            "model_version": self.model_version,
        }


def names(config: Config, federation: Federation) -> tuple[str, str]:
    """(run name, registered model name), derived from task, model and K unless the config sets them."""
    base = f"{federation.task.name}-{slug(config.model.name)}"
    run_name = config.tracking.run_name or f"{base}-K{config.fl.num_clients}"
    return run_name, config.tracking.registered_name or base


def train(
    config: Config,
    split: list[np.ndarray] | None = None,
    resume: str | None = None,
    callbacks: tuple = (),
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    executor: Executor | None = None,
    out=None,
    from_round: int | None = None,
) -> TrainResult:
    """Run (or, with ``resume=RUN_ID``, continue) a federated run and track it in MLflow.

    Under torchrun every worker calls this; only the main one tracks, and the others return None.
    ``from_round`` resumes from an earlier kept checkpoint than the newest (e.g. when the newest is damaged).
    """
    out = out or sys.stdout
    executor = executor or InProcess()
    # Workers other than the main one touch MLflow only to fetch a checkpoint (the store exists by then).
    client = tracking.patient_client(config.tracking.retry_seconds) if executor.is_main or resume else None
    if executor.is_main:
        tracking.sweep(client, out)
    start = None
    if resume:
        start = _resume_point(client, resume, from_round, executor, out)
        config = from_dict(start.config)
        client.seconds = config.tracking.retry_seconds
        split = split if split is not None else _recorded_split(client, resume)
    federation = build(config, split, device=executor.device)
    if not executor.is_main:
        rounds.run(federation, (), None, start, executor)
        return None
    test_parts = _test_slices(federation) if config.fl.evaluation == "clients" else None  # before a run exists
    run_name, registered = names(config, federation)
    recorded = {**dataref.tags(config.data.source), **(tags or {})}  # so that evaluate finds the data from anywhere
    run_id = resume or tracking.start_run(client, federation, run_name, tracking.run_tags(federation, recorded),
                                          parent_run_id)
    work = WorkDir(tracking.tracking_uri(), run_id)
    if resume:
        metrics = _reopen(client, run_id, federation, start, work, from_round)
    else:
        metrics = tracking.Metrics(client, run_id, work)
    print(f"fedtune: run {run_id} ({run_name}) on {federation.where.device}; "
          f"{len(federation.task.train.texts)} training texts over {config.fl.num_clients} clients",
          file=out, flush=True)
    tracker = tracking.MlflowCallback(metrics, config.fl.keep_checkpoints)
    try:
        history, _ = rounds.run(federation, (tracker, _Printer(out), *callbacks), work.checkpoints, start, executor)
        if federation.lora:  # tested, logged and registered as a plain model: loading it needs no peft
            federation.model = lora.merged(federation.model)
        test = _test(federation, metrics, test_parts, history.rounds[-1]["round"])
        version = client.call(tracking.log_model, client, run_id, federation, registered,
                              doing="logging the model") if config.tracking.log_model else None
    except BaseException as err:  # NaN loss, Ctrl-C, an outage, any failure: mark the run FAILED, keep checkpoints
        _fail(client, run_id, work, err)
        raise
    tracking.finish(client, run_id, ok=True)
    work.clean()
    labels = federation.task.validation.labels
    result = TrainResult(run_id, history, test, registered, version, float(np.bincount(labels).max() / len(labels)))
    _print_summary(result, config, out)
    return result


def _test_slices(federation: Federation) -> list[np.ndarray]:
    """The test split cut over the clients as the training split is (scheme, K, seed, drop_remainder), so that
    each client is scored on test rows drawn like its own; checked before any training."""
    labels = federation.task.test.labels
    try:
        return partition.by_config(labels, federation.config)
    except ConfigError as err:
        raise ConfigError(f"fl.evaluation=clients cuts the {len(labels)} test rows over the clients: {err}") from err


def _test(federation: Federation, metrics: tracking.Metrics, test_parts: list[np.ndarray] | None,
          step: int) -> dict[str, float]:
    """The final model on the test split, logged; with ``test_parts`` also on each client's slice and their
    unweighted mean (``client_mean_accuracy``), from the same predictions."""
    dataset = federation.encoded["test"]
    predictions, loss = predict(federation.model, dataset, federation.collate,
                                federation.config.runtime.eval_batch_size, federation.where)
    test = {"loss": loss, **scores(dataset.labels, predictions)}
    per_client = {}
    if test_parts is not None:
        accuracies = client_accuracies(dataset.labels, predictions, test_parts)
        test["client_mean_accuracy"] = float(np.mean(accuracies))
        per_client = {tracking.metric_key("test_accuracy", c): a for c, a in enumerate(accuracies)}
    metrics.log("test", {**{tracking.metric_key(f"test_{k}"): v for k, v in test.items()}, **per_client}, step)
    return test


def _reopen(client, run_id: str, federation: Federation, start: checkpoint.Checkpoint, work: WorkDir,
            from_round: int | None) -> tracking.Metrics:
    """Take a resumed run back: same split, RUNNING again and owned by this process, with what an earlier process
    held back sent now; its metrics logger knows every point the run holds, so a rerun round adds none twice."""
    _check_same_split(client, run_id, federation)
    client.update_run(run_id, status="RUNNING")
    if "failure_reason" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "failure_reason")
    tracking.claim(client, run_id)
    metrics = tracking.Metrics(client, run_id, work, tracking.logged_points(client, run_id))
    metrics.flush()
    if from_round is None:  # a kill between an upload and its pruning leaves one checkpoint too many
        tracking.prune_checkpoints(client, run_id, start.history, federation.config.fl.keep_checkpoints)
    return metrics


def _fail(client, run_id: str, work: WorkDir, err: BaseException) -> None:
    """Mark the run FAILED with one readable reason; when the server cannot hear it, leave the reason in the work
    directory, where the next ``fedtune train`` finds it (``tracking.sweep``), with the data not yet sent."""
    if not isinstance(err, tracking.TrackingUnavailable):
        try:
            tracking.finish(client, run_id, ok=False, reason=f"{type(err).__name__}: {err}")
            work.clean()
            return
        except tracking.TrackingUnavailable as lost:
            err = lost
    err.advice = (f"Nothing logged is lost: the metrics and checkpoint not yet sent stay in {work.path}. When the "
                  f"server answers again, continue with `fedtune train --resume {run_id}`; the next `fedtune train` "
                  f"marks the run FAILED with this reason until then.")
    work.note_failure(f"the tracking server at {err.uri} stopped answering ({err.cause}) while {err.doing}; "
                      f"what was not sent stays in {work.path}; resume with `fedtune train --resume {run_id}`")


def _resume_point(client, run_id: str, from_round: int | None, executor: Executor, out) -> checkpoint.Checkpoint:
    """The checkpoint to continue from: the newest kept one (after the main worker has uploaded any this machine
    still held), or ``from_round``; each file checked against its recorded hash."""
    work = WorkDir(tracking.tracking_uri(), run_id)
    if executor.is_main:
        _check_resumable(client, run_id)
        for path in sorted(work.checkpoints.glob("round-*")):
            try:
                checkpoint.verify(path)
                tracking.upload_checkpoint(client, run_id, path)
            except checkpoint.CorruptCheckpoint as err:  # an earlier copy is on the server
                print(f"fedtune: dropping the local {err} (run {run_id}); the server's copies are used", file=out)
                shutil.rmtree(path)
    executor.agree(False)  # every worker reads the checkpoint the main worker may just have uploaded
    saved = tracking.checkpoint_rounds(client, run_id)
    if not saved:
        raise ConfigError(f"--resume {run_id}: the run has no checkpoint yet; start a new run instead")
    if from_round is not None and from_round not in saved:
        raise ConfigError(f"--from-round {from_round}: run {run_id} keeps checkpoints of rounds {saved}; pick one")
    chosen = saved[-1] if from_round is None else from_round
    work.path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=work.path) as into:
        try:
            return checkpoint.load(tracking.download_checkpoint(client, run_id, chosen, Path(into) / str(chosen)))
        except checkpoint.CorruptCheckpoint as err:
            earlier = next((r for r in reversed(saved) if r < chosen and _intact(client, run_id, r, Path(into))), None)
            offer = (f"The previous good checkpoint is round {earlier}: continue from it with `fedtune train --resume "
                     f"{run_id} --from-round {earlier}`." if earlier else
                     "No earlier checkpoint of the run is intact; start a new run.")
            damaged = f"checkpoints/{checkpoint.folder_name(chosen)}/{err.file}"
            raise ConfigError(f"--resume {run_id}: the checkpoint of round {chosen} is damaged: {damaged} "
                              f"{err.problem}. {offer}") from err


def _intact(client, run_id: str, round_: int, into: Path) -> bool:
    try:
        checkpoint.verify(tracking.download_checkpoint(client, run_id, round_, into / str(round_)))
        return True
    except checkpoint.CorruptCheckpoint:
        return False


def _check_resumable(client, run_id: str) -> None:
    run = tracking.get_run(client, run_id, f"--resume {run_id}: no such MLflow run at {tracking.tracking_uri()}")
    if run.info.status == "FINISHED":
        raise ConfigError(f"--resume {run_id}: the run is FINISHED (evaluated on the test split, its model logged); "
                          f"resuming would evaluate, log and register it a second time. Start a new run instead, "
                          f"or evaluate this one with `fedtune evaluate {run_id}`")
    tags = run.data.tags
    if run.info.status == "RUNNING" and owned_here(tags) and not owner_gone(tags):
        raise ConfigError(f"--resume {run_id}: the run is still being trained by process {tags['fedtune.pid']} on "
                          f"this machine; stop that process first")


def _recorded_split(client, run_id: str) -> list[np.ndarray] | None:
    """The split file a run was started with (``--split``), if any."""
    path = client.get_run(run_id).data.tags.get("split.path")
    if not path:
        return None
    if not Path(path).is_file():
        raise ConfigError(f"--resume {run_id}: the run was started with --split {path}, which no longer exists; "
                          f"pass --split with the same file")
    return partition.load_split(Path(path))


def _check_same_split(client, run_id: str, federation: Federation) -> None:
    recorded = client.get_run(run_id).data.tags.get("split.fingerprint")
    if recorded and recorded != federation.split_fingerprint:
        raise ConfigError(f"--resume {run_id}: the client split differs from the run's ({recorded}); "
                          f"pass the same --split file the run was started with")


class _Printer(Callback):
    """One line per round on the terminal."""

    def __init__(self, out):
        self.out = out

    def after_round(self, round_, metrics, clients) -> bool:
        val = (f"val acc {metrics['val_accuracy']:.4f} f1 {metrics['val_macro_f1']:.4f} "
               if "val_accuracy" in metrics else "")
        print(f"round {round_}: {val}train loss {metrics['train_loss']:.4f} "
              f"cosine(min) {metrics['update_cosine_min']:.3f} {metrics['round_seconds']:.1f}s",
              file=self.out, flush=True)
        return False


def _print_summary(result: TrainResult, config: Config, out) -> None:
    s = result.summary()
    print(f"\ndone: {s['rounds']} rounds, K={config.fl.num_clients}: validation accuracy {s['val_accuracy']:.4f} "
          f"(best {s['val_accuracy_best']:.4f}; majority class {s['val_majority_rate']:.4f}), "
          f"test accuracy {s['test_accuracy']:.4f}, test macro-F1 {s['test_macro_f1']:.4f}", file=out)
    if "test_client_mean_accuracy" in s:
        print(f"mean of the {config.fl.num_clients} clients' test accuracies on their own test slices: "
              f"{s['test_client_mean_accuracy']:.4f}", file=out)
    print(f"MLflow run {result.run_id} in experiment '{config.tracking.experiment}' at {tracking.tracking_uri()}",
          file=out)
    if result.model_version:
        print(f"registered model: models:/{result.registered_name}@{config.tracking.alias} "
              f"(version {result.model_version})", file=out)
    if tracking.tracking_uri().startswith("sqlite:///"):
        print(f"browse: mlflow ui --backend-store-uri {tracking.tracking_uri()}", file=out)
