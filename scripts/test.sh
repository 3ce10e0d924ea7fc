#!/usr/bin/env bash
# The test command of the README: install (idempotent, cached) with the test extras, then run the suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./install.sh --yes --extras test
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
