"""Suite-wide set-up: every test is unit, component or e2e, by the directory it lives in."""

from __future__ import annotations

from pathlib import Path

# Import hypothesis at collection time: its pytest plugin otherwise imports it lazily in the terminal
# summary, deep in pluggy's stack, where CPython 3.11.7's ast.parse (used by pytest's assertion
# rewriting) can fail with "AST constructor recursion depth mismatch" (a CPython bug fixed in 3.11.8).
import hypothesis  # noqa: F401
import pytest

TESTS = Path(__file__).resolve().parent
# unit: logic with fakes, no model and no server (seconds); component: one real engine, model, tool or
# local service; e2e: the real server as a subprocess with the real models and a real client.
KINDS = ("unit", "component", "e2e")


def kind_of(path: Path) -> str | None:
    """The kind a test file is, from the first directory under tests/ (None outside the three)."""
    try:
        first = path.resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return first if first in KINDS else None


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> None:
    """A test file outside tests/unit, tests/component and tests/e2e is a collection error."""
    if file_path.suffix == ".py" and file_path.name.startswith("test_") and kind_of(file_path) is None:
        raise pytest.UsageError(f"{file_path}: a test file must live in tests/unit, tests/component or tests/e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its kind, so `pytest -m unit` selects by directory."""
    for item in items:
        kind = kind_of(item.path)
        if kind is not None:
            item.add_marker(getattr(pytest.mark, kind))
