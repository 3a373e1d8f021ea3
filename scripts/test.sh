#!/usr/bin/env bash
# One command on a fresh machine: set up the venv with test dependencies and run every test.
# Browser tests use Debian's chromium (installed here when missing and apt-get is usable).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null && [[ "$(id -u)" == 0 ]]; then
  apt-get install -y chromium >/dev/null 2>&1 || (apt-get update >/dev/null 2>&1 && apt-get install -y chromium >/dev/null 2>&1) \
    || echo "warning: could not install chromium; browser tests will be skipped"
fi
exec "${VENV:-.venv}/bin/python" -m pytest "$@"
