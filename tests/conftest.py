"""Suite-wide set-up."""

from __future__ import annotations

# Import hypothesis at collection time: its pytest plugin otherwise imports it lazily in the terminal
# summary, deep in pluggy's stack, where CPython 3.11.7's ast.parse (used by pytest's assertion
# rewriting) can fail with "AST constructor recursion depth mismatch" (a CPython bug fixed in 3.11.8).
import hypothesis  # noqa: F401
