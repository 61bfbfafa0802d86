"""Find a PostgreSQL to use, or start a private one from Debian's binaries.

Tests and the local stack prefer a server already answering (CI machines have one on
127.0.0.1:5432 with trust auth). Where none answers, a private cluster is created with
``initdb`` in a data folder and started with ``pg_ctl`` on a free port; as root this runs
as the ``postgres`` user, because initdb refuses root (and the folders above the data
folder get the "x" bit for others where they lack it — traverse only, no listing — or the
``postgres`` user could not reach it: pytest's and mktemp's folders are 0700).
"""
from __future__ import annotations

import glob
import os
import shutil
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from bec.devstack.moto import free_port


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    password: str | None = None
    data_dir: Path | None = None  # set when we started it ourselves

    def conninfo(self, dbname: str = "postgres") -> str:
        return psycopg.conninfo.make_conninfo(host=self.host, port=self.port, user=self.user,
                                              password=self.password or None, dbname=dbname,
                                              connect_timeout=3)

    def answers(self) -> bool:
        try:
            psycopg.connect(self.conninfo()).close()
            return True
        except psycopg.Error:
            return False


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return found[0] if found else shutil.which(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _let_postgres_reach(data_dir: Path) -> None:
    """As root: the postgres user must be able to traverse every folder above ``data_dir``."""
    for parent in data_dir.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode:
        detail = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{what} failed (exit {done.returncode})"
                           + (f": {detail[-1]}" if detail else ""))


def start_private(data_dir: Path, port: int | None = None,
                  settings: dict[str, str | int] | None = None) -> Server:
    """initdb (once) and start a private cluster listening on 127.0.0.1 only.

    ``settings`` are extra server settings (``-c name=value``), e.g. ``max_connections``;
    give them again when restarting the same data folder.
    """
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError("no PostgreSQL answers and its server binaries (initdb, pg_ctl) are "
                           "not installed: apt-get install postgresql, or set BEC_SQL_* to a server")
    data_dir.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        _let_postgres_reach(data_dir)
        shutil.chown(data_dir, "postgres", "postgres")
    port = port or free_port()
    if not (data_dir / "PG_VERSION").exists():
        _run(_as_postgres([initdb, "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8"]),
             f"initdb in {data_dir}")
    server = Server("127.0.0.1", port, "postgres", data_dir=data_dir)
    options = f"-p {port} -k {data_dir} -c listen_addresses=127.0.0.1"
    for name, value in (settings or {}).items():
        options += f" -c {name}={value}"
    _run(_as_postgres([pg_ctl, "-D", str(data_dir), "-l", str(data_dir / "server.log"),
                       "-o", options, "-w", "-t", "30", "start"]), f"pg_ctl start in {data_dir}")
    deadline = time.monotonic() + 30
    while not server.answers():
        if time.monotonic() > deadline:
            raise RuntimeError(f"private PostgreSQL in {data_dir} did not answer on port {port}")
        time.sleep(0.2)
    return server


def stop_private(server: Server, mode: str = "fast") -> None:
    pg_ctl = _bin("pg_ctl")
    if server.data_dir and pg_ctl:
        subprocess.run(_as_postgres([pg_ctl, "-D", str(server.data_dir), "-m", mode, "-w", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def find_or_start(data_dir: Path, host: str = "127.0.0.1", port: int = 5432,
                  user: str = "postgres", password: str | None = None) -> Server:
    """The server at host:port when it answers, else a private one under ``data_dir``."""
    existing = Server(host, port, user, password)
    if existing.answers():
        return existing
    return start_private(data_dir)


def create_database(server: Server, name: str) -> None:
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(server: Server, name: str) -> None:
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
