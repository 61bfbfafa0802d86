"""PostgreSQL errors are classified once, in ``Database``, and connections give up on a silent
server (real PostgreSQL)."""
from __future__ import annotations

import threading

import pytest

from bec.control import db as dbmod
from bec.control.db import Database
from bec.errors import DatabaseUnavailable
from dbfaults import admin_connection, read_only_database


def test_connections_carry_keepalives_a_tcp_user_timeout_and_a_statement_timeout(stack):
    """With Linux's defaults a black-holed primary stalled a query for ~15 minutes."""
    with Database(stack.db_params, max_size=1, application_name="bec-test") as database:
        with database.connection() as conn:
            params = conn.info.get_parameters()
            assert params["keepalives"] == "1" and int(params["keepalives_idle"]) <= 30
            assert 0 < int(params["tcp_user_timeout"]) <= 60_000
            timeout = conn.execute("SELECT current_setting('statement_timeout') AS t").fetchone()[0]
        assert timeout == "1min"


def test_a_statement_stuck_behind_a_lock_ends_as_unavailable(stack, monkeypatch):
    """The statement timeout at work (shortened): an UPDATE waiting on a row another session
    holds ends with a one-line ``DatabaseUnavailable``, not a thread held for ever."""
    monkeypatch.setattr(dbmod, "STATEMENT_TIMEOUT_MS", 300)
    stack.db.execute("CREATE TABLE IF NOT EXISTS lock_probe (id int PRIMARY KEY)")
    stack.db.execute("INSERT INTO lock_probe VALUES (1) ON CONFLICT DO NOTHING")
    holder = admin_connection(stack.db_params)
    try:
        holder.autocommit = False
        holder.execute("SELECT * FROM lock_probe WHERE id = 1 FOR UPDATE")
        with Database(stack.db_params, max_size=1, application_name="bec-test") as database:
            with pytest.raises(DatabaseUnavailable, match="statement timeout"):
                database.execute("UPDATE lock_probe SET id = 1 WHERE id = 1")
    finally:
        holder.rollback()
        holder.close()
        stack.db.execute("DROP TABLE lock_probe")


def test_a_read_only_server_is_unavailable_and_its_sessions_are_dropped(stack):
    """ReadOnlySqlTransaction is what a client connected to a demoted writer sees. It used to
    escape as a bare psycopg error: it killed the heartbeat thread for good and wedged a
    finishing volume. Now it is ``DatabaseUnavailable``, and the read-only session is dropped,
    so that the next statement reconnects (to the new primary)."""
    with Database(stack.db_params, max_size=1, application_name="bec-test") as database:
        with read_only_database(stack.db_params):
            with pytest.raises(DatabaseUnavailable, match="read-only"):
                database.execute("UPDATE workers SET last_heartbeat_at = now()")
            with pytest.raises(DatabaseUnavailable, match="read-only"):
                database.writable()  # the probe says so too (SELECT 1 would answer)
        # a session the pool opened during the outage is read-only too: it is dropped at its
        # first use, and the next one writes
        for _attempt in range(3):
            try:
                database.writable()
                break
            except DatabaseUnavailable:
                continue
        assert database.execute("UPDATE workers SET last_heartbeat_at = now()") == 0


def test_a_bug_in_sql_is_not_taken_for_an_outage(stack):
    with pytest.raises(Exception) as raised:
        stack.db.execute("SELECT no_such_column FROM workers")
    assert not isinstance(raised.value, DatabaseUnavailable)
