"""Shared fixtures: a tiny, fast study config and a private MLflow store per test."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from training import config

# 300 tweets (240 train) and a 2-layer, 32-wide BERT: a round takes well under a second on 2 CPU cores.
TINY = [
    "model.name=tiny-bert",
    "model.max_length=32",
    "data.max_samples=300",
    "client.batch_size=16",
    "client.lr=1e-3",
    "fl.num_clients=3",
    "fl.rounds=2",
    "runtime.threads=1",
]


@pytest.fixture
def tiny():
    """``tiny("fl.rounds=4", ...)`` -> the tiny study's Config with extra overrides."""

    def make(*overrides: str) -> config.Config:
        return config.load(None, [*TINY, *overrides])

    return make


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A private embedded MLflow store; the working directory is the test's tmp_path."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    (tmp_path / "mlruns").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def all_runs(uri: str) -> list:
    """Every run in every experiment of the store (deleted ones too), not only the Default experiment's."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return []  # nothing opened the store, so nothing ran (and creating its tables would take seconds)
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return list(client.search_runs(experiment_ids=ids, run_view_type=ViewType.ALL)) if ids else []


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picked it), for a server the test starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_tiny_model(path, num_labels: int):
    """A tiny BERT classifier with a ``num_labels`` head, saved as save_pretrained writes it (config.json, weights,
    tokenizer): a local ``model.name``."""
    from transformers import AutoTokenizer

    from training.config import ModelConfig
    from training.models import load_model, resolve

    load_model(ModelConfig(name="tiny-bert"), [f"l{i}" for i in range(num_labels)], seed=0).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve("tiny-bert")).save_pretrained(path)
    return path


@pytest.fixture
def saved_model(tmp_path):
    """``saved_model(num_labels)`` -> a folder in tmp_path holding a tiny BERT classifier with that head."""
    return lambda num_labels: save_tiny_model(tmp_path / f"saved-{num_labels}-labels", num_labels)
