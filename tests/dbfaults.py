"""PostgreSQL-side faults for tests: a server that turned read-only, a database wrapper that
loses chosen statements (before they run, or their reply after they committed)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import psycopg
from psycopg import sql

from bec.config import DbParams
from bec.control.db import Database
from bec.errors import DatabaseUnavailable


def admin_connection(params: DbParams) -> psycopg.Connection:
    return psycopg.connect(host=params.host, port=params.port, user=params.user,
                           password=params.password or None, dbname=params.database, autocommit=True,
                           application_name="test-admin")


@contextlib.contextmanager
def read_only_database(params: DbParams) -> Iterator[psycopg.Connection]:
    """What a worker sees after a failover left it on the demoted writer: every new session is
    read-only, and BEC's sessions are cut so that they reconnect to it. The admin connection
    (opened before, so writable) is yielded, and puts things back at the end."""
    admin = admin_connection(params)
    name = sql.Identifier(params.database)
    try:
        admin.execute(sql.SQL("ALTER DATABASE {} SET default_transaction_read_only = on").format(name))
        cut_bec_sessions(admin)
        yield admin
    finally:
        admin.execute(sql.SQL("ALTER DATABASE {} RESET default_transaction_read_only").format(name))
        admin.close()


def cut_bec_sessions(admin: psycopg.Connection) -> int:
    """Terminate every session of BEC's processes (application names ``bec-…``) on this database."""
    return len(admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name LIKE 'bec-%' AND pid <> pg_backend_pid()").fetchall())


class FlakyDatabase(Database):
    """A real ``Database`` that loses the next statement containing ``marker``: ``before`` it
    reaches the server (a blip), or ``after`` it committed (the reply lost on the way back:
    failover, connection reset). Either way the caller gets what a lost connection gives."""

    def __init__(self, params: DbParams) -> None:
        super().__init__(params, max_size=2, application_name="test-flaky")
        self.faults: list[tuple[str, str]] = []
        self.lost: list[str] = []

    def lose(self, marker: str, when: str = "before") -> None:
        self.faults.append((marker, when))

    def _fault_for(self, query: str) -> str | None:
        for n, (marker, when) in enumerate(self.faults):
            if marker in query:
                del self.faults[n]
                self.lost.append(marker)
                return when
        return None

    def rows(self, query: str, params: Any = ()) -> list[dict[str, Any]]:
        when = self._fault_for(query)
        if when == "before":
            raise DatabaseUnavailable("PostgreSQL at test: server closed the connection unexpectedly")
        found = super().rows(query, params)
        if when == "after":
            raise DatabaseUnavailable("PostgreSQL at test: server closed the connection unexpectedly")
        return found

    def execute(self, query: str, params: Any = ()) -> int:
        when = self._fault_for(query)
        if when == "before":
            raise DatabaseUnavailable("PostgreSQL at test: server closed the connection unexpectedly")
        count = super().execute(query, params)
        if when == "after":
            raise DatabaseUnavailable("PostgreSQL at test: server closed the connection unexpectedly")
        return count
