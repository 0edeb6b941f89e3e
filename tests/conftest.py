"""Shared fixtures: a tiny, fast study config and a private MLflow store per test."""

from __future__ import annotations

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
