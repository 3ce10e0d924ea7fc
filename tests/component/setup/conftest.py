"""The installer tests' fixtures (a local package index, a file server with fault injection)."""

from tests.installer_fixtures import fault_server, index_server, tiny  # noqa: F401 - registered as fixtures
