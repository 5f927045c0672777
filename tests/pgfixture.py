"""The session-wide PostgreSQL fixture (import it into tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pg import PgServer, find_bindir


@pytest.fixture(scope="session", name="pg_server")  # named: importable under any alias
def pg_server() -> Iterator[PgServer]:
    """PostgreSQL on 127.0.0.1 with database `media` seeded; stopped by PID at the end."""
    server = PgServer(find_bindir())
    try:
        server.init()
        server.start()
        server.seed()
        yield server
    finally:
        server.destroy()
