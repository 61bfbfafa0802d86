"""PostgreSQL access: one connection pool per process, the schema, error translation.

Every query in BEC goes through ``Database`` and is parameterised. Errors are classified
here, once, at the edge: whatever says "the service cannot do this now" (connection
trouble, a timeout, a server that became read-only) is ``Unavailable``, with the host named
and the password never shown; anything else is a bug and propagates as it is.

Connections carry TCP keepalives and a TCP user timeout, and every statement a timeout: with
Linux's defaults a black-holed primary (a failover, a dead host) stalled a query for ~15
minutes, holding the volume's thread and its claim with it.
"""
from __future__ import annotations

import contextlib
import logging
import time
from importlib import resources
from typing import Any, Iterator, Sequence

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from bec.config import DbParams
from bec.errors import BadInput, DatabaseUnavailable

SCHEMA_LOCK_KEY = 0x0BEC_5C4E  # advisory lock serialising concurrent schema applies
#: Columns the latest schema added, checked at first use: code that needs them must not run
#: against an older schema (a claim would fail on every volume).
NEWEST_COLUMNS = (("task_executions", "claim_token"),)

#: libpq's TCP settings: an idle connection is probed after 10 s and given up after 3 unanswered
#: probes 5 s apart; data left unacknowledged for 20 s fails the connection (instead of the
#: kernel's ~15 minutes of retransmissions).
TCP_SETTINGS = {"keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
                "keepalives_count": 3, "tcp_user_timeout": 20_000}
#: Longest a statement may run: BEC's queries take milliseconds; one that runs for a minute
#: is waiting on something (a lock held by a stalled session) and would hold its thread.
STATEMENT_TIMEOUT_MS = 60_000

#: SQLSTATEs outside OperationalError's classes that still mean "not now": a server that
#: became read-only (a demoted primary after a failover, or a read-only replica behind the
#: same name), whose writes fail until we reconnect to the new primary.
_UNAVAILABLE_STATES = {"25006"}  # read_only_sql_transaction


def schema_sql() -> str:
    return resources.files("bec.control").joinpath("schema.sql").read_text()


@contextlib.contextmanager
def _pool_warnings_muted() -> Iterator[None]:
    """While the pool first opens, its "error connecting" warnings (one per attempt, printed by
    Python's last-resort handler in a CLI command) only repeat what ``Unavailable`` then says
    in one line. Later reconnects still warn: a worker's log should show a database outage."""
    pool_log = logging.getLogger("psycopg.pool")
    before = pool_log.level
    pool_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        pool_log.setLevel(before)


class Database:
    """A process' connection pool with the few query shapes BEC needs."""

    def __init__(self, params: DbParams, *, min_size: int = 1, max_size: int = 4,
                 connect_timeout: float = 5.0, application_name: str = "bec") -> None:
        self.params = params
        self._conninfo = psycopg.conninfo.make_conninfo(
            host=params.host, port=params.port, user=params.user,
            password=params.password or None, dbname=params.database,
            application_name=application_name, connect_timeout=max(1, int(connect_timeout)),
            **TCP_SETTINGS,
        )
        # check: a pooled connection broken by a server restart is replaced before use,
        # instead of failing the next operation
        self.pool = ConnectionPool(self._conninfo, min_size=min_size, max_size=max_size,
                                   open=False, kwargs={"autocommit": True},
                                   check=ConnectionPool.check_connection, configure=_configure,
                                   name=f"bec-{application_name}")
        try:
            with _pool_warnings_muted():
                self.pool.open(wait=True, timeout=connect_timeout)
        except PoolTimeout:
            self.pool.close(timeout=0)
            raise DatabaseUnavailable(self._why_unreachable()) from None

    def _why_unreachable(self) -> str:
        """Connect once directly to learn the reason the pool could not (no password shown)."""
        try:
            psycopg.connect(self._conninfo).close()
            reason = "timed out"
        except psycopg.Error as exc:
            reason = _first_line(str(exc))
            if self.params.password:
                reason = reason.replace(self.params.password, "***")
        return f"cannot connect to PostgreSQL at {self.params.describe()}: {reason}"

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "Database":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def connection(self, timeout: float | None = 30.0) -> Iterator[psycopg.Connection]:
        asked = time.perf_counter()
        try:
            with self.pool.connection(timeout=timeout) as conn:
                _observe_wait(time.perf_counter() - asked)
                try:
                    yield conn
                except psycopg.Error as exc:
                    if getattr(exc, "sqlstate", None) in _UNAVAILABLE_STATES:
                        # the session stays read-only: closed, the pool drops it and the next
                        # connection finds the new primary
                        conn.close()
                    raise
        except PoolTimeout:
            _count_error()
            raise DatabaseUnavailable(f"no PostgreSQL connection available from "
                              f"{self.params.describe()} within {timeout}s") from None
        except psycopg.Error as exc:
            if not is_unavailable(exc):
                raise  # a bug (bad SQL, a constraint): the caller's thread reports it
            _count_error()
            raise DatabaseUnavailable(f"PostgreSQL at {self.params.describe()}: "
                              f"{_first_line(str(exc))}") from exc

    def writable(self) -> None:
        """Raise ``Unavailable`` unless the database answers and accepts writes (a probe while
        it is down: ``SELECT 1`` succeeds on a read-only server where every claim fails)."""
        with self.connection() as conn:
            read_only = conn.execute("SELECT pg_is_in_recovery() OR "
                                     "current_setting('transaction_read_only') = 'on'").fetchone()[0]
            if read_only:
                conn.close()  # this session stays read-only: the next one may find the new primary
        if read_only:
            raise DatabaseUnavailable(f"PostgreSQL at {self.params.describe()} is read-only")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection]:
        with self.connection() as conn, conn.transaction():
            yield conn

    def rows(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[dict[str, Any]]:
        with self.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def row(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> dict[str, Any] | None:
        found = self.rows(sql, params)
        return found[0] if found else None

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> int:
        with self.connection() as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.rowcount

    # -- schema ----------------------------------------------------------------------------
    def apply_schema(self) -> None:
        """Create or complete the schema; concurrent callers wait for each other."""
        with self.transaction() as conn:
            conn.execute("SET LOCAL statement_timeout = 0")  # index builds on a big table
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
            conn.execute(schema_sql())

    def ensure_schema(self) -> None:
        """Apply the schema on first use (cheap check when it is already there); refuse, in one
        line, a schema older than this release (``bec db init`` completes it)."""
        found = self.row("SELECT to_regclass('task_executions') IS NOT NULL AS present")
        if not (found and found["present"]):
            self.apply_schema()
            return
        for table, column in NEWEST_COLUMNS:
            if not self.row("SELECT 1 AS present FROM information_schema.columns WHERE table_schema = "
                            "current_schema() AND table_name = %s AND column_name = %s", (table, column)):
                raise BadInput(f"the database schema at {self.params.describe()} is older than this BEC "
                               f"({table} has no {column}): run `bec db init` once to complete it")


def is_unavailable(exc: BaseException) -> bool:
    """Does this psycopg error say the service cannot serve us now (as opposed to a bug)?"""
    return isinstance(exc, psycopg.OperationalError) or (
        isinstance(exc, psycopg.Error) and getattr(exc, "sqlstate", None) in _UNAVAILABLE_STATES)


def _configure(conn: psycopg.Connection) -> None:
    """Run on every new pooled connection."""
    conn.execute(f"SET statement_timeout = {int(STATEMENT_TIMEOUT_MS)}")


def _observe_wait(seconds: float) -> None:
    from bec.observe import metrics

    metrics.DB_POOL_WAIT.observe(seconds)


def _count_error() -> None:
    from bec.observe import metrics  # lazily: the worker chooses the metrics storage first

    metrics.DB_ERRORS.inc()


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "unknown error"
