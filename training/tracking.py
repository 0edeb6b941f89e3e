"""MLflow tracking: params, tags, per-round and per-client metrics, checkpoints, and the registered final model.

The tracking URI is ``MLFLOW_TRACKING_URI`` when set, else an embedded SQLite store in ``mlruns/mlflow.db`` with
artifacts under ``mlruns/artifacts``. Metrics are written in one batch per round.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import time
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from training import __version__
from training.checkpoint import FILES as CHECKPOINT_FILES
from training.rounds import Callback

STORE = Path("mlruns")
BATCH = 1000  # MLflow's limit of metrics per log_batch call


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(STORE / 'mlflow.db').resolve()}"


def connect() -> MlflowClient:
    """Point MLflow at the project's store (creating the embedded one on first use).

    Processes starting together on a fresh SQLite store would run its schema migration at the same time and break
    it, so the first connection is made under a file lock.
    """
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    if not uri.startswith("sqlite:///"):
        return MlflowClient(uri)
    lock_path = Path(uri.removeprefix("sqlite:///") + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # runs the migration now, inside the lock
        return client


def experiment_id(client: MlflowClient, name: str) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if tracking_uri().startswith("sqlite:///"):
        location = (STORE / "artifacts").resolve().as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # a process starting alongside created it first
        return client.get_experiment_by_name(name).experiment_id


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_tags(study, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        "fedtune.version": __version__,
        "git.commit": git_commit(),
        "device": f"{study.where.device}" + (f" ({_gpu_name()})" if study.where.device.type == "cuda" else ""),
        "precision": str(study.where.dtype or "fp32"),
        "task": study.task.name,
        "model": study.config.model.name,
        "dataset.fingerprint": study.task.fingerprint,
        "split.fingerprint": study.split_fingerprint,
        **(extra or {}),
    }


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def start_run(client: MlflowClient, study, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """Create the run and log the full resolved config as params (and as ``config.json``)."""
    tags = dict(tags)
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id(client, study.config.tracking.experiment), run_name=run_name, tags=tags)
    params = [Param(k, str(v)[:6000]) for k, v in study.config.flat().items()]
    for i in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[i : i + 100])
    client.log_dict(run.info.run_id, study.config.to_dict(), "config.json")
    return run.info.run_id


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, float], step: int) -> None:
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step) for k, v in values.items()]
    for i in range(0, len(metrics), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH])


class MlflowCallback(Callback):
    """Logs each round's metrics (step = round) and per-client metrics in one batch, and each checkpoint."""

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def after_round(self, round_, metrics, clients) -> bool:
        per_client = {
            f"client_{c['client']:03d}/{k}": v for c in clients for k, v in c.items() if k != "client"
        }
        log_metrics(self.client, self.run_id, {**metrics, **per_client}, round_)
        return False

    def after_checkpoint(self, round_, path) -> None:
        self.client.log_artifacts(self.run_id, str(path), f"checkpoints/{Path(path).name}")


def latest_checkpoint(client: MlflowClient, run_id: str, into: Path) -> Path | None:
    """Download the run's newest complete checkpoint folder (only that one) into ``into``.

    A process killed while uploading can leave a partial folder; it is skipped.
    """
    folders = sorted((f.path for f in client.list_artifacts(run_id, "checkpoints") if f.is_dir), reverse=True)
    for folder in folders:
        files = {Path(f.path).name for f in client.list_artifacts(run_id, folder)}
        if CHECKPOINT_FILES <= files:
            return Path(client.download_artifacts(run_id, folder, str(into)))
    return None


def finish(client: MlflowClient, run_id: str, ok: bool, reason: str = "") -> None:
    if reason:
        client.set_tag(run_id, "failure_reason", reason[:5000])
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED))


PIP_REQUIREMENTS = ["torch", "transformers", "safetensors", "tokenizers"]


def log_model(client: MlflowClient, run_id: str, study, registered_name: str) -> str | None:
    """Log the final model with its tokenizer; register it and point the alias at the new version.

    Returns the registered version, or None when registration is off.
    """
    register = study.config.tracking.register
    with mlflow.start_run(run_id=run_id):
        info = mlflow.transformers.log_model(
            transformers_model={"model": study.model.cpu(), "tokenizer": study.tokenizer},
            name="model",
            task="text-classification",
            pip_requirements=PIP_REQUIREMENTS,
            registered_model_name=registered_name if register else None,
        )
    study.model.to(study.where.device)
    if not register:
        return None
    version = str(info.registered_model_version)
    client.set_registered_model_alias(registered_name, study.config.tracking.alias, version)
    return version
