"""The local stack behind ``bec dev`` and ``bec demo``: moto (S3+SQS) and PostgreSQL.

Each checkout has its own stack. Its state lives in a data folder: ``$BEC_DEV_HOME``, else
``.bec-dev/`` in the checkout that holds this package, else (an installed package, no
checkout) ``~/.cache/bec/dev``. ``state.json`` there records the moto server this checkout
started (URL and pid) and the PostgreSQL in use: the server already answering on
127.0.0.1:5432 when there is one (shared by every checkout, each with its own database,
named after its data folder), otherwise a private cluster created in the data folder with
Debian's ``initdb``/``pg_ctl``. ``up`` is idempotent: whatever still answers is reused;
``down`` stops only what this checkout started.

Per user, as it was, a second clone's ``make demo`` reused the first one's moto and
replaced its job and task rows, and the test suite's demo test overwrote the developer's
demo database.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import asdict, dataclass
from pathlib import Path

import boto3
import psycopg

from bec.config import DbParams
from bec.control.db import Database
from bec.devstack import moto as motostack
from bec.devstack import postgres as pgstack

REGION = "us-east-1"
SOURCE_BUCKET = "archive.tbrc.org"
DEST_BUCKET = "bec-dev-artifacts"
DATABASE_PREFIX = "bec_dev_"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bec-dev", "AWS_SECRET_ACCESS_KEY": "bec-dev"}
SHARED_PG = ("127.0.0.1", 5432, "postgres")


def checkout() -> Path | None:
    """The source checkout this package runs from (``pip install -e .``, PYTHONPATH), if any."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "bec").is_dir() else None


def home() -> Path:
    configured = os.environ.get("BEC_DEV_HOME")
    if configured:
        return Path(configured)
    root = checkout()
    return root / ".bec-dev" if root else Path.home() / ".cache" / "bec" / "dev"


def database_name(folder: Path | None = None) -> str:
    """This stack's database on a shared server: one per data folder (so per checkout)."""
    where = str((folder or home()).resolve())
    return DATABASE_PREFIX + hashlib.sha1(where.encode()).hexdigest()[:8]


def shipped_model() -> Path:
    from bec.ldv1 import SHIPPED_WEIGHTS
    return SHIPPED_WEIGHTS


@dataclass
class StackState:
    moto_url: str
    moto_pid: int
    pg_host: str
    pg_port: int
    pg_user: str
    pg_private: bool
    database: str

    def db_params(self) -> DbParams:
        return DbParams(self.pg_host, self.pg_port, self.pg_user, None, self.database)

    def env(self) -> dict[str, str]:
        return {
            "BEC_SQL_HOST": self.pg_host, "BEC_SQL_PORT": str(self.pg_port),
            "BEC_SQL_USER": self.pg_user, "BEC_SQL_DATABASE": self.database,
            "BEC_REGION": REGION, "BEC_DEST_S3_BUCKET": DEST_BUCKET,
            "BEC_SOURCE_S3_BUCKET": SOURCE_BUCKET, "BEC_LD_MODEL_PATH": str(shipped_model()),
            "AWS_ENDPOINT_URL": self.moto_url, "AWS_DEFAULT_REGION": REGION, **CREDENTIALS,
        }


def _state_file() -> Path:
    return home() / "state.json"


def load() -> StackState | None:
    try:
        return StackState(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def status(state: StackState | None = None) -> dict[str, str]:
    state = state or load()
    if state is None:
        shared = pgstack.Server(*SHARED_PG)
        pg = (f"up at {shared.host}:{shared.port} (the shared local server; this checkout's "
              f"database {database_name()} is made by `bec dev up`)" if shared.answers() else "down")
        return {"moto": "down (not started by this checkout)", "postgres": pg}
    moto_ok = motostack.is_up(state.moto_url)
    pg = pgstack.Server(state.pg_host, state.pg_port, state.pg_user)
    pg_ok = pg.answers()
    kind = "private" if state.pg_private else "local server"
    return {"moto": f"up at {state.moto_url}" if moto_ok else "down",
            "postgres": f"up at {state.pg_host}:{state.pg_port} ({kind}), database {state.database}"
            if pg_ok else "down"}


def up() -> StackState:
    base = home()
    base.mkdir(parents=True, exist_ok=True)
    old = load()
    if old and motostack.is_up(old.moto_url) and _is_moto(old.moto_pid):
        moto_url, moto_pid = old.moto_url, old.moto_pid
    else:
        server = motostack.start(log_path=base / "moto.log", detach=True)
        moto_url, moto_pid = server.url, server.process.pid if server.process else 0
    pg = pgstack.find_or_start(base / "pgdata", *SHARED_PG)
    database = database_name(base)
    state = StackState(moto_url, moto_pid, pg.host, pg.port, pg.user, pg.data_dir is not None, database)
    _state_file().write_text(json.dumps(asdict(state), indent=2))
    with psycopg.connect(pg.conninfo(), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
    if not exists:
        pgstack.create_database(pg, database)
    with Database(state.db_params(), max_size=1) as db:
        db.apply_schema()
    s3 = boto3.client("s3", region_name=REGION, endpoint_url=moto_url,
                      aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
    for bucket in (SOURCE_BUCKET, DEST_BUCKET):
        try:
            s3.head_bucket(Bucket=bucket)
        except Exception:
            s3.create_bucket(Bucket=bucket)
    return state


def _is_moto(pid: int) -> bool:
    """``pid`` is (still) a moto server: a pid recorded before a reboot may be anyone's now."""
    if not pid or not _pid_alive(pid):
        return False
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"moto_server" in command or b"moto.server" in command


def down() -> list[str]:
    """Stop what this checkout's ``up`` started: its moto, its private PostgreSQL. A shared
    PostgreSQL and its database are left as they are."""
    state = load()
    done = []
    if state is None:
        return done
    if _is_moto(state.moto_pid):
        os.kill(state.moto_pid, signal.SIGTERM)
        done.append(f"stopped moto (pid {state.moto_pid})")
    if state.pg_private:
        pgstack.stop_private(pgstack.Server(state.pg_host, state.pg_port, state.pg_user,
                                            data_dir=home() / "pgdata"))
        done.append("stopped the private PostgreSQL")
    _state_file().unlink(missing_ok=True)
    return done


def apply_env(state: StackState) -> None:
    """Point this process (and its children) at the stack."""
    os.environ.update(state.env())
