#!/usr/bin/env bash
# The test command of the README: install (idempotent, cached) with the test extras, then run the suite.
# The suite tests the embedded tier, so that is the tier installed, whatever else this machine could run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./install.sh --yes --tier embedded --extras test
# tests/e2e/test_console.py drives the system's Chromium (Debian's package; Playwright never downloads one).
# Installed when this user may: as root, or with sudo that asks no password; otherwise that test says how.
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(false); fi
  if [[ "${SUDO[0]:-}" != false ]]; then
    echo "installing chromium (for tests/e2e/test_console.py)"
    { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq chromium; } \
      >/dev/null || echo "warning: could not install chromium; tests/e2e/test_console.py will fail" >&2
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
