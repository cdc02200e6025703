#!/usr/bin/env bash
# Installs everything (runtime + dev tools) and runs the whole check: lint, types, tests.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
.venv/bin/ruff check agentspeed tests benchmarks
.venv/bin/mypy agentspeed
.venv/bin/mypy --strict --follow-imports=silent agentspeed/control   # control plane: --strict
.venv/bin/python -m pytest -q "$@"
