#!/usr/bin/env bash
# Mutation testing of the core modules (setup.cfg [mutmut]) with their fast tests; not run in CI.
#   bash scripts/mutation.sh            # run (resumes where it stopped), then print the results
# Results and what each surviving mutant means: docs/testing.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
"$PY" -m pip install --quiet "mutmut>=3.3"
"$PY" -m mutmut run --max-children 2 || true
"$PY" -m mutmut results
