#!/usr/bin/env bash
# The test command of the README: install (idempotent, cached) with the test extras, then run the suite.
# The suite tests the embedded tier, so that is the tier installed, whatever else this machine could run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./install.sh --yes --tier embedded --extras test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
