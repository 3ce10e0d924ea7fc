"""Where the suite finds the repository and its recorded fixtures, wherever a test file sits."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
INSTALLER_FIXTURES = FIXTURES / "installer"  # recorded command outputs and registries for the installer tests
