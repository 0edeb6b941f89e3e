#!/usr/bin/env bash
# Lints the Python code with ruff (pyproject.toml's [tool.ruff]: pycodestyle, pyflakes, import order), then the
# container files: hadolint on the Dockerfiles, and docker-compose's own validation of the stack as users run it
# (compose.yaml with compose.override.yaml's GPUs), without GPUs, and as CI runs it (compose.ci.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."

# the locked ruff of the dev extra (scripts/setup.sh): another version may add or drop findings
.venv/bin/ruff check --quiet .
echo "lint: ruff finds nothing in the Python code"

if ! command -v docker-compose >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
hadolint=$(command -v hadolint || echo .venv/bin/hadolint)

"$hadolint" Dockerfile docker/postgres/Dockerfile
# Only this env file, so that a developer's .env cannot hide a broken default.
env_file=$(mktemp)
trap 'rm -f "$env_file"' EXIT
docker-compose --env-file "$env_file" config -q
docker-compose --env-file "$env_file" -f compose.yaml config -q
echo "CI_MLFLOW_PORT=1 CI_POSTGRES_PORT=2" | tr ' ' '\n' >"$env_file"
docker-compose --env-file "$env_file" -f compose.yaml -f compose.ci.yaml config -q
for script in .ci/docker.sh .ci/images.sh docker/debian-base.sh docker/postgres/entrypoint.sh benchmarks/*.sh; do
    bash -n "$script"
done
echo "lint: Dockerfiles, compose files and container scripts are clean"
