#!/usr/bin/env bash
# Lints the container files: hadolint on the Dockerfile, and docker-compose's own validation of compose.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v docker-compose >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
fi
hadolint=$(command -v hadolint || echo .venv/bin/hadolint)

"$hadolint" Dockerfile
# An empty env file, so that a developer's .env cannot hide a broken default.
empty_env=$(mktemp)
trap 'rm -f "$empty_env"' EXIT
docker-compose --env-file "$empty_env" -f compose.yaml config -q
echo "lint: Dockerfile and compose.yaml are clean"
