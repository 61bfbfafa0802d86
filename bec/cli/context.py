"""What every command shares: settings, and the database and SQS client made on demand.

Services are opened lazily so that ``--help`` and input validation never need a network,
and so that bad input is rejected before anything is contacted or created.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import click
from rich.console import Console

from bec.edges import aws
from bec.config import Settings, number_setting
from bec.control.db import Database
from bec.control.ids import check_job_name

PIPED_WIDTH = 160

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fit_consoles_to_streams() -> None:
    """Rich squeezes tables to 80 columns when piped; the guide's tables need more.

    Decided per invocation, not at import: the streams and ``COLUMNS`` are those of the
    command being run (an in-process caller may swap them between commands).
    """
    for console, stream in ((out, sys.stdout), (err, sys.stderr)):
        isatty = getattr(stream, "isatty", lambda: False)
        piped = not (isatty() or os.environ.get("COLUMNS"))
        console._width = PIPED_WIDTH if piped else None  # rich's width setter takes no None


@dataclass
class AppContext:
    env_file: str | None = None
    region_override: str | None = None
    _settings: Settings | None = None
    _db: Database | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.from_env(self.env_file)
        return self._settings

    @property
    def db(self) -> Database:
        if self._db is None:
            self._db = Database(self.settings.db_params(), max_size=2, application_name="bec-cli")
            self._db.ensure_schema()
        return self._db

    @property
    def region(self) -> str:
        return self.settings.region(self.region_override)

    def client(self, service: str, **kwargs: Any) -> Any:
        key = f"{service}:{sorted(kwargs.items())}"
        if key not in self._clients:
            self._clients[key] = aws.client(service, self.region, **kwargs)
        return self._clients[key]

    @property
    def sqs(self) -> Any:
        return self.client("sqs")

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


pass_app = click.make_pass_decorator(AppContext)


def valid_job_name(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """Click callback: a job name is checked while the command line is parsed, before any
    service is contacted or anything is created."""
    return None if value is None else check_job_name(value)


def stale_after_setting(app: AppContext, option: float | None) -> float:
    """When a worker counts as dead for the commands that show workers and tasks: the option,
    else ``BEC_STALE_AFTER`` (the worker's own setting), else the worker's default."""
    from bec.control.jobs import STALE_AFTER_S

    if option is not None:
        return option
    raw = app.settings.get("BEC_STALE_AFTER")
    if raw is None:
        return STALE_AFTER_S
    return number_setting("BEC_STALE_AFTER", raw, unit="second")
