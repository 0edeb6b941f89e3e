"""MLflow tracking: params, tags, per-round and per-client metrics, checkpoints, and the registered final model.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else an embedded SQLite store in ``mlruns/mlflow.db`` with
artifacts under ``mlruns/artifacts``. Metrics are written in one batch per round, once per (key, step): what a
run already holds is skipped, so a round rerun by ``--resume`` never adds a second point. Every call waits out a
tracking server that stops answering for up to ``tracking.retry_seconds`` (``Patient``), then gives up with one
paragraph naming the server (``TrackingUnavailable``); what was not yet sent stays in the run's work directory.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from training import __version__, checkpoint, store
from training.callbacks import Callback
from training.config import ConfigError
from training.reach import TrackingUnavailable, probe, short, unreachable
from training.workdir import WorkDir, owner, owner_gone

STORE = Path("mlruns")
BATCH = 1000  # MLflow's limit of metrics per log_batch call


def metric_key(name: str, client: int | None = None) -> str:
    """The MLflow key of a metric of the run (``global/val_accuracy``) or of one client (``local/client_003/samples``).

    MLflow's UI charts a run's metrics in sections named by what precedes the last '/', sorted by name, the
    unprefixed ones last. These sections read in this order: the global model's quality (``global``), what each
    round took (``global/round``: seconds, bytes, cohort, workers), how far the clients' updates pulled apart and
    what the server strategy made of them (``global/updates``: ``update_*``, ``server_*``), then each client
    (``local/client_NNN``).
    """
    if client is not None:
        return f"local/client_{client:03d}/{name}"
    if name.startswith(("val_", "test_", "train_")):
        return f"global/{name}"
    return f"global/{'updates' if name.startswith(('update_', 'server_')) else 'round'}/{name}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or store.uri(STORE)


def connect() -> MlflowClient:
    """Point MLflow at the project's store (creating the embedded one on first use, relocating a copied one).

    Processes starting together on a fresh SQLite store would run its schema migration at the same time and break
    it, so the first connection is made under a file lock.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    folder = store.directory(uri)
    if folder is None:
        return MlflowClient(uri)
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path):
        moved = store.open_embedded(folder)
        if moved:
            print(f"fedtune: {moved}", file=sys.stderr)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # runs the migration now, inside the lock
        return client


@contextlib.contextmanager
def _short_http_retries():
    """Inside our own retry loop MLflow's retries (7, backing off to ~4 minutes) would only hide the outage."""
    names = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: v for k, v in names.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


class Patient:
    """An MlflowClient whose calls wait out an unreachable tracking server for up to ``seconds``.

    Pauses grow 1, 2, 4, 8, then 10 s, so a server back after a minute is found within 10 s of its return.
    """

    def __init__(self, client: MlflowClient, seconds: float, out=None):
        self.client, self.seconds, self.out = client, seconds, out or sys.stderr

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        return functools.partial(self.call, method, doing=f"calling {name}") if callable(method) else method

    def call(self, fn, *args, doing: str = "talking to it", **kwargs):
        deadline, pause, told = time.monotonic() + self.seconds, 1.0, False
        while True:
            try:
                with _short_http_retries():
                    result = fn(*args, **kwargs)
                if told:
                    print(f"fedtune: the tracking server at {tracking_uri()} answers again", file=self.out, flush=True)
                return result
            except Exception as err:
                if not unreachable(err):
                    raise
                if time.monotonic() + pause > deadline:
                    raise TrackingUnavailable(tracking_uri(), doing, self.seconds, err) from err
                if not told:
                    print(f"fedtune: the tracking server at {tracking_uri()} does not answer ({short(err)}); "
                          f"retrying for up to {self.seconds:.0f} s", file=self.out, flush=True)
                    told = True
            time.sleep(pause)
            pause = min(2 * pause, 10.0)


def patient_client(retry_seconds: float) -> Patient:
    """The trainer's client: the server probed first, every call retried through an outage."""
    probe(tracking_uri())
    return Patient(connect(), retry_seconds)


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    folder = store.directory(tracking_uri())
    location = store.artifact_root(folder).as_uri() if folder else None  # beside the embedded store, wherever it is
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # a process starting alongside created it first
        return client.get_experiment_by_name(name).experiment_id


def get_run(client: MlflowClient, run_id: str, missing: str):
    """The run ``run_id``; ``ConfigError(missing)`` when the store holds no such run (a typo, or another store)."""
    try:
        return client.get_run(run_id)
    except mlflow.exceptions.MlflowException as err:
        raise ConfigError(missing) from err


def quoted(value: str) -> str:
    """``value`` as a string literal of an MLflow search filter (a name, tag or id put into ``name = ...``).

    MLflow's filter parser strips the outer quotes and reads the rest as is: it has no escape (``''`` or ``\\'``
    would be searched literally), so the only safe quote is one the value does not hold.
    """
    for quote in ("'", '"'):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ConfigError(f"{value!r} holds both ' and \": MLflow's search syntax cannot match it; use a name with one "
                      f"kind of quote at most")


def git_commit() -> str:
    """The commit of the checkout fedtune's code runs from (not of the working directory), or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(federation, extra: dict[str, str] | None = None) -> dict[str, str]:
    from mlflow.tracking.context.registry import resolve_tags
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    commit, where = git_commit(), federation.where
    return {
        **resolve_tags(),  # MLflow's own: mlflow.user, mlflow.source.name and .type, which its UI shows
        **({MLFLOW_GIT_COMMIT: commit} if commit != "unknown" else {}),
        "fedtune.version": __version__,
        "git.commit": commit,
        "device": f"{where.device}" + (f" ({_gpu_name()})" if where.device.type == "cuda" else ""),
        "precision": str(where.dtype or "fp32"),
        "task": federation.task.name,
        "model": federation.config.model.name,
        "dataset.fingerprint": federation.task.fingerprint,
        "split.fingerprint": federation.split_fingerprint,
        # the rows the run used, whatever data.max_samples says (a prepared task is used whole)
        **{f"data.{name}_rows": str(len(getattr(federation.task, name))) for name in ("train", "validation", "test")},
        **(extra or {}),
    }


def logged_params(federation) -> dict[str, str]:
    """The flat config as MLflow params. A prepared task (its source a `fedtune prepare` folder, which remembers the
    original source) is read whole: data.max_samples did not pick its rows, so the param says how many there were."""
    params = {k: str(v) for k, v in federation.config.flat().items()}
    if federation.task.source != federation.config.data.source:
        rows = sum(len(getattr(federation.task, split)) for split in ("train", "validation", "test"))
        params["data.max_samples"] = f"{rows} (all rows of the prepared task; data.max_samples does not apply)"
    return params


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def start_run(client: MlflowClient, federation, run_name: str, tags: dict[str, str],
              parent_run_id: str | None = None) -> str:
    """Create the run and log the full resolved config as params (and as ``config.json``)."""
    tags = {**tags, **owner()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, federation.config.tracking.experiment), run_name=run_name, tags=tags)
    params = [Param(k, v[:6000]) for k, v in logged_params(federation).items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_dict(run.info.run_id, federation.config.to_dict(), "config.json")
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])


def logged_points(client: MlflowClient, run_id: str) -> set[tuple[str, int]]:
    """Every (metric key, step) the run already holds."""
    keys = client.get_run(run_id).data.metrics
    return {(key, m.step) for key in keys for m in client.get_metric_history(run_id, key)}


class Metrics:
    """Logs each (key, step) once. Values wait in the work directory until the server has them, so an outage or a
    kill loses nothing, and ``flush`` sends them on ``--resume``; points the run already holds are skipped, so a
    rerun round keeps its first values instead of adding a second point."""

    def __init__(self, client: MlflowClient, run_id: str, work: WorkDir, logged: set[tuple[str, int]] | None = None):
        self.client, self.run_id, self.work, self.logged = client, run_id, work, set(logged or ())

    def log(self, name: str, values: dict[str, float], step: int) -> None:
        self._send(self.work.hold(name, values, step), values, step)

    def flush(self) -> None:
        """Send what an earlier process held back."""
        for path, values, step in self.work.held():
            self._send(path, values, step)

    def _send(self, held: Path, values: dict[str, float], step: int) -> None:
        fresh = {k: v for k, v in values.items() if (k, step) not in self.logged}
        log_metrics(self.client, self.run_id, fresh, step)
        self.logged |= {(k, step) for k in fresh}
        self.work.release(held)


def _drill_point(phase: str, round_: int) -> None:
    """Test hook for the fault drills (tests/test_faults.py) only: ``FEDTUNE_FAULT_HOOK=phase:round`` stops this
    process at that point, so the drill's SIGKILL lands exactly there."""
    if os.environ.get("FEDTUNE_FAULT_HOOK") == f"{phase}:{round_}":
        os.kill(os.getpid(), signal.SIGSTOP)


class MlflowCallback(Callback):
    """Logs each round's metrics (step = round) and per-client metrics in one batch, uploads each checkpoint, then
    deletes the checkpoints the retention policy (``fl.keep_checkpoints``) no longer keeps."""

    def __init__(self, metrics: Metrics, keep_last: int):
        self.metrics, self.keep_last = metrics, keep_last

    def after_round(self, round_, metrics, clients) -> bool:
        _drill_point("computed", round_)
        run_level = {metric_key(k): v for k, v in metrics.items()}
        per_client = {metric_key(k, c["client"]): v for c in clients for k, v in c.items() if k != "client"}
        self.metrics.log(f"round-{round_:03d}", {**run_level, **per_client}, round_)
        _drill_point("logged", round_)
        return False

    def after_checkpoint(self, round_, path) -> None:
        _drill_point("saved", round_)
        client, run_id = self.metrics.client, self.metrics.run_id
        history = checkpoint.read_state(path)["history"]
        upload_checkpoint(client, run_id, Path(path))
        _drill_point("uploaded", round_)
        prune_checkpoints(client, run_id, history, self.keep_last)


def upload_checkpoint(client: MlflowClient, run_id: str, path: Path) -> None:
    """Upload a local checkpoint folder, then drop the local copy: the server holds it now."""
    client.log_artifacts(run_id, str(path), f"checkpoints/{path.name}")
    shutil.rmtree(path)


def checkpoint_rounds(client: MlflowClient, run_id: str) -> list[int]:
    """Rounds with a complete checkpoint folder in the run's artifacts, oldest first (a process killed while
    uploading can leave a partial folder; it is left out)."""
    complete = []
    for folder in client.list_artifacts(run_id, "checkpoints"):
        names = {Path(f.path).name for f in client.list_artifacts(run_id, folder.path)} if folder.is_dir else set()
        if checkpoint.FILES <= names:
            complete.append(checkpoint.round_of(folder.path))
    return sorted(complete)


def download_checkpoint(client: MlflowClient, run_id: str, round_: int, into: Path) -> Path:
    return Path(client.download_artifacts(run_id, f"checkpoints/{checkpoint.folder_name(round_)}", str(into)))


def prune_checkpoints(client: Patient, run_id: str, history: list[dict], keep_last: int) -> None:
    """Delete the run's checkpoint folders that ``checkpoint.to_keep`` drops (the artifact repository's delete works
    on a local artifact root and through ``mlflow server --serve-artifacts``)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    folders = {checkpoint.round_of(f.path): f.path for f in client.list_artifacts(run_id, "checkpoints") if f.is_dir}
    drop = sorted(set(folders) - checkpoint.to_keep(list(folders), history, keep_last))
    if drop:
        repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
        for round_ in drop:
            client.call(repo.delete_artifacts, folders[round_], doing="deleting an old checkpoint")


def finish(client: MlflowClient, run_id: str, ok: bool, reason: str = "") -> None:
    if reason:
        client.set_tag(run_id, "failure_reason", reason[:5000])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


def claim(client: MlflowClient, run_id: str) -> None:
    """Record this process as the run's owner (host, pid, start time): a later sweep can tell if it died."""
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner().items()])


def sweep(client: MlflowClient, out=None) -> list[str]:
    """Mark FAILED every RUNNING run whose owning process on this machine has ended (kill -9, power loss, a
    tracking outage it gave up on), with one readable reason; remove its work directory unless it holds data
    not yet uploaded, which ``--resume`` sends. Returns the swept run ids."""
    import socket

    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(
        experiments, f"attributes.status = 'RUNNING' and tags.`fedtune.host` = {quoted(host)}", max_results=1000
    ) if experiments else []
    swept = []
    for run in running:
        if not owner_gone(run.data.tags):
            continue
        run_id, work = run.info.run_id, WorkDir(tracking_uri(), run.info.run_id)
        if "optuna.trial" in run.data.tags:  # tune's heartbeat fails and reruns a dead worker's trial; never resumed
            shutil.rmtree(work.path, ignore_errors=True)
            continue
        reason = work.failure() or (f"process {run.data.tags.get('fedtune.pid')} on host {host} ended without "
                                    f"finishing (killed?); resume with `fedtune train --resume {run_id}`")
        finish(client, run_id, ok=False, reason=reason)
        kept = "" if work.clean() else f"; what it had not uploaded stays in {work.path} for --resume"
        print(f"fedtune: run {run_id} marked FAILED: {reason}{kept}", file=out or sys.stderr)
        swept.append(run_id)
    return swept


PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def log_model(client: MlflowClient, run_id: str, federation, registered_name: str) -> str | None:
    """Log the final model with its tokenizer; register it and point the alias at the new version.

    Returns the registered version, or None when registration is off.
    """
    register = federation.config.tracking.register
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": federation.model.cpu(), "tokenizer": federation.tokenizer},
            name=logged_model_name(registered_name),
            task="text-classification",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_name if register else None,
        )
    federation.model.to(federation.where.device)
    if not register:
        return None
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, federation.config.tracking.alias, version)
    return version


def logged_model_name(registered_name: str) -> str:
    """The name the run's model is listed under (and ``runs:/RUN_ID/<name>`` finds): its registered name, with the
    characters MLflow refuses in a logged model's name replaced."""
    return re.sub(r"""[/:.%"']""", "-", registered_name)
