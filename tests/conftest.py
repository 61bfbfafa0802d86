"""The local stack for tests: a real PostgreSQL database and a real moto server.

* PostgreSQL: the server on 127.0.0.1:5432 (or BEC_TEST_SQL_HOST/PORT/USER) when it
  answers, otherwise a private cluster started with initdb; the session gets a fresh
  database, dropped at the end.
* S3/SQS: ``moto_server`` on a free port, reached through ``AWS_ENDPOINT_URL``.

Each test starts from empty tables and an empty moto (reset), so ids are predictable.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import boto3
import pytest

from bec.config import DbParams
from bec.control.db import Database
from bec.devstack import moto as motostack
from bec.devstack import postgres as pgstack

REGION = "us-east-1"
DEST_BUCKET = "bec-test-artifacts"
SOURCE_BUCKET = "archive.tbrc.org"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgstack.Server]:
    # Not under pytest's tmp folder: another pytest session resets it to 0700, which the
    # `postgres` user running a private cluster could then no longer traverse.
    home = Path(tempfile.mkdtemp(prefix="bec-test-pg-"))
    home.chmod(0o711)
    server = pgstack.find_or_start(
        home / "pgdata",
        host=os.environ.get("BEC_TEST_SQL_HOST", "127.0.0.1"),
        port=int(os.environ.get("BEC_TEST_SQL_PORT", "5432")),
        user=os.environ.get("BEC_TEST_SQL_USER", "postgres"),
        password=os.environ.get("BEC_TEST_SQL_PASSWORD"))
    yield server
    if server.data_dir:
        pgstack.stop_private(server, mode="immediate")
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def db_params(pg_server: pgstack.Server) -> Iterator[DbParams]:
    name = f"bec_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    pgstack.create_database(pg_server, name)
    params = DbParams(pg_server.host, pg_server.port, pg_server.user, pg_server.password, name)
    with Database(params, max_size=1) as database:
        database.apply_schema()
    yield params
    pgstack.drop_database(pg_server, name)


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[motostack.MotoServer]:
    server = motostack.start(log_path=tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


@dataclass
class Stack:
    """Handles on the local stack as a test sees it."""

    db: Database
    db_params: DbParams
    moto: motostack.MotoServer
    env: dict[str, str]
    workdir: Path

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.moto.url)

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    @property
    def s3(self) -> Any:
        return self.client("s3")


def stack_env(params: DbParams, moto_url: str) -> dict[str, str]:
    env = {
        "BEC_SQL_HOST": params.host, "BEC_SQL_PORT": str(params.port),
        "BEC_SQL_USER": params.user, "BEC_SQL_DATABASE": params.database,
        "BEC_REGION": REGION, "BEC_DEST_S3_BUCKET": DEST_BUCKET,
        "BEC_SOURCE_S3_BUCKET": SOURCE_BUCKET,
        "AWS_ENDPOINT_URL": moto_url, "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": REGION,
    }
    if params.password:
        env["BEC_SQL_PASSWORD"] = params.password
    return env


@pytest.fixture
def stack(db_params: DbParams, moto_server: motostack.MotoServer, monkeypatch: pytest.MonkeyPatch,
          tmp_path: Path) -> Iterator[Stack]:
    moto_server.reset()
    env = stack_env(db_params, moto_server.url)
    for key in [k for k in os.environ if k.startswith("BEC_") or k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)  # no stray .env from the developer's tree
    with Database(db_params, max_size=2) as database:
        database.execute("TRUNCATE task_executions, volumes, workers, jobs RESTART IDENTITY CASCADE")
        yield Stack(database, db_params, moto_server, env, tmp_path)
