#!/usr/bin/env bash
# Creates .venv and installs fedtune with the pinned versions of requirements.lock (torch: the small CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
echo "setup: .venv ready ($(.venv/bin/fedtune --version))"
