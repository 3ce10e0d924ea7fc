#!/usr/bin/env bash
# The test command of the README: install (idempotent, cached) with the test extras, then run the suite.
# The suite tests the embedded tier, so that is the tier installed, whatever else this machine could run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
./install.sh --yes --tier embedded --extras test
# Debian packages some end-to-end tests start: the system's Chromium for tests/e2e/test_console.py (Playwright
# never downloads one) and HAProxy for tests/e2e/test_scale_out.py. Installed when this user may: as root, or
# with sudo that asks no password; otherwise those tests fail naming the command.
MISSING=()
command -v chromium >/dev/null 2>&1 || MISSING+=(chromium)
command -v haproxy >/dev/null 2>&1 || [[ -x /usr/sbin/haproxy ]] || MISSING+=(haproxy)
if (( ${#MISSING[@]} )) && command -v apt-get >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]]; then SUDO=(); elif sudo -n true 2>/dev/null; then SUDO=(sudo -n); else SUDO=(false); fi
  if [[ "${SUDO[0]:-}" != false ]]; then
    echo "installing ${MISSING[*]} (for tests/e2e/test_console.py, tests/e2e/test_scale_out.py)"
    { "${SUDO[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${MISSING[@]}"; } \
      >/dev/null || echo "warning: could not install ${MISSING[*]}; the tests that need them will fail" >&2
  fi
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
