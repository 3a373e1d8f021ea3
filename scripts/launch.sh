#!/usr/bin/env bash
# One command on a fresh machine: set up the venv and start the web UI on the shipped default
# model (its artifacts are compiled on first start). Extra arguments go to app.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${VENV:-.venv}/bin/python" app.py "$@"
