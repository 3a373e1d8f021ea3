#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what it needs.
#   bash scripts/setup.sh          # runtime dependencies
#   bash scripts/setup.sh --dev    # plus test dependencies
# Uses $VENV (default .venv). If torch is already importable there (the Neuron SDK venv, a CUDA
# machine), it is left alone; otherwise the CPU wheel torch==2.13.0 is installed first so that no
# other package pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
requirements=requirements.txt
[[ "${1:-}" == "--dev" ]] && requirements=requirements-dev.txt

if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV"
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
stamp="$VENV/.installed-$(cat "$requirements" requirements.txt requirements-ray.txt | sha256sum | cut -c1-16)"
if [[ ! -f "$stamp" ]]; then
  "$PY" -m pip install --quiet -r "$requirements"
  touch "$stamp"
fi
