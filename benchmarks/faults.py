"""Costs of the fault handling: checkpoint size and hashing time (MiniLM-L6), what retention saves in a store, and
how fast `fedtune train` gives up on a tracking server that is not there.

    .venv/bin/python benchmarks/faults.py      # about two minutes on 2 CPU cores
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from training import checkpoint, config
from training.models import load_model

TINY = ["model.name=tiny-bert", "model.max_length=32", "data.max_samples=300", "fl.num_clients=3", "fl.rounds=6",
        "runtime.threads=1", "tracking.log_model=false"]


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def minilm_checkpoint(tmp: Path) -> int:
    cfg = config.Config()
    state = load_model(cfg.model, ["negative", "neutral", "positive"], 0).state_dict()
    tic = time.perf_counter()
    path = checkpoint.save(checkpoint.Checkpoint(1, state, cfg.to_dict(), [], torch.get_rng_state()), tmp)
    saved = time.perf_counter() - tic
    tic = time.perf_counter()
    checkpoint.verify(path)
    verified = time.perf_counter() - tic
    size = folder_bytes(path)
    print(f"MiniLM-L6 checkpoint: {size / 1e6:.1f} MB; save with sha256 {saved:.2f} s; verify {verified:.2f} s")
    return size


def retention(tmp: Path) -> dict[int, int]:
    """Checkpoint folders a 6-round run leaves in its store with each policy."""
    from mlflow.tracking import MlflowClient

    from training.train import train

    kept = {}
    for keep in (0, 2):
        store = tmp / f"keep{keep}"
        store.mkdir()
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
        os.chdir(store)
        result = train(config.load(None, [*TINY, f"fl.keep_checkpoints={keep}"]), out=open(os.devnull, "w"))
        kept[keep] = len(MlflowClient().list_artifacts(result.run_id, "checkpoints"))
    print(f"6-round run: checkpoints kept with fl.keep_checkpoints=0 (all) / 2 (default, + best): "
          f"{kept[0]} / {kept[2]}")
    return kept


def time_to_fail(tmp: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the socket is: nothing listens
    tic = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "training", "train", *[a for t in TINY for a in ("--set", t)]],
                            capture_output=True, text=True, cwd=tmp,
                            env={**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})
    print(f"unreachable tracking server: exit {result.returncode} after {time.perf_counter() - tic:.1f} s; "
          f"{len(result.stderr.splitlines())} lines on stderr")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        size = minilm_checkpoint(Path(tmp))
        kept = retention(Path(tmp))
        print(f"so for MiniLM-L6, 6 rounds: {kept[0] * size / 1e6:.0f} MB -> {kept[2] * size / 1e6:.0f} MB per run")
        time_to_fail(Path(tmp))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
